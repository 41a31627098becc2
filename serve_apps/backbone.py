"""The Backbone deployment: the MoE LLM under the answer loop (:class:`deepomni.serve.answer_loop.AnswerLoop`).

A thin Ray adapter. The loop (engine stepping, session streams, prompt fitting, admission and overload,
batched vocoder calls) is Ray-free and lives once in ``deepomni/serve/answer_loop.py``, where the in-process
benchmarks run the same code; the messages are ``deepomni/serve/messages.py``. This replica gives the loop
what is Ray's:

* its vocoder (:class:`_VocoderCalls`): a call to the Vocoder deployment per loop call, every call bounded
  (:meth:`_VocoderCalls._result`); one that fails because its replica died or stalled ends the answers in it
  with an ``unavailable`` error at once (``serve_apps/fault_handling.py``);
* its metrics (:class:`_ServeMetrics`): the Backbone's Ray Serve metrics (``serve_apps/metrics.py``);
* the keepalive: a stream sends a keepalive chunk every ``KEEPALIVE_S`` while its answer waits, so the
  ingress can bound its wait for the next chunk.

Replicas and autoscaling: ``config.yaml``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import torch
from ray import serve

from deepomni.serve.answer_loop import AnswerLoop, LoopMetrics, VocoderUnavailable
from deepomni.serve.config import AppConfig
from deepomni.serve.messages import (AnswerChunk, AnswerError, AudioRejected, BackboneInfo, CodecInfo, Conversation,
                                     EncodedSpeech, GenerateOptions, VocodedAudio, VocodeFailed, VocodeItem)

from .fault_handling import KEEPALIVE_S, START_TIMEOUT_S, VOCODER_LOSS_WAIT_S, cause_of, unavailable
from .loading import load_serving_model

log = logging.getLogger("ray.serve")


@serve.deployment(name="Backbone")
class Backbone:
    def __init__(self, cfg: AppConfig, vocoder=None):
        """``vocoder``: the Vocoder deployment's handle (``None``: text answers only, as in unit tests)."""
        cfg.setup_torch()
        self.cfg, self.vocoder = cfg, vocoder
        self.model = load_serving_model(cfg, "backbone")  # no speech encoder: the SpeechEncoder replicas hold it
        # the checkpoint's modality experts (experts.json; the random preset has none): each answer's end says
        # which share of its routed tokens went to speech and to text experts, per MoE layer (the page draws
        # it). Only a summary: an assignment that does not fit the model is logged and left out.
        from pathlib import Path

        from deepomni.model.modality import ExpertAssignment, moe_layers

        experts, path = None, Path(cfg.checkpoint or "") / "experts.json"
        if cfg.checkpoint and path.is_file():
            try:
                experts = ExpertAssignment.load(path)
                experts.validate(sorted(moe_layers(self.model)))
            except ValueError as e:
                log.warning("%s left out: %s", path, e)
                experts = None
        self.loop = AnswerLoop.from_config(self.model, cfg, vocoder=None if vocoder is None else _VocoderCalls(vocoder),
                                           metrics=_ServeMetrics(), keepalive_s=KEEPALIVE_S, log=log, experts=experts)
        self._codec_info: CodecInfo | None = None
        self.loop.warm_up()

    async def info(self) -> BackboneInfo:
        if self.vocoder is not None and self._codec_info is None:
            self._codec_info = await self.vocoder.info.remote()
        return BackboneInfo(num_codec_channels=self.model.layout.num_codec_channels,
                            codebook_size=self.model.cfg.codebook_size, hidden_size=self.model.cfg.hidden_size,
                            max_len=self.loop.engine.max_len, codec=self._codec_info)

    def stats(self) -> dict[str, int]:
        """The engine's counters and this replica's sessions and vocoder calls in flight (``/healthz`` shows
        them as they are)."""
        return self.loop.stats()

    async def generate(self, conv: Conversation, options: GenerateOptions = GenerateOptions(),
                       *heard: EncodedSpeech | AudioRejected) -> AsyncIterator[AnswerChunk]:
        """Stream the answer to a conversation (:meth:`AnswerLoop.generate`): chunks, each with everything
        produced since the last one; the last has ``end`` or ``error``. Audio needs a vocoder; without one,
        ``speech`` is off. A caller that stops consuming (client gone) cancels its session.

        ``heard``: the SpeechEncoder's results for the turns that name them (``ConversationTurn.heard``),
        passed by the Ingress as the encoder's responses, which Serve resolves here: the features come from
        the encoder's replica (its node's object store), not through the Ingress. Audio the encoder refused
        ends the answer at once with its reason (the Ingress answers 422, as for any refusal before start)."""
        seconds = 0.0
        if heard:
            heard_conv = conv.with_heard(heard)
            if isinstance(heard_conv, AudioRejected):
                yield AnswerChunk(error=AnswerError(heard_conv.reason, heard_conv.message))
                return
            conv, seconds = heard_conv, sum(h.seconds for h in heard)
        answer = self.loop.generate(conv, options)
        try:
            async for chunk in answer:
                if chunk.end is not None and seconds:  # the audio's duration, which only the encoder measured
                    chunk = dataclasses.replace(chunk, end=dataclasses.replace(chunk.end, heard_seconds=seconds))
                yield chunk
        finally:  # closed mid-answer (client gone): the loop's stream frees the session's rows now, not at GC
            await answer.aclose()


class _VocoderCalls:
    """The Vocoder deployment as the answer loop's vocoder: one deployment call per loop call, bounded, and
    a call whose replica died or stalled raised as :class:`VocoderUnavailable` (``unavailable``)."""

    def __init__(self, handle):
        self.handle = handle
        self.lost_at: float | None = None  # when a Vocoder call last failed because its replica died

    async def decode(self, items: list[VocodeItem]) -> list[VocodedAudio | VocodeFailed]:
        response = self.handle.decode.remote(items)
        try:
            return await self._result(response)
        except Exception as e:
            cause = cause_of(e)
            if cause is None:  # not a lost replica: the loop ends these answers with internal_error
                raise
            # its replica died or stalled: Serve replaces it; the next calls go to the new one
            if cause == "replica_died":
                self.lost_at = time.monotonic()
            log.warning("Vocoder call failed (%s): %s; %d answers end", cause, type(e).__name__, len(items))
            response.cancel()
            r = unavailable("Vocoder", cause, e)
            raise VocoderUnavailable(AnswerError(r.reason, r.message, r.retry_after_s)) from e

    async def _result(self, response) -> list[VocodedAudio | VocodeFailed]:
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
                lost = self.lost_at
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


class _ServeMetrics(LoopMetrics):
    """The answer loop's counters as the Backbone's Ray Serve metrics (made inside the replica: Serve tags them)."""

    def __init__(self):
        from .metrics import backbone_metrics

        self.m = backbone_metrics()

    def sessions(self, active: int, queued: int) -> None:
        self.m.active_sessions.set(active, tags={"state": "active"})
        self.m.active_sessions.set(queued, tags={"state": "queued"})

    def generated_tokens(self, channel: str, n: int) -> None:
        self.m.generated_tokens.inc(n, tags={"channel": channel})

    def expert_load(self, modality: str, load_LE: torch.Tensor, layer_ids: list[int]) -> None:
        for layer, expert in torch.nonzero(load_LE).tolist():
            self.m.expert_routed_tokens.inc(int(load_LE[layer, expert]), tags={
                "layer": str(layer_ids[layer]), "expert": str(expert), "modality": modality})

    def cancelled(self, reason: str) -> None:
        self.m.cancelled_sessions.inc(tags={"reason": reason})
