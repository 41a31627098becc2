"""The one answering API of the Ingress: what every surface calls, and the only code that calls the
SpeechEncoder and the Backbone.

    answers = Answers(encoder, backbone, cfg)                    # one per Ingress replica
    heard = answers.hear(audio, pcm_rate)                        # the encoder's call, not awaited
    turn = ConversationTurn("user", heard=0)                     # its speech: heard[0]
    first, events = await answers.start(Conversation((*history, turn)), options, t0, [heard])
    async for ev in events: ...                                  # text, audio, end (``first`` is start)

The surfaces are thin adapters over it, as vLLM's servers are over its engine: each turns its requests
into a :class:`~deepomni.serve.messages.Conversation` and
:class:`~deepomni.serve.messages.GenerateOptions` and the events into its own wire format, and none calls
a deployment itself:

    ingress.py         POST /v1/dialogue, WS /v1/dialogue/ws (our protocol), GET /healthz
    openai_routes.py   POST /v1/chat/completions, /v1/audio/transcriptions, /v1/audio/speech
    realtime.py        WS /v1/realtime (OpenAI Realtime)

One answer (:meth:`Answers.answer`) is a stream of events, whichever surface asked for it: ``start``
(``sample_rate``, ``format``, ``speech``), ``text`` (``delta``), ``audio`` (``wav``: float32 at the codec's
``sample_rate``, ``seq``), ``end`` (the counts, latencies and ``dropped_turns``, with the Backbone's
:class:`~deepomni.serve.messages.AnswerEnd` as ``summary``). The Backbone sends the codec frames of all its
sessions to the Vocoder deployment in batched calls and streams the PCM that comes back; while a surface
sends one chunk on, the Backbone goes on, so the next event holds everything produced meanwhile and chunks
grow when the client is slow.

Every refusal is a :class:`~serve_apps.protocol.Rejection` (HTTP status + reason), each surface's own
format of it aside (``OpenAIError``), counted by :meth:`Answers.rejected` in ``deepomni_rejected_requests``
by reason and endpoint: audio the encoder refuses (``not_audio``, ``audio_too_long``, ...), a prompt the
Backbone refuses, Serve's backpressure on a handle (a deployment's ``max_queued_requests``, config.yaml)
and a Backbone too busy to queue another session (``overloaded``: 503 + ``Retry-After``), a deployment
lost mid-answer (its replica died, or stopped answering: every wait is bounded, ``serve_apps/fault_handling.py``)
as ``unavailable``. A refusal before ``start`` is raised by :meth:`Answers.start`, so a surface can still
answer it with a plain 4xx / 5xx; one after it ends the stream in the surface's format.

A turn reaches the encoder and the Backbone through :meth:`Answers.hear` / :meth:`Answers.encode` and
:meth:`Answers.answer` only (:meth:`Answers.info` and :meth:`Answers.health` ask them for their settings and
stats). **The features skip the Ingress** where a turn is answered at once: :meth:`Answers.hear` starts the
encoder's call and its ``DeploymentResponse`` goes, unopened, as an argument of the Backbone's call, which
Serve resolves there (the projected speech goes from the encoder's replica to the Backbone's; a refusal comes
back as the Backbone's first chunk, before ``start``): ``POST /v1/dialogue``, chat completions,
transcriptions and ``WS /v1/dialogue/ws`` (whose history keeps its spoken turns' responses, passed on with
every answer). Realtime encodes its items (:meth:`Answers.encode`) and holds their speech as ``audio_ND``:
it joins a speaker's consecutive items into one turn and reports a refused item when it is committed, as
its API says.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from deepomni.serve.config import AppConfig
from deepomni.serve.messages import (AnswerChunk, AudioRejected, BackboneInfo, Conversation, EncodedSpeech, EncoderInfo,
                                     GenerateOptions)

from .fault_handling import START_TIMEOUT_S, cause_of, unavailable
from .metrics import ingress_metrics
from .protocol import AUDIO_FORMAT, REASONS, Rejection, reject

if TYPE_CHECKING:
    from starlette.requests import Request

    from .openai_api import OpenAIError

log = logging.getLogger("ray.serve")
MAX_TEXT_CHARS = 4000  # a written turn's limit, on every surface


def _overloaded(e: Exception) -> Rejection:
    """Serve's own backpressure (a deployment's ``max_queued_requests``, config.yaml) as our refusal."""
    retry = getattr(e, "retry_after_s", None)
    return reject("overloaded", "the server is overloaded: too many requests wait for the model; try again "
                  "shortly", max(1, math.ceil(retry)) if retry else 1)


async def _any_failed(responses: Sequence[DeploymentResponse]) -> bool:
    """Whether one of these encoder calls failed because its replica was lost (one still running is not)."""
    for r in responses:
        try:
            await asyncio.wait_for(r, 0.1)
        except asyncio.TimeoutError:
            continue
        except Exception as e:
            if cause_of(e) is not None:
                return True
    return False


class Answers:
    """Encoding and answering for one Ingress replica, over the handles of its SpeechEncoder and Backbone
    deployments (see the module docstring). ``cfg``'s limits are the surfaces' too: ``max_body_bytes``,
    ``max_steps_limit``, ``stall_timeout_s``."""

    def __init__(self, encoder: DeploymentHandle, backbone: DeploymentHandle, cfg: AppConfig):
        self.encoder, self.backbone, self.cfg = encoder, backbone, cfg
        self.max_text_chars = MAX_TEXT_CHARS
        self.metrics = ingress_metrics()
        self._info: dict | None = None

    # ------------------------------------------------------------------------------------ the server
    async def info(self) -> dict:
        """Sample rate and limits, asked of the deployments once (the Vocoder refuses, when it starts, a codec
        that does not fit the model). :class:`Rejection` ``unavailable`` when they do not answer."""
        if self._info is None:
            enc: EncoderInfo
            bb: BackboneInfo
            try:  # bounded, as every wait on another deployment (fault_handling.py)
                enc, bb = await asyncio.wait_for(asyncio.gather(self.encoder.info.remote(),
                                                                self.backbone.info.remote()), START_TIMEOUT_S)
            except Exception as e:
                if cause_of(e) is None:
                    raise
                raise unavailable("Backbone", cause_of(e), e) from e
            self._info = {"sample_rate": bb.codec.sample_rate, "format": AUDIO_FORMAT, "codec": bb.codec.codec,
                          "frame_rate": bb.codec.frame_rate, "codec_channels": bb.num_codec_channels,
                          "max_seconds": enc.max_seconds, "max_body_bytes": self.cfg.max_body_bytes,
                          "max_steps": self.cfg.max_steps, "max_steps_limit": self.cfg.max_steps_limit}
        return self._info

    async def health(self) -> dict:
        """:meth:`info` and the Backbone's ``stats``, within ``stall_timeout_s``: while a replica is being
        replaced a probe says so (:class:`Rejection` ``unavailable``) instead of hanging."""
        try:
            info, stats = await asyncio.wait_for(asyncio.gather(self.info(), self.backbone.stats.remote()),
                                                 self.cfg.stall_timeout_s)
        except Exception as e:
            if isinstance(e, Rejection) or cause_of(e) is None:
                raise
            raise unavailable("Backbone", cause_of(e), e) from e
        return {**info, "backbone": stats}

    def rejected(self, e: Rejection | OpenAIError, endpoint: str) -> None:
        """Count a refusal (``deepomni_rejected_requests``) by its reason and the endpoint that gave it."""
        self.metrics.rejected_requests.inc(tags={"reason": e.reason, "endpoint": endpoint})

    async def read_body(self, request: Request) -> bytes:
        """A request's body, refused (``body_too_large``) as soon as it is over ``max_body_bytes``: by its
        ``Content-Length`` before reading, or while reading when it has none (chunked)."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = reject("body_too_large", f"the body is over the limit of {limit} bytes")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise too_big
        return bytes(buf)

    # ------------------------------------------------------------------------------------ one turn's speech
    async def encode(self, audio: bytes, pcm_rate: int | None = None) -> EncodedSpeech:
        """A spoken turn through the SpeechEncoder: an audio file's bytes (``pcm_rate`` None) or raw pcm16 at
        ``pcm_rate``. Audio it refuses is a :class:`Rejection` with its reason (``not_audio``,
        ``audio_too_long``, ...); a full queue is ``overloaded``, a lost replica ``unavailable``."""
        response = self.encoder.encode.remote(audio, pcm_rate)
        try:
            out: EncodedSpeech | AudioRejected = await asyncio.wait_for(response, START_TIMEOUT_S)
        except BackPressureError as e:
            raise _overloaded(e) from e
        except Exception as e:
            cause = cause_of(e)
            if cause is None:
                raise
            response.cancel()
            raise unavailable("SpeechEncoder", cause, e) from e
        if isinstance(out, AudioRejected):
            raise reject(out.reason, out.message)
        return out

    def hear(self, audio: bytes, pcm_rate: int | None = None) -> DeploymentResponse:
        """Start encoding a spoken turn, without waiting for it: the response goes to :meth:`answer` in its
        ``heard`` (the turn names it by index, ``ConversationTurn.heard``) and on to the Backbone unopened, so
        the features travel from the encoder to the Backbone, not through this replica. A refusal comes back
        from :meth:`start` with the encoder's reason, as :meth:`encode`'s would."""
        return self.encoder.encode.remote(audio, pcm_rate)

    async def encode_all(self, audios: Sequence[bytes], pcm_rate: int | None = None) -> list[EncodedSpeech]:
        """:meth:`encode` of several parts at once (the encoder batches the calls that arrive together)."""
        return list(await asyncio.gather(*[self.encode(a, pcm_rate) for a in audios]))

    # ------------------------------------------------------------------------------------ one answer
    async def start(self, conv: Conversation, opts: GenerateOptions, t0: float,
                    heard: Sequence[DeploymentResponse] = ()) -> tuple[dict, AsyncIterator[dict]]:
        """:meth:`answer` up to its ``start`` event: a refusal by the Backbone (prompt too long, overloaded) or
        of a heard turn's audio is raised here, before a surface has sent anything, so that it is still a
        plain 4xx / 5xx. Returns the ``start`` event and the rest of the events."""
        events = self.answer(conv, opts, t0, heard)
        return await events.__anext__(), events

    async def answer(self, conv: Conversation, opts: GenerateOptions, t0: float,
                     heard: Sequence[DeploymentResponse] = ()) -> AsyncIterator[dict]:
        """Events of one answer (module docstring), ``t0`` being when the request arrived (the latency
        metrics'). ``heard``: :meth:`hear`'s responses, named by the turns (``ConversationTurn.heard``). A
        refusal is raised as :class:`Rejection` before ``start``; a deployment lost mid-answer as
        ``unavailable``. Closing this generator early (client gone, barge-in) cancels the Backbone stream
        and so its session."""
        info = await self.info()
        sr = info["sample_rate"]
        stream = self.backbone.options(stream=True).generate.remote(conv, opts, *heard)
        seq, samples, finished = 0, 0, False
        first_audio = last_audio = None
        try:
            started = got_any = False
            while True:
                try:  # bounded: the Backbone sends a keepalive every second while the answer waits (fault_handling.py)
                    wait = self.cfg.stall_timeout_s if got_any else START_TIMEOUT_S  # the first may wait for a replica
                    item: AnswerChunk = await asyncio.wait_for(stream.__anext__(), wait)
                    got_any = True
                except StopAsyncIteration:
                    break
                except BackPressureError:
                    raise
                except Exception as e:  # the Backbone replica died or stalled: the answer ends with an error
                    cause = cause_of(e)
                    if cause is None:  # a bug: logged, and still a clean error for the client
                        log.exception("Backbone stream failed")
                        raise reject("internal_error", f"generation failed: {type(e).__name__}") from e
                    # before the first item, the heard turns' encoder calls may be what failed (Serve resolves
                    # them for the Backbone call): name the deployment that was lost
                    lost = "SpeechEncoder" if not got_any and await _any_failed(heard) else "Backbone"
                    log.warning("%s call failed (%s): %s", lost, cause, type(e).__name__)
                    raise unavailable(lost, cause, e) from e
                if item.keepalive:
                    continue
                if item.error is not None:
                    reason = item.error.reason
                    raise reject(reason if reason in REASONS else "internal_error", item.error.message,
                                 item.error.retry_after_s)
                if not started:
                    started = True
                    yield {"type": "start", "sample_rate": sr, "format": AUDIO_FORMAT, "speech": opts.speech}
                if item.text:
                    yield {"type": "text", "delta": item.text}
                end, wav = item.end, item.pcm
                if opts.speech and wav is not None and len(wav):
                    now = time.perf_counter()
                    if first_audio is None:
                        first_audio = now
                        self.metrics.time_to_first_audio_seconds.observe(now - t0)
                    else:
                        self.metrics.audio_chunk_gap_seconds.observe(now - last_audio)
                    last_audio = now
                    samples += len(wav)
                    yield {"type": "audio", "seq": seq, "sample_rate": sr, "format": AUDIO_FORMAT,
                           "samples": len(wav), "wav": wav}
                    seq += 1
                if end is not None:
                    elapsed = time.perf_counter() - t0
                    audio_s = samples / sr
                    rtf = elapsed / audio_s if audio_s else None
                    if rtf is not None:
                        self.metrics.real_time_factor.observe(rtf)
                    finished = True
                    yield {"type": "end", "text": end.text, "steps": end.steps,
                           "text_tokens": end.text_tokens, "frames": end.frames, "audio_chunks": seq,
                           "audio_seconds": round(audio_s, 4), "elapsed_ms": round(elapsed * 1e3, 2),
                           "ttfa_ms": None if first_audio is None else round((first_audio - t0) * 1e3, 2),
                           "queue_ms": end.queue_ms, "rtf": None if rtf is None else round(rtf, 4),
                           "prompt_tokens": end.prompt_tokens, "cached_tokens": end.cached_tokens,
                           "dropped_turns": end.dropped_turns, "expert_share": end.expert_share, "summary": end}
                    return
        except BackPressureError as e:  # Serve refused the call: the Backbone's max_queued_requests (config.yaml)
            raise _overloaded(e) from e
        finally:
            if not finished:
                stream.cancel()
