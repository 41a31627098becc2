"""One answer loop for every host: conversations in, streamed answers (text deltas and audio) out, Ray-free.

:class:`AnswerLoop` is what answers in the Serve app's Backbone deployment (``serve_apps/backbone.py``, a
thin Ray adapter over it), in ``benchmarks/serve_latency.py``'s in-process pipeline and in
``benchmarks/gpu_check.py``'s serving section: one code, so what the benchmarks measure is what serves.

* **Stepping.** One asyncio task runs ``engine.step()`` (:class:`~deepomni.serve.engine.BatchEngine`) in a
  worker thread while any session is live, so the event loop stays free to take new sessions. Sessions join
  and leave the running batch between steps: the engine is only touched there, never while a step runs.
* **Prompts.** A :class:`~deepomni.serve.messages.Conversation` becomes the prompt training and evaluation
  build; where it would not fit, the oldest exchanges go, cut where the kept context keeps paying off
  (:meth:`AnswerLoop._prompt`).
* **Admission.** At most the engine's ``max_queued`` sessions wait for rows
  (:class:`~deepomni.serve.engine.Overloaded`): the next is refused at once with an ``overloaded``
  :class:`~deepomni.serve.messages.AnswerError` whose ``retry_after_s`` estimates when a row frees
  (``docs/serving.md`` "Overload"). A caller that stops consuming its stream (client gone) cancels its session.
* **Audio.** The codec frames the steps release go to the vocoder as they come: one call carries every
  session's new frames (one batched decode, a :class:`~deepomni.serve.messages.VocodeItem` per session), at
  most ``VOCODER_CALLS_IN_FLIGHT`` calls are out, and while they run the next frames pile up for the next
  call, so the calls grow with the load instead of falling behind. After a session's first audio its frames
  go in chunks of at least ``MIN_CHUNK_FRAMES`` (every call costs a hop). A speech answer's text deltas
  travel with its audio.
* **Streams.** :meth:`AnswerLoop.generate` yields :class:`~deepomni.serve.messages.AnswerChunk`, each with
  everything that arrived since the caller last read; the last has ``end`` or ``error``. With
  ``keepalive_s``, a keepalive chunk goes out that often while the answer waits (for rows, for audio), so a
  caller can bound its wait for the next chunk.
* **Experts.** The engine counts each session's routed (token, expert) pairs per MoE layer
  (:meth:`~deepomni.serve.engine.BatchEngine.expert_load_of`); an answer's end carries them summed up against
  the checkpoint's modality expert assignment (``experts``: the share of each layer's pairs on its speech
  experts and on its text experts, :func:`~deepomni.model.modality.expert_share`), ``AnswerEnd.expert_share``.

What differs between hosts is injected: the vocoder (:class:`Vocoder`; the Backbone's calls the Vocoder
deployment with a bounded wait and maps Ray's failures to :class:`VocoderUnavailable`, in-process it is a
:class:`~deepomni.serve.vocoder.CodecVocoder`), the metrics (:class:`LoopMetrics`, no-op here; the Backbone's
writes its Ray Serve metrics), the keepalive period and the logger. Nothing here imports Ray,
``deepomni.audio`` (soundfile, soxr) or ``serve_apps``.

Longer than 450 lines because :class:`AnswerLoop` is one event loop whose parts (stepping, admission, the
vocoder calls, the streams) work on the same sessions' state between engine steps; split, each part would
reach into the others' fields.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..model.generate import Event, GenerationConfig
from ..model.modality import expert_share
from .engine import BatchEngine, Overloaded, Request
from .messages import (RETRY_AFTER_MAX_S, RETRY_AFTER_MIN_S, AnswerChunk, AnswerEnd, AnswerError, Conversation,
                       GenerateOptions, VocodedAudio, VocodeFailed, VocodeItem)

if TYPE_CHECKING:
    from ..model.modality import ExpertAssignment
    from ..model.model import DeepOmniModel
    from ..text import TextTokenizer
    from .config import AppConfig

EXPERT_LOAD_FLUSH_S = 1.0  # how often the expert-load and token counters are pushed to the metrics
MIN_CHUNK_FRAMES = 4  # after a session's first audio, its frames go to the vocoder in chunks of at least this
VOCODER_CALLS_IN_FLIGHT = 2  # per loop; a session is in at most one call at a time


# ------------------------------------------------------------------------------------ what a host injects
class Vocoder(Protocol):
    """Codec frames -> PCM for many sessions per call: one result per item, in order (``VocodeFailed``: that
    item alone failed). A call that raises :class:`VocoderUnavailable` ends its answers with that error; any
    other exception ends them with ``internal_error``."""

    async def decode(self, items: list[VocodeItem]) -> list[VocodedAudio | VocodeFailed]: ...


class VocoderUnavailable(Exception):
    """A vocoder call failed in a way its answers should end with ``error`` (the Serve app: the Vocoder
    replica died or stalled, ``unavailable``), not as a bug."""

    def __init__(self, error: AnswerError):
        super().__init__(error.message)
        self.error = error


class LoopMetrics:
    """Where the loop's counters go. Every method is a no-op here (in-process hosts); the Serve Backbone
    overrides them with its Prometheus metrics (``serve_apps/metrics.py``)."""

    def sessions(self, active: int, queued: int) -> None:
        """Sessions decoding (or prefilling) in the batch, and waiting for rows, now."""

    def generated_tokens(self, channel: str, n: int) -> None:
        """``n`` more tokens on ``channel``: ``text``, or ``speech`` (K codec tokens per frame)."""

    def expert_load(self, modality: str, load_LE: torch.Tensor, layer_ids: list[int]) -> None:
        """Tokens routed to each [MoE layer, expert] since the last call; ``layer_ids[l]``: row l's model layer."""

    def cancelled(self, reason: str) -> None:
        """An answer stopped before its end (``client_gone``: its caller stopped consuming the stream)."""


