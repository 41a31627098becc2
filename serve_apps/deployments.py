"""The three model deployments: audio -> SpeechEncoder -> Backbone -> Vocoder -> audio.

Each is its own Serve deployment, so each autoscales on its own load (``config.yaml``):

* :class:`SpeechEncoder`: audio bytes -> checked 16 kHz mono (``deepomni.audio.load_audio``) -> log-mel ->
  Whisper encoder + projector -> the projected speech ``[n, D]`` the backbone reads at its AUDIO positions.
  Turns that arrive while a batch is being encoded are encoded together next (:class:`_Batcher`).
  Bad audio is *returned* as ``{"error": {reason, message}}``, not raised: the ingress turns it into a 422.
* :class:`Backbone`: the MoE LLM under a :class:`deepomni.serve.engine.BatchEngine`. One background task
  per replica runs ``engine.step()`` in a worker thread while any session is live (the replica's event
  loop stays free to take new sessions); sessions join and leave the running batch between steps. The
  codec frames the steps release go to the Vocoder deployment as they come: one call carries every
  session's new frames (one batched decode), and while it runs the next frames pile up for the next call,
  so the calls grow with the load instead of falling behind. The PCM that comes back goes to each
  session's stream; :meth:`Backbone.generate` streams text deltas and audio to the caller, everything
  that arrived since the caller last read. A caller that stops consuming (client gone) cancels its session.
* :class:`Vocoder`: codec frames -> PCM, stateless: the codec's explicit stream state travels in and
  out of every call (moshi-style), so any replica can decode the next chunk of any stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ray import serve

from deepomni.model.generate import Event, GenerationConfig

from .loading import AppConfig, default_codec_spec, load_serving_model
from .protocol import audio_reason, pcm_s16le_to_float

log = logging.getLogger("ray.serve")
EXPERT_LOAD_FLUSH_S = 1.0  # how often the expert-load and token counters are pushed to the metrics
MIN_CHUNK_FRAMES = 4  # after a session's first audio, its frames go to the vocoder in chunks of at least this
VOCODER_CALLS_IN_FLIGHT = 2  # per Backbone replica; a session is in at most one call at a time
MAX_ENCODE_BATCH = 16  # turns encoded together


class _Batcher:
    """Calls that arrive while a batch runs wait and go together in the next one, run in a worker thread:
    a lone call waits for nothing, and under load the batches grow by themselves (``@serve.batch`` instead
    collects for a fixed time, which a lone call pays, and forms the next batch before the last is done).
    ``fn(items) -> results``, one per item; a result that is an exception is raised to that caller alone."""

    def __init__(self, fn: Callable[[list], list], max_batch: int):
        self.fn, self.max_batch = fn, max_batch
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.running = False

    async def __call__(self, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((item, fut))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        out = await fut
        if isinstance(out, BaseException):
            raise out
        return out

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
                try:
                    results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
                except Exception as e:  # the whole batch failed: every caller hears why
                    results = [e] * len(batch)
                for (_, fut), res in zip(batch, results):
                    if not fut.done():
                        fut.set_result(res)
        finally:
            self.running = False


# ---------------------------------------------------------------------------------------------- encoder
@serve.deployment(name="SpeechEncoder", max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.25})
class SpeechEncoder:
    def __init__(self, cfg: AppConfig):
        from deepomni.audio import LogMel

        cfg.setup_torch(cfg.encoder_threads)
        model = load_serving_model(cfg)
        self.speech, self.device = model.speech, cfg.torch_device()  # only the speech input is kept
        self.logmel = LogMel.from_config(model.cfg.speech_encoder)
        self.hidden_size = model.cfg.hidden_size
        self._batch = _Batcher(self._encode_many, MAX_ENCODE_BATCH)
        tone = (3000 * np.sin(np.arange(3200) * 0.1)).astype(np.int16).tobytes()
        self._encode_many([(tone, 16000)])  # first-call costs here, not in the first user's turn

    def info(self) -> dict:
        return {"max_seconds": self.logmel.max_seconds, "hidden_size": self.hidden_size}

    async def encode(self, audio: bytes, pcm_sample_rate: int | None = None) -> dict:
        """Encoded audio (or raw ``pcm_s16le`` at ``pcm_sample_rate``) -> ``{"audio_ND": float32 [n, D],
        "seconds": input duration}`` or ``{"error": {"reason", "message"}}``."""
        return await self._batch((audio, pcm_sample_rate))

    def _load(self, audio: bytes, pcm_sample_rate: int | None) -> np.ndarray | dict:
        from deepomni.audio import AudioError, load_audio

        try:
            if pcm_sample_rate is not None:
                return load_audio(pcm_s16le_to_float(audio), sample_rate=pcm_sample_rate,
                                  max_seconds=self.logmel.max_seconds)
            return load_audio(audio, max_seconds=self.logmel.max_seconds)
        except AudioError as e:
            return {"error": {"reason": audio_reason(str(e)), "message": str(e)}}
        except (ValueError, TypeError) as e:
            return {"error": {"reason": "bad_audio", "message": str(e)}}

    @torch.no_grad()
    def _encode_many(self, items: list[tuple[bytes, int | None]]) -> list[dict]:
        from deepomni.audio import WHISPER_SAMPLE_RATE

        out = [self._load(*item) for item in items]
        ok = [i for i, w in enumerate(out) if isinstance(w, np.ndarray)]
        if ok:
            wavs = [out[i] for i in ok]
            mel, frames = self.logmel(wavs)
            for i, wav, audio_ND in zip(ok, wavs, self.speech(mel.to(self.device), frames)):
                out[i] = {"audio_ND": audio_ND.float().cpu().numpy(), "seconds": len(wav) / WHISPER_SAMPLE_RATE}
        return out


# ---------------------------------------------------------------------------------------------- backbone
@dataclass
class _Session:
    """One answer as the Backbone sees it: the request, where its stream items go, its id once the engine
    has it, and its audio on the way: frames not yet sent to the vocoder, the codec stream state."""

    request: Any  # deepomni.serve.engine.Request
    speech: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", ids) | ("audio", pcm) | ("end", steps) | ("error", {..})
    sid: int | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    text_ids: list = field(default_factory=list)  # a speech answer's text, held to travel with its audio
    frames: list = field(default_factory=list)  # codec frames [K] not yet sent to the vocoder
    frames_sent: int = 0
    end_step: int | None = None  # set when decoding ended; the answer ends when its audio is flushed
    codec_state: Any = None  # the codec's stream state, between vocoder calls
    vocoding: bool = False  # a vocoder call holds this session's stream state

    def wants_vocoder(self) -> bool:
        """Whether this session's frames should go now (it is in no call): its first audio, a full chunk,
        or its end."""
        if self.end_step is not None:
            return True
        return bool(self.frames) and (self.frames_sent == 0 or len(self.frames) >= MIN_CHUNK_FRAMES)


class _TextStream:
    """Text ids -> text deltas; holds back an incomplete UTF-8 sequence (byte tokenizer) until it completes."""

    def __init__(self, tok):
        self.tok, self.ids, self.sent = tok, [], ""

    def push(self, ids: list[int]) -> str:
        if not ids:
            return ""
        self.ids += ids
        text = self.tok.decode(self.ids).rstrip("\ufffd")
        if not text.startswith(self.sent):  # a tokenizer that re-spells its prefix: send the difference
            common = 0
            while common < min(len(text), len(self.sent)) and text[common] == self.sent[common]:
                common += 1
            text = self.sent[:common] + text[common:]
        delta, self.sent = text[len(self.sent):], text
        return delta

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids)


@serve.deployment(name="Backbone", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
class Backbone:
    def __init__(self, cfg: AppConfig, vocoder=None):
        """``vocoder``: the Vocoder deployment's handle (``None``: text answers only, as in unit tests)."""
        from deepomni.text import load_tokenizer

        cfg.setup_torch()
        self.cfg, self.vocoder = cfg, vocoder
        self.model = load_serving_model(cfg)
        self.tok = load_tokenizer(cfg.tokenizer, self.model.cfg.text_vocab_size)
        self.engine = _make_engine(self.model, cfg.max_rows)
        self._inbox: list[_Session] = []  # submitted by generate(), handed to the engine between steps
        self._to_cancel: list[_Session] = []
        self._sessions: dict[int, _Session] = {}  # admitted and not yet ended (decoding, or audio on the way)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._vocoder_calls = 0  # in flight
        self._codec_info: dict | None = None
        self._tokens = {"text": 0, "speech": 0}
        self._flushed_at = time.perf_counter()
        from .metrics import backbone_metrics

        self.metrics = backbone_metrics()
        self._warm_up()

    def _warm_up(self) -> None:
        """A few decoding steps of a throwaway session: first-call costs here, not in the first user's answer."""
        from deepomni.serve.engine import Request

        prompt = self._prompt(None, "warm up", speech=True)
        sid = self.engine.submit(Request(prompt, None, GenerationConfig(max_steps=8, speech=True, seed=0)))
        for _ in range(8):
            self.engine.step()
        self.engine.cancel(sid)
        self.engine.step()
        self.engine.take_expert_load()

    # ------------------------------------------------------------------------------------ API
    async def info(self) -> dict:
        lay = self.model.layout
        if self.vocoder is not None and self._codec_info is None:
            self._codec_info = await self.vocoder.info.remote()
        return {"num_codec_channels": lay.num_codec_channels, "codebook_size": self.model.cfg.codebook_size,
                "hidden_size": self.model.cfg.hidden_size, "max_len": self.engine.max_len,
                "codec": self._codec_info}

    def stats(self) -> dict:
        return {**self.engine.stats(), "sessions": len(self._sessions) + len(self._inbox),
                "vocoder_calls": self._vocoder_calls}

    async def generate(self, audio_ND: np.ndarray | None, text: str | None, options: dict) -> AsyncIterator[dict]:
        """Stream one answer: dicts ``{"text": delta, "pcm": float32 audio or None, "end": stats or None,
        "error": {reason, message} or None}``, each with everything produced since the last one. Audio
        needs a vocoder; without one, ``speech`` is off."""
        from deepomni.serve.engine import Request

        speech = bool(options.get("speech", True)) and self.vocoder is not None
        gen = GenerationConfig(max_steps=int(options.get("max_steps") or self.cfg.max_steps), speech=speech,
                               seed=options.get("seed"))
        audio = None if audio_ND is None else torch.from_numpy(np.asarray(audio_ND, dtype=np.float32))
        sess = _Session(Request(self._prompt(audio, text, speech), audio, gen), speech)
        self._start_loop()
        self._inbox.append(sess)
        self._wake.set()
        texts, done = _TextStream(self.tok), False
        stats = {"steps": 0, "text_tokens": 0, "frames": 0, "queue_ms": None}
        try:
            while not done:
                items = [await sess.queue.get()]
                while not sess.queue.empty():
                    items.append(sess.queue.get_nowait())
                ids, pcm, out = [], [], {"text": "", "pcm": None, "end": None, "error": None}
                for kind, value in items:
                    if stats["queue_ms"] is None:
                        stats["queue_ms"] = round((time.perf_counter() - sess.submitted_at) * 1e3, 2)
                    if kind == "text":
                        ids += value
                    elif kind == "audio":
                        pcm.append(value)
                    elif kind == "error":
                        out["error"], done = value, True
                    elif kind == "end":
                        stats["steps"], done = value, True
                out["text"] = texts.push(ids)
                stats["text_tokens"] += len(ids)
                if pcm:
                    out["pcm"] = np.concatenate(pcm)
                if done and out["error"] is None:
                    stats["frames"] = sess.frames_sent
                    out["end"] = {**stats, "text": texts.text}
                yield out
        finally:
            if not done:  # the caller went away (or was cancelled) mid-answer: free the session's rows
                sess.cancelled = True
                self._to_cancel.append(sess)
                self._wake.set()
                self.metrics.cancelled_sessions.inc(tags={"reason": "client_gone"})

    # ------------------------------------------------------------------------------------ prompts
    def _prompt(self, audio: torch.Tensor | None, text: str | None, speech: bool) -> torch.Tensor:
        """As training and evaluation build it (deepomni.train.evaluate.build_prompt): the task's instruction
        on the SYSTEM slot, then the question as AUDIO placeholders or text ids."""
        from deepomni.data.sequences import INSTRUCTIONS
        from deepomni.model.prompt import user_turn

        task = "spoken_qa" if speech or audio is not None else "text_qa"
        system = self.tok.encode(INSTRUCTIONS[task])
        if audio is not None:
            return user_turn(self.model.layout, audio_positions=audio.shape[0], system_ids=system)
        return user_turn(self.model.layout, text_ids=self.tok.encode(text or ""), system_ids=system)

    # ------------------------------------------------------------------------------------ the loop
    def _start_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = self._wake or asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Between steps: hand new sessions to the engine and cancel abandoned ones (the engine is only
        touched here, never while a step runs); then one step in a worker thread; route its events."""
        while True:
            try:
                self._admit_and_cancel()
                if self.engine.idle:
                    self._flush_metrics(force=True)
                    self._wake.clear()
                    if not self._inbox and not self._to_cancel:
                        await self._wake.wait()
                    continue
                events = await asyncio.to_thread(self.engine.step)
                self._route(events)
                self._send_to_vocoder()
                self._flush_metrics()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not leave sessions waiting forever: fail them, keep serving
                log.exception("Backbone step failed")
                for sess in [*self._sessions.values(), *self._inbox]:
                    self._fail(sess, {"reason": "internal_error", "message": f"generation failed: {e}"})
                self._inbox.clear()
                await asyncio.sleep(0.01)  # a fault that repeats must not spin the replica's loop

    def _admit_and_cancel(self) -> None:
        for sess in self._inbox:
            if sess.cancelled:
                continue
            try:
                sess.sid = self.engine.submit(sess.request)
            except ValueError as e:
                sess.queue.put_nowait(("error", {"reason": "prompt_too_long", "message": str(e)}))
                continue
            self._sessions[sess.sid] = sess
        self._inbox.clear()
        for sess in self._to_cancel:
            if sess.sid is not None and self._sessions.pop(sess.sid, None) is not None:
                self.engine.cancel(sess.sid)
        self._to_cancel.clear()

    def _fail(self, sess: _Session, error: dict) -> None:
        sess.queue.put_nowait(("error", error))
        if sess.sid is not None:
            self.engine.cancel(sess.sid)
            self._sessions.pop(sess.sid, None)

    def _route(self, events: list[tuple[int, Event]]) -> None:
        """Text ids to the sessions' streams (a speech answer's text waits to travel with its audio), frames
        to the sessions' vocoder queues; an answer with no audio pending ends at once."""
        K = self.model.layout.num_codec_channels
        text: dict[int, list[int]] = {}
        for sid, ev in events:
            if ev.kind == "text":
                self._tokens["text"] += 1
            elif ev.kind == "frame":
                self._tokens["speech"] += K
            sess = self._sessions.get(sid)
            if sess is None:  # cancelled while the step ran
                continue
            if ev.kind == "text":
                (sess.text_ids if sess.speech else text.setdefault(sid, [])).append(ev.text_id)
            elif ev.kind == "frame":
                sess.frames.append(ev.frame_K)
            elif ev.kind == "end":
                sess.end_step = ev.step
        for sid, ids in text.items():
            self._sessions[sid].queue.put_nowait(("text", ids))
        for sess in [s for s in self._sessions.values() if s.end_step is not None]:
            if not sess.speech or (sess.frames_sent == 0 and not sess.frames and not sess.vocoding):
                self._end(sess)

    def _deliver(self, sess: _Session, pcm: np.ndarray) -> None:
        if sess.text_ids:
            sess.queue.put_nowait(("text", sess.text_ids))
            sess.text_ids = []
        if len(pcm):
            sess.queue.put_nowait(("audio", pcm))

    def _end(self, sess: _Session) -> None:
        self._deliver(sess, np.zeros(0, dtype=np.float32))
        sess.queue.put_nowait(("end", sess.end_step))
        self._sessions.pop(sess.sid, None)

    # ------------------------------------------------------------------------------------ audio
    def _send_to_vocoder(self) -> None:
        """When some session has frames that should go (:meth:`_Session.wants_vocoder`) and fewer than
        ``VOCODER_CALLS_IN_FLIGHT`` calls are out, one call takes the frames of every session not already in
        a call."""
        while self._vocoder_calls < VOCODER_CALLS_IN_FLIGHT:
            ready = [s for s in self._sessions.values() if s.speech and not s.vocoding and not s.cancelled]
            if not any(s.wants_vocoder() for s in ready):
                return
            # a call that goes anyway takes every session's pending frames: sessions that started at different
            # steps share the calls (one batched decode) instead of each calling on its own schedule
            batch = [s for s in ready if s.frames or s.end_step is not None]
            items = []
            for sess in batch:
                codes = torch.stack(sess.frames, dim=1).numpy() if sess.frames else None
                items.append((sess.codec_state, codes, sess.end_step is not None))
                sess.frames_sent += len(sess.frames)
                sess.frames, sess.vocoding = [], True
            self._vocoder_calls += 1
            asyncio.get_running_loop().create_task(self._vocode(batch, items))

    async def _vocode(self, batch: list[_Session], items: list[tuple]) -> None:
        try:
            results = await self.vocoder.decode.remote(items)
        except Exception as e:  # the vocoder failed or went away: these answers fail, the others go on
            log.exception("Vocoder call failed")
            results = [RuntimeError(f"the vocoder failed: {e}")] * len(batch)
        finally:
            self._vocoder_calls -= 1
        for sess, (_, _, final), res in zip(batch, items, results):
            sess.vocoding = False
            if sess.cancelled or self._sessions.get(sess.sid) is not sess:
                continue
            if isinstance(res, BaseException):
                self._fail(sess, {"reason": "internal_error", "message": str(res)})
                continue
            pcm, sess.codec_state = res
            self._deliver(sess, pcm)
            if final:
                self._end(sess)
        self._send_to_vocoder()

    def _flush_metrics(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._flushed_at < EXPERT_LOAD_FLUSH_S:
            return
        self._flushed_at = now
        m = self.metrics
        st = self.engine.stats()
        m.active_sessions.set(st["active_sessions"], tags={"state": "active"})
        m.active_sessions.set(st["queued"], tags={"state": "queued"})
        for channel, n in self._tokens.items():
            if n:
                m.generated_tokens.inc(n, tags={"channel": channel})
                self._tokens[channel] = 0
        for modality, load_LE in self.engine.take_expert_load().items():
            for layer, expert in torch.nonzero(load_LE).tolist():
                m.expert_routed_tokens.inc(int(load_LE[layer, expert]), tags={
                    "layer": str(self.engine.moe_layer_ids[layer]), "expert": str(expert), "modality": modality})


def _make_engine(model, max_rows: int):
    """The one place that knows the continuous-batching engine (``deepomni.serve.engine``)."""
    from deepomni.serve.engine import BatchEngine

    return BatchEngine(model, max_rows=max_rows)


# ---------------------------------------------------------------------------------------------- vocoder
@serve.deployment(name="Vocoder", max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.25})
class Vocoder:
    def __init__(self, cfg: AppConfig):
        from deepomni.codec import load_codec

        cfg.setup_torch()
        model_cfg = cfg.model_config()
        self.spec = cfg.codec or default_codec_spec(model_cfg)
        self.codec = load_codec(self.spec, device=cfg.torch_device())
        if self.codec.num_channels != model_cfg.num_codec_channels or self.codec.codebook_size > model_cfg.codebook_size:
            raise ValueError(f"codec {self.spec!r} has {self.codec.num_channels} channels x {self.codec.codebook_size} "
                             f"codes; the model writes {model_cfg.num_codec_channels} x {model_cfg.codebook_size}")
        self._decode([(None, np.zeros((self.codec.num_channels, 2), dtype=np.int64), True)])  # first-call costs

    def info(self) -> dict:
        c = self.codec
        return {"codec": self.spec, "sample_rate": c.sample_rate, "num_channels": c.num_channels,
                "codebook_size": c.codebook_size, "frame_rate": c.frame_rate}

    async def decode(self, items: list[tuple[Any, np.ndarray | None, bool]]) -> list:
        """Stream steps of many answers as one batch (``Codec.stream_step_many``): per item ``(state,
        codes_KF or None, final)`` -> ``(audio that became final, next state)``, or the exception for that
        item alone. ``state`` None starts a stream; ``final`` flushes it (the returned state is then
        None). Codes outside the codebook (the model's specials) are refused by ``Codec.check_codes``."""
        return await asyncio.to_thread(self._decode, items)

    @torch.no_grad()
    def _decode(self, items: list[tuple]) -> list:
        results: list = [None] * len(items)
        states, codes, todo = [], [], []
        for i, (state, codes_KF, _) in enumerate(items):
            state = self.codec.init_stream_state() if state is None else state
            states.append(state)
            codes.append(None)
            if codes_KF is not None and np.asarray(codes_KF).size:
                try:
                    codes[i] = self.codec.check_codes(torch.from_numpy(np.asarray(codes_KF)))
                    todo.append(i)
                except ValueError as e:
                    results[i] = e
        audio = dict(zip(todo, self.codec.stream_step_many([states[i] for i in todo], [codes[i] for i in todo])))
        for i, (_, _, final) in enumerate(items):
            if results[i] is not None:
                continue
            parts = [np.zeros(0, dtype=np.float32), audio.get(i, np.zeros(0, dtype=np.float32))]
            state = states[i]
            if final:
                parts.append(self.codec.stream_flush(state))
                state = None
            results[i] = (np.concatenate(parts).astype(np.float32, copy=False), state)
        return results
