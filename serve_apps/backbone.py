"""The Backbone deployment: the MoE LLM under a :class:`deepomni.serve.engine.BatchEngine`.

One file over 400 lines on purpose: it is one deployment class whose engine loop, session routing and
batched vocoder calls share one replica's state on one event loop; the batching itself is
``deepomni/serve/engine.py``, the messages ``messages.py``, the fault rules ``faults.py``.

One background task per replica runs ``engine.step()`` in a worker thread while any session is live (the
replica's event loop stays free to take new sessions); sessions join and leave the running batch between
steps. The codec frames the steps release go to the Vocoder deployment as they come: one call carries every
session's new frames (one batched decode, :class:`~serve_apps.messages.VocodeItem` per session), and while
it runs the next frames pile up for the next call, so the calls grow with the load instead of falling
behind. The PCM that comes back goes to each session's stream; :meth:`Backbone.generate` streams text
deltas and audio to the caller (:class:`~serve_apps.messages.AnswerChunk`), everything that arrived since
the caller last read. A caller that stops consuming (client gone) cancels its session. At most
``max_queued`` sessions wait for rows (:class:`deepomni.serve.engine.Overloaded`): the next is refused at once
with an ``overloaded`` :class:`~serve_apps.messages.AnswerError` whose ``retry_after_s`` estimates when a row
frees (``docs/serving.md`` "Overload"). Faults (``serve_apps/faults.py``): a stream sends a keepalive chunk
every ``KEEPALIVE_S`` while its answer waits, so the ingress can bound its wait for the next chunk; a Vocoder
call that fails because its replica died ends the answers in it with an ``unavailable`` error at once, and
every Vocoder call is bounded (:meth:`Backbone._vocoder_result`). Replicas and autoscaling: ``config.yaml``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ray import serve

from deepomni.model.generate import Event, GenerationConfig

from .faults import KEEPALIVE_S, START_TIMEOUT_S, VOCODER_LOSS_WAIT_S, cause_of, unavailable
from .loading import AppConfig, load_serving_model
from .messages import (AnswerChunk, AnswerEnd, AnswerError, BackboneInfo, CodecInfo, Conversation, GenerateOptions,
                       VocodedAudio, VocodeFailed, VocodeItem)
from .protocol import RETRY_AFTER_MAX_S, RETRY_AFTER_MIN_S

log = logging.getLogger("ray.serve")
EXPERT_LOAD_FLUSH_S = 1.0  # how often the expert-load and token counters are pushed to the metrics
MIN_CHUNK_FRAMES = 4  # after a session's first audio, its frames go to the vocoder in chunks of at least this
VOCODER_CALLS_IN_FLIGHT = 2  # per Backbone replica; a session is in at most one call at a time


@dataclass
class _Session:
    """One answer as the Backbone sees it: the request, where its stream items go, its id once the engine
    has it, and its audio on the way: frames not yet sent to the vocoder, the codec stream state."""

    request: Any  # deepomni.serve.engine.Request
    speech: bool
    # ("text", ids) | ("audio", pcm) | ("end", steps) | ("error", AnswerError)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    sid: int | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    text_ids: list = field(default_factory=list)  # a speech answer's text, held to travel with its audio
    frames: list = field(default_factory=list)  # codec frames [K] not yet sent to the vocoder
    frames_sent: int = 0
    end_step: int | None = None  # set when decoding ended; the answer ends when its audio is flushed
    codec_state: Any = None  # the codec's stream state, between vocoder calls (VocodeItem.state)
    vocoding: bool = False  # a vocoder call holds this session's stream state
    prefill: Event | None = None  # the engine's "prefill" event: prompt and cached positions

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


@serve.deployment(name="Backbone")
class Backbone:
    def __init__(self, cfg: AppConfig, vocoder=None):
        """``vocoder``: the Vocoder deployment's handle (``None``: text answers only, as in unit tests)."""
        from deepomni.text import load_tokenizer

        cfg.setup_torch()
        self.cfg, self.vocoder = cfg, vocoder
        self.model = load_serving_model(cfg)
        self.tok = load_tokenizer(cfg.tokenizer, self.model.cfg.text_vocab_size)
        self.engine = _make_engine(self.model, cfg.max_rows, cfg.kept_contexts, cfg.queue_limit(), cfg.prefill_chunk,
                                   cfg.prepack_weights)
        self._inbox: list[_Session] = []  # submitted by generate(), handed to the engine between steps
        self._to_cancel: list[_Session] = []
        self._sessions: dict[int, _Session] = {}  # admitted and not yet ended (decoding, or audio on the way)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._vocoder_calls = 0  # in flight
        self._vocoder_lost_at: float | None = None  # when a Vocoder call last failed because its replica died
        self._step_s = 0.02  # a decoding step's wall time (moving average): Retry-After estimates
        self._overloaded = 0  # sessions refused because max_queued already waited
        self._codec_info: CodecInfo | None = None
        self._tokens = {"text": 0, "speech": 0}
        self._flushed_at = time.perf_counter()
        from .metrics import backbone_metrics

        self.metrics = backbone_metrics()
        self._warm_up()

    def _warm_up(self) -> None:
        """A few decoding steps of a throwaway session: first-call costs here, not in the first user's answer."""
        from deepomni.serve.engine import Request

        prompt, _, _, _ = self._prompt(Conversation.single(text="warm up"), True, 8)
        sid = self.engine.submit(Request(prompt, None, GenerationConfig(max_steps=8, speech=True, seed=0)))
        for _ in range(8):
            self.engine.step()
        self.engine.cancel(sid)
        self.engine.step()
        self.engine.take_expert_load()

    # ------------------------------------------------------------------------------------ API
    async def info(self) -> BackboneInfo:
        if self.vocoder is not None and self._codec_info is None:
            self._codec_info = await self.vocoder.info.remote()
        return BackboneInfo(num_codec_channels=self.model.layout.num_codec_channels,
                            codebook_size=self.model.cfg.codebook_size, hidden_size=self.model.cfg.hidden_size,
                            max_len=self.engine.max_len, codec=self._codec_info)

    def stats(self) -> dict[str, int]:
        """The engine's counters and this replica's sessions and vocoder calls in flight (``/healthz`` shows
        them as they are)."""
        return {**self.engine.stats(), "sessions": len(self._sessions) + len(self._inbox),
                "vocoder_calls": self._vocoder_calls, "max_queued": self.cfg.queue_limit(),
                "overloaded": self._overloaded}

    async def generate(self, conv: Conversation, options: GenerateOptions = GenerateOptions()
                       ) -> AsyncIterator[AnswerChunk]:
        """Stream the answer to a conversation: chunks, each with everything produced since the last one;
        the last has ``end`` or ``error``. Audio needs a vocoder; without one, ``speech`` is off."""
        from deepomni.serve.engine import Request

        speech = options.speech and self.vocoder is not None
        max_steps = int(options.max_steps or self.cfg.max_steps)
        gen = GenerationConfig(max_steps=max_steps, speech=speech, seed=options.seed)
        if options.temperature is not None:
            gen.temperature = options.temperature
        try:
            prompt, audio, dropped, n_audio = self._prompt(conv, speech, max_steps)
        except ValueError as e:
            yield AnswerChunk(error=AnswerError("prompt_too_long", str(e)))
            return
        sess = _Session(Request(prompt, audio, gen, keep=conv.keep), speech)
        self._start_loop()
        self._inbox.append(sess)
        self._wake.set()
        texts, done = _TextStream(self.tok), False
        steps, text_tokens, queue_ms = 0, 0, None
        try:
            while not done:
                try:  # a keepalive while nothing comes (queued for rows, waiting for audio): the caller bounds its wait
                    items = [await asyncio.wait_for(sess.queue.get(), KEEPALIVE_S)]
                except asyncio.TimeoutError:
                    yield AnswerChunk(keepalive=True)
                    continue
                while not sess.queue.empty():
                    items.append(sess.queue.get_nowait())
                ids, pcm, error = [], [], None
                for kind, value in items:
                    if queue_ms is None:
                        queue_ms = round((time.perf_counter() - sess.submitted_at) * 1e3, 2)
                    if kind == "text":
                        ids += value
                    elif kind == "audio":
                        pcm.append(value)
                    elif kind == "error":
                        error, done = value, True
                    elif kind == "end":
                        steps, done = value, True
                delta = texts.push(ids)
                text_tokens += len(ids)
                end = None
                if done and error is None:
                    pre = sess.prefill
                    end = AnswerEnd(text=texts.text, steps=steps, text_tokens=text_tokens, frames=sess.frames_sent,
                                    queue_ms=queue_ms, prompt_tokens=prompt.shape[0],
                                    cached_tokens=0 if pre is None else pre.cached_tokens,
                                    audio_prompt_tokens=n_audio, dropped_turns=dropped,
                                    finish_reason="length" if steps >= max_steps else "stop",
                                    codec_channels=self.model.layout.num_codec_channels,
                                    text_ids=tuple(texts.ids))
                yield AnswerChunk(text=delta, pcm=np.concatenate(pcm) if pcm else None, end=end, error=error)
        finally:
            if not done:  # the caller went away (or was cancelled) mid-answer: free the session's rows
                sess.cancelled = True
                self._to_cancel.append(sess)
                self._wake.set()
                self.metrics.cancelled_sessions.inc(tags={"reason": "client_gone"})

    # ------------------------------------------------------------------------------------ prompts
    def _prompt(self, conv: Conversation, speech: bool, max_steps: int
                ) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        """The conversation as training and evaluation build a prompt (deepomni.model.prompt): the task's
        instruction (or the client's system text) on the SYSTEM slot, then the turns, earlier answers as
        their text. Returns ``(prompt [L, C], speech [n, D] of the kept turns or None, turns dropped, n)``.

        When the prompt and ``max_steps`` would not fit ``max_context`` (and the engine's rows), the oldest
        exchanges are dropped, and where to cut is chosen so the kept context keeps paying off: a cut whose
        prompt extends a context this replica kept (the cut an earlier turn of this conversation made), else
        one leaving a quarter of the room free, so the next turns extend this prompt instead of shifting it
        again (a stateless client sends its whole history every time: the same rule finds the same cut).
        Raises ``ValueError`` when the last turn alone does not fit."""
        from deepomni.data.sequences import INSTRUCTIONS
        from deepomni.model.prompt import Turn, conversation, fitting_starts, prompt_length

        tok, lay = self.tok, self.model.layout
        if not conv.turns or conv.turns[-1].role != "user":
            raise ValueError("a conversation ends with the user's turn")
        task = conv.task or ("spoken_qa" if speech or conv.turns[-1].audio_ND is not None else "text_qa")
        system = tok.encode(conv.system if conv.system is not None else INSTRUCTIONS[task])
        turns = []
        for t in conv.turns:
            if t.text_ids is not None:
                ids = tuple(t.text_ids)
            else:
                ids = None if t.text is None and t.audio_ND is not None else tuple(tok.encode(t.text or ""))
            turns.append(Turn(t.role, ids, None if t.audio_ND is None else int(t.audio_ND.shape[0])))
        room = min(self.cfg.max_context, self.engine.max_len - 1 - max_steps)

        def from_turn(i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            speech_ND = [torch.from_numpy(np.asarray(t.audio_ND, dtype=np.float32)) for t in conv.turns[i:]
                         if t.audio_ND is not None]
            return conversation(lay, turns[i:], system), torch.cat(speech_ND) if speech_ND else None

        fits = fitting_starts(lay, turns, room, system)
        if not fits:
            need = prompt_length(lay, turns[[i for i, t in enumerate(turns) if t.role == "user"][-1]:], system)
            raise ValueError(f"the last turn alone takes {need} positions; with max_steps {max_steps} the context "
                             f"holds {room}")
        first = fits[0]
        if first > 0:  # something must go: see the docstring
            kept = [i for i in fits if self.engine.prefixes.peek(*from_turn(i))]
            roomy = [i for i in fits if prompt_length(lay, turns[i:], system) <= room * 3 // 4]
            first = (kept or roomy or fits[-1:])[0]
        prompt, audio = from_turn(first)
        return prompt, audio, first, 0 if audio is None else audio.shape[0]

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
                t = time.perf_counter()
                events = await asyncio.to_thread(self.engine.step)
                self._step_s = 0.9 * self._step_s + 0.1 * (time.perf_counter() - t)
                self._route(events)
                self._send_to_vocoder()
                self._flush_metrics()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not leave sessions waiting forever: fail them, keep serving
                log.exception("Backbone step failed")
                for sess in [*self._sessions.values(), *self._inbox]:
                    self._fail(sess, AnswerError("internal_error", f"generation failed: {e}"))
                self._inbox.clear()
                await asyncio.sleep(0.01)  # a fault that repeats must not spin the replica's loop

    def _admit_and_cancel(self) -> None:
        from deepomni.serve.engine import Overloaded

        for sess in self._inbox:
            if sess.cancelled:
                continue
            try:
                sess.sid = self.engine.submit(sess.request)
            except ValueError as e:
                sess.queue.put_nowait(("error", AnswerError("prompt_too_long", str(e))))
                continue
            except Overloaded as e:  # refused at once: the queue stays bounded (docs/serving.md "Overload")
                self._overloaded += 1
                retry = min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, math.ceil(e.steps_to_free * self._step_s)))
                sess.queue.put_nowait(("error", AnswerError(
                    "overloaded", f"the server is overloaded: {e.waiting} sessions already wait for the model "
                                  f"(max_queued={e.max_queued}); try again in {retry} s", retry)))
                continue
            self._sessions[sess.sid] = sess
        self._inbox.clear()
        for sess in self._to_cancel:
            if sess.sid is not None and self._sessions.pop(sess.sid, None) is not None:
                self.engine.cancel(sess.sid)
        self._to_cancel.clear()

    def _fail(self, sess: _Session, error: AnswerError) -> None:
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
            elif ev.kind == "prefill":
                sess.prefill = ev
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
                items.append(VocodeItem(state=sess.codec_state, codes_KF=codes, final=sess.end_step is not None))
                sess.frames_sent += len(sess.frames)
                sess.frames, sess.vocoding = [], True
            self._vocoder_calls += 1
            asyncio.get_running_loop().create_task(self._vocode(batch, items))

    async def _vocode(self, batch: list[_Session], items: list[VocodeItem]) -> None:
        failed: AnswerError | None = None  # the whole call's failure
        response = self.vocoder.decode.remote(items)
        try:
            results: list[VocodedAudio | VocodeFailed] = await self._vocoder_result(response)
        except Exception as e:  # the vocoder failed or went away: these answers fail, the others go on
            cause = cause_of(e)
            if cause is None:
                log.exception("Vocoder call failed")
                failed = AnswerError("internal_error", f"the vocoder failed: {e}")
            else:  # its replica died or stalled: Serve replaces it; the next calls go to the new one
                if cause == "replica_died":
                    self._vocoder_lost_at = time.monotonic()
                log.warning("Vocoder call failed (%s): %s; %d answers end", cause, type(e).__name__, len(batch))
                response.cancel()
                r = unavailable("Vocoder", cause, e)
                failed = AnswerError(r.reason, r.message, r.retry_after_s)
            results = [None] * len(batch)
        finally:
            self._vocoder_calls -= 1
        for sess, item, res in zip(batch, items, results):
            sess.vocoding = False
            if sess.cancelled or self._sessions.get(sess.sid) is not sess:
                continue
            if failed is not None:
                self._fail(sess, failed)
                continue
            if isinstance(res, VocodeFailed):
                self._fail(sess, AnswerError("internal_error", res.message))
                continue
            sess.codec_state = res.state
            self._deliver(sess, res.pcm)
            if item.final:
                self._end(sess)
        self._send_to_vocoder()

    async def _vocoder_result(self, response) -> list[VocodedAudio | VocodeFailed]:
        """A Vocoder call's result, bounded: a replica that dies fails its calls at once (Ray raises), but a call
        sent while the deployment has no live replica waits in Serve's router for the replacement. So a call
        waits at most ``START_TIMEOUT_S`` (a slow Vocoder under overload is slow, not gone), and only
        ``VOCODER_LOSS_WAIT_S`` (from its start, or from the loss) once this replica has seen a Vocoder replica
        die within ``START_TIMEOUT_S``: the answers end with an error instead of waiting for the new replica."""
        task = asyncio.ensure_future(response)
        start = time.monotonic()
        try:
            while True:
                deadline = start + START_TIMEOUT_S
                lost = self._vocoder_lost_at
                if lost is not None and lost > start - START_TIMEOUT_S:
                    deadline = min(deadline, max(start, lost) + VOCODER_LOSS_WAIT_S)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise asyncio.TimeoutError
                done, _ = await asyncio.wait({task}, timeout=min(left, 0.25))
                if done:
                    return task.result()
        finally:
            if not task.done():
                task.cancel()

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


def _make_engine(model, max_rows: int, kept_contexts: int, max_queued: int | None = None,
                 prefill_chunk: int | None = None, prepack: bool = False):
    """The one place that knows the continuous-batching engine (``deepomni.serve.engine``)."""
    from deepomni.serve.engine import DEFAULT_PREFILL_CHUNK, BatchEngine

    return BatchEngine(model, max_rows=max_rows, prefix_entries=kept_contexts, max_queued=max_queued,
                       prefill_chunk=prefill_chunk or DEFAULT_PREFILL_CHUNK, prepack=prepack)