# ------------------------------------------------------------------------------------ sessions
@dataclass
class _Session:
    """One answer as the loop sees it: the request, where its stream items go, its id once the engine has
    it, and its audio on the way: frames not yet sent to the vocoder, the codec stream state."""

    request: Request
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
    expert_share: dict | None = None  # where its routed tokens went, once decoding ended (AnswerEnd.expert_share)

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


# ------------------------------------------------------------------------------------ the loop
class AnswerLoop:
    """Answers many conversations at once over one :class:`BatchEngine` (see the module docstring).

    ``max_steps``: an answer's decoding steps when its options name none; ``max_context``: the prompt
    positions a conversation may fill. ``vocoder`` None: text answers only. ``experts``: the checkpoint's
    modality expert assignment (``experts.json``), which answers' ``expert_share`` is measured against (None:
    routed pairs only). Lives on one event loop at a time (its stepping task starts with the first
    :meth:`generate` there)."""

    def __init__(self, model: DeepOmniModel, engine: BatchEngine, tokenizer: TextTokenizer, *, max_steps: int = 256,
                 max_context: int = 2048, vocoder: Vocoder | None = None, metrics: LoopMetrics | None = None,
                 keepalive_s: float | None = None, log: logging.Logger | None = None,
                 experts: ExpertAssignment | None = None):
        if experts is not None:
            experts.validate(engine.moe_layer_ids)
        self.experts = experts
        self.model, self.engine, self.tok = model, engine, tokenizer
        self.max_steps, self.max_context = max_steps, max_context
        self.vocoder = vocoder
        self.metrics = metrics or LoopMetrics()
        self.keepalive_s = keepalive_s  # None: no keepalive chunks
        self.log = log or logging.getLogger(__name__)
        self._inbox: list[_Session] = []  # submitted by generate(), handed to the engine between steps
        self._to_cancel: list[_Session] = []
        self._sessions: dict[int, _Session] = {}  # admitted and not yet ended (decoding, or audio on the way)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._vocoder_tasks: set[asyncio.Task] = set()  # held: the event loop keeps only weak references
        self._vocoder_calls = 0  # in flight
        self._step_s = 0.02  # a decoding step's wall time (moving average): Retry-After estimates
        self._overloaded = 0  # sessions refused because max_queued already waited
        self._tokens = {"text": 0, "speech": 0}
        self._flushed_at = time.perf_counter()

    @classmethod
    def from_config(cls, model: DeepOmniModel, cfg: AppConfig, **kw) -> AnswerLoop:
        """The loop with the Serve app's settings (rows, queue, kept contexts, prefill chunk, prepacking,
        tokenizer, max_steps, max_context); ``kw``: the injected parts (``vocoder``, ``metrics``, ...)."""
        from ..text import load_tokenizer

        engine = BatchEngine(model, max_rows=cfg.max_rows, prefix_entries=cfg.kept_contexts,
                             max_queued=cfg.queue_limit(), prefill_chunk=cfg.prefill_chunk,
                             prepack=cfg.prepack_weights)
        return cls(model, engine, load_tokenizer(cfg.tokenizer, model.cfg.text_vocab_size),
                   max_steps=cfg.max_steps, max_context=cfg.max_context, **kw)

    def warm_up(self) -> None:
        """A few decoding steps of a throwaway session: first-call costs here, not in the first user's answer.
        Before the first :meth:`generate` only (it steps the engine itself)."""
        prompt, _, _, _ = self._prompt(Conversation.single(text="warm up"), True, 8)
        sid = self.engine.submit(Request(prompt, None, GenerationConfig(max_steps=8, speech=True, seed=0)))
        for _ in range(8):
            self.engine.step()
        self.engine.cancel(sid)
        self.engine.step()
        self.engine.take_expert_load()

    def stats(self) -> dict[str, int]:
        """The engine's counters and this loop's sessions and vocoder calls in flight."""
        return {**self.engine.stats(), "sessions": len(self._sessions) + len(self._inbox),
                "vocoder_calls": self._vocoder_calls, "max_queued": self.engine.max_queued,
                "overloaded": self._overloaded}

    async def generate(self, conv: Conversation, options: GenerateOptions = GenerateOptions()
                       ) -> AsyncIterator[AnswerChunk]:
        """Stream the answer to a conversation: chunks, each with everything produced since the last one;
        the last has ``end`` or ``error``. Audio needs a vocoder; without one, ``speech`` is off."""
        speech = options.speech and self.vocoder is not None
        max_steps = int(options.max_steps or self.max_steps)
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
                    items = [await asyncio.wait_for(sess.queue.get(), self.keepalive_s)]
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
                                    text_ids=tuple(texts.ids), expert_share=sess.expert_share)
                yield AnswerChunk(text=delta, pcm=np.concatenate(pcm) if pcm else None, end=end, error=error)
        finally:
            if not done:  # the caller went away (or was cancelled) mid-answer: free the session's rows
                sess.cancelled = True
                self._to_cancel.append(sess)
                self._wake.set()
                self.metrics.cancelled("client_gone")

    # ------------------------------------------------------------------------------------ prompts
    def _prompt(self, conv: Conversation, speech: bool, max_steps: int
                ) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        """The conversation as training and evaluation build a prompt (deepomni.model.prompt): the task's
        instruction (or the client's system text) on the SYSTEM slot, then the turns, earlier answers as
        their text. Returns ``(prompt [L, C], speech [n, D] of the kept turns or None, turns dropped, n)``.

        When the prompt and ``max_steps`` would not fit ``max_context`` (and the engine's rows), the oldest
        exchanges are dropped, and where to cut is chosen so the kept context keeps paying off: a cut whose
        prompt extends a context this engine kept (the cut an earlier turn of this conversation made), else
        one leaving a quarter of the room free, so the next turns extend this prompt instead of shifting it
        again (a stateless client sends its whole history every time: the same rule finds the same cut).
        Raises ``ValueError`` when the last turn alone does not fit."""
        from ..data.sequences import INSTRUCTIONS
        from ..model.prompt import Turn, conversation, fitting_starts, prompt_length

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
        room = min(self.max_context, self.engine.max_len - 1 - max_steps)

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

    # ------------------------------------------------------------------------------------ stepping
    def _start_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()  # an Event belongs to the event loop it is first used on
            self._task = loop.create_task(self._run())

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
                self.log.exception("decoding step failed")
                for sess in [*self._sessions.values(), *self._inbox]:
                    self._fail(sess, AnswerError("internal_error", f"generation failed: {e}"))
                self._inbox.clear()
                await asyncio.sleep(0.01)  # a fault that repeats must not spin the event loop

    def _admit_and_cancel(self) -> None:
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
                sess.expert_share = self._expert_share(sid)
            elif ev.kind == "prefill":
                sess.prefill = ev
        for sid, ids in text.items():
            self._sessions[sid].queue.put_nowait(("text", ids))
        for sess in [s for s in self._sessions.values() if s.end_step is not None]:
            if not sess.speech or (sess.frames_sent == 0 and not sess.frames and not sess.vocoding):
                self._end(sess)

    def _expert_share(self, sid: int) -> dict | None:
        """Where the routed tokens of a session that ended at the last step went (its prompt positions run
        and its answer), per MoE layer: :func:`~deepomni.model.modality.expert_share`."""
        load = self.engine.expert_load_of(sid)
        if load is None:
            return None
        return expert_share(load, self.engine.moe_layer_ids, self.model.cfg.num_experts_per_tok, self.experts)

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
            task = asyncio.get_running_loop().create_task(self._vocode(batch, items))
            self._vocoder_tasks.add(task)
            task.add_done_callback(self._vocoder_tasks.discard)

    async def _vocode(self, batch: list[_Session], items: list[VocodeItem]) -> None:
        failed: AnswerError | None = None  # the whole call's failure
        try:
            results: list[VocodedAudio | VocodeFailed | None] = await self.vocoder.decode(items)
        except VocoderUnavailable as e:  # the host says how these answers end (e.g. a lost replica); the others go on
            failed, results = e.error, [None] * len(batch)
        except Exception as e:  # the vocoder failed: these answers fail, the others go on
            self.log.exception("Vocoder call failed")
            failed, results = AnswerError("internal_error", f"the vocoder failed: {e}"), [None] * len(batch)
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

    # ------------------------------------------------------------------------------------ metrics
    def _flush_metrics(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._flushed_at < EXPERT_LOAD_FLUSH_S:
            return
        self._flushed_at = now
        st = self.engine.stats()
        self.metrics.sessions(st["active_sessions"], st["queued"])
        for channel, n in self._tokens.items():
            if n:
                self.metrics.generated_tokens(channel, n)
                self._tokens[channel] = 0
        for modality, load_LE in self.engine.take_expert_load().items():
            self.metrics.expert_load(modality, load_LE, self.engine.moe_layer_ids)
