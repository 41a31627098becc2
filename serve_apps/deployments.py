"""The three model deployments: audio -> SpeechEncoder -> Backbone -> Vocoder -> audio.

Each is its own Serve deployment, so each autoscales on its own load (``config.yaml``):

* :class:`SpeechEncoder`: audio bytes -> checked 16 kHz mono (``deepomni.audio.load_audio``) -> log-mel ->
  Whisper encoder + projector -> the projected speech ``[n, D]`` the backbone reads at its AUDIO positions.
  Bad audio is *returned* as ``{"error": {reason, message}}``, not raised: the ingress turns it into a 422.
* :class:`Backbone`: the MoE LLM under a :class:`deepomni.serve.engine.BatchEngine`. One background task
  per replica runs ``engine.step()`` in a worker thread while any session is live (the replica's event
  loop stays free to take new sessions); sessions join and leave the running batch between steps. Each
  session's events go to its own ``asyncio.Queue``; :meth:`Backbone.generate` streams them to the caller
  in batches (everything that arrived since the caller last read), so a slow consumer gets bigger chunks
  instead of falling behind. A caller that stops consuming (client gone) cancels its session.
* :class:`Vocoder`: codec frames -> PCM, stateless: the codec's explicit stream state travels in and
  out of every call (moshi-style), so any replica can decode the next chunk of any stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ray import serve

from deepomni.model.generate import Event, GenerationConfig

from .loading import AppConfig, default_codec_spec, load_serving_model
from .protocol import audio_reason, pcm_s16le_to_float

log = logging.getLogger("ray.serve")
EXPERT_LOAD_FLUSH_S = 1.0
MIN_CHUNK_FRAMES = 4  # after the first audio, codec frames leave the Backbone in chunks of at least this
VOCODER_MAX_BATCH = 32  # concurrent decode calls batched into one codec step
VOCODER_BATCH_WAIT_S = 0.002  # how long a lone call waits for company  # how often the expert-load and token counters are pushed to the metrics


# ---------------------------------------------------------------------------------------------- encoder
@serve.deployment(name="SpeechEncoder", max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.25})
class SpeechEncoder:
    def __init__(self, cfg: AppConfig):
        from deepomni.audio import LogMel

        cfg.setup_torch()
        model = load_serving_model(cfg)
        self.speech, self.device = model.speech, cfg.torch_device()  # only the speech input is kept
        self.logmel = LogMel.from_config(model.cfg.speech_encoder)
        self.hidden_size = model.cfg.hidden_size

    def info(self) -> dict:
        return {"max_seconds": self.logmel.max_seconds, "hidden_size": self.hidden_size}

    async def encode(self, audio: bytes, pcm_sample_rate: int | None = None) -> dict:
        """Encoded audio (or raw ``pcm_s16le`` at ``pcm_sample_rate``) -> ``{"audio_ND": float32 [n, D],
        "seconds": input duration}`` or ``{"error": {"reason", "message"}}``."""
        return await asyncio.to_thread(self._encode, audio, pcm_sample_rate)

    @torch.no_grad()
    def _encode(self, audio: bytes, pcm_sample_rate: int | None) -> dict:
        from deepomni.audio import WHISPER_SAMPLE_RATE, AudioError, load_audio

        try:
            if pcm_sample_rate is not None:
                wav = load_audio(pcm_s16le_to_float(audio), sample_rate=pcm_sample_rate,
                                 max_seconds=self.logmel.max_seconds)
            else:
                wav = load_audio(audio, max_seconds=self.logmel.max_seconds)
        except AudioError as e:
            return {"error": {"reason": audio_reason(str(e)), "message": str(e)}}
        except (ValueError, TypeError) as e:
            return {"error": {"reason": "bad_audio", "message": str(e)}}
        mel, frames = self.logmel([wav])
        audio_ND = self.speech(mel.to(self.device), frames)[0]
        return {"audio_ND": audio_ND.float().cpu().numpy(), "seconds": len(wav) / WHISPER_SAMPLE_RATE}


# ---------------------------------------------------------------------------------------------- backbone
@dataclass
class _Session:
    """One answer as the Backbone's loop sees it: the request, where its events go, and its id once the
    engine has it."""

    request: Any  # deepomni.serve.engine.Request
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    sid: int | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)


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
    def __init__(self, cfg: AppConfig):
        from deepomni.text import load_tokenizer

        cfg.setup_torch()
        self.cfg = cfg
        self.model = load_serving_model(cfg)
        self.tok = load_tokenizer(cfg.tokenizer, self.model.cfg.text_vocab_size)
        self.engine = _make_engine(self.model, cfg.max_rows)
        self._inbox: list[_Session] = []  # submitted by generate(), handed to the engine between steps
        self._to_cancel: list[_Session] = []
        self._live: dict[int, _Session] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._tokens = {"text": 0, "speech": 0}
        self._flushed_at = time.perf_counter()
        from .metrics import backbone_metrics

        self.metrics = backbone_metrics()

    # ------------------------------------------------------------------------------------ API
    def info(self) -> dict:
        lay = self.model.layout
        return {"num_codec_channels": lay.num_codec_channels, "codebook_size": self.model.cfg.codebook_size,
                "hidden_size": self.model.cfg.hidden_size, "max_len": self.engine.max_len}

    def stats(self) -> dict:
        return {**self.engine.stats(), "sessions": len(self._live) + len(self._inbox)}

    async def generate(self, audio_ND: np.ndarray | None, text: str | None, options: dict) -> AsyncIterator[dict]:
        """Stream one answer: dicts ``{"text": delta, "codes_KF": int64 [K, F] or None, "end": stats or
        None, "error": {reason, message} or None}``, each with everything produced since the last one."""
        from deepomni.serve.engine import Request

        speech = bool(options.get("speech", True))
        gen = GenerationConfig(max_steps=int(options.get("max_steps") or self.cfg.max_steps), speech=speech,
                               seed=options.get("seed"))
        audio = None if audio_ND is None else torch.from_numpy(np.asarray(audio_ND, dtype=np.float32))
        sess = _Session(Request(self._prompt(audio, text, speech), audio, gen))
        self._start_loop()
        self._inbox.append(sess)
        self._wake.set()
        texts, done = _TextStream(self.tok), False
        stats = {"steps": 0, "text_tokens": 0, "frames": 0, "queue_ms": None}
        ids, frames, error = [], [], None  # produced, not yet sent
        try:
            while not done:
                events = [await sess.queue.get()]
                while not sess.queue.empty():
                    events.append(sess.queue.get_nowait())
                for ev in events:
                    if isinstance(ev, dict):  # the engine refused the request
                        error, done = ev, True
                        break
                    if stats["queue_ms"] is None:
                        stats["queue_ms"] = round((time.perf_counter() - sess.submitted_at) * 1e3, 2)
                    if ev.kind == "text":
                        ids.append(ev.text_id)
                    elif ev.kind == "frame":
                        frames.append(ev.frame_K)
                    elif ev.kind == "end":
                        stats["steps"], done = ev.step, True
                # the first audio goes at once; after it, frames travel in chunks of MIN_CHUNK_FRAMES (each
                # message costs a vocoder call and an RPC: per-step messages would swamp a small machine)
                first = stats["frames"] == 0
                if not (done or (first and (frames or ids)) or len(frames) >= MIN_CHUNK_FRAMES or not speech):
                    continue
                out = {"text": texts.push(ids), "codes_KF": None, "end": None, "error": error}
                stats["text_tokens"] += len(ids)
                stats["frames"] += len(frames)
                if frames:
                    out["codes_KF"] = torch.stack(frames, dim=1).numpy()
                if done and error is None:
                    out["end"] = {**stats, "text": texts.text}
                ids, frames = [], []
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
                self._flush_metrics()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not leave sessions waiting forever: fail them, keep serving
                log.exception("Backbone step failed")
                for sess in [*self._live.values(), *self._inbox]:
                    sess.queue.put_nowait({"reason": "internal_error", "message": f"generation failed: {e}"})
                    if sess.sid is not None:
                        self.engine.cancel(sess.sid)
                self._live.clear()
                self._inbox.clear()

    def _admit_and_cancel(self) -> None:
        for sess in self._inbox:
            if sess.cancelled:
                continue
            try:
                sess.sid = self.engine.submit(sess.request)
            except ValueError as e:
                sess.queue.put_nowait({"reason": "prompt_too_long", "message": str(e)})
                continue
            self._live[sess.sid] = sess
        self._inbox.clear()
        for sess in self._to_cancel:
            if sess.sid is not None and self._live.pop(sess.sid, None) is not None:
                self.engine.cancel(sess.sid)
        self._to_cancel.clear()

    def _route(self, events: list[tuple[int, Event]]) -> None:
        K = self.model.layout.num_codec_channels
        for sid, ev in events:
            if ev.kind == "text":
                self._tokens["text"] += 1
            elif ev.kind == "frame":
                self._tokens["speech"] += K
            sess = self._live.get(sid)
            if sess is None:  # cancelled while the step ran
                continue
            sess.queue.put_nowait(ev)
            if ev.kind == "end":
                del self._live[sid]

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

    def info(self) -> dict:
        c = self.codec
        return {"codec": self.spec, "sample_rate": c.sample_rate, "num_channels": c.num_channels,
                "codebook_size": c.codebook_size, "frame_rate": c.frame_rate}

    async def decode(self, state: Any, codes_KF: np.ndarray | None, final: bool = False) -> tuple[np.ndarray, Any]:
        """``(audio that became final, next state)``: ``state`` None starts a stream; ``final`` flushes it
        (the returned state is then None). Codes outside the codebook (the model's specials) are refused
        by ``Codec.check_codes``, so the backbone only sends frames. Concurrent calls (the answers being
        spoken at the same time) are decoded as one batch (``Codec.stream_step_many``)."""
        out = await self._decode_batch((state, codes_KF, final))
        if isinstance(out, Exception):
            raise out
        return out

    @serve.batch(max_batch_size=VOCODER_MAX_BATCH, batch_wait_timeout_s=VOCODER_BATCH_WAIT_S)
    async def _decode_batch(self, items: list[tuple]) -> list:
        return await asyncio.to_thread(self._decode_many, items)

    @torch.no_grad()
    def _decode_many(self, items: list[tuple]) -> list:
        """One result per item: ``(audio, state)``, or the exception for that item alone."""
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
