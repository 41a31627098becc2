"""The HTTP / WebSocket front (FastAPI under ``@serve.ingress``); the protocol is ``docs/serving.md``.

One file over 400 lines on purpose: the routes must be methods of the one ``@serve.ingress`` class, and they
share one answer path (:meth:`Ingress._answer`) and its helpers; the surfaces with state of their own live
apart (``realtime.py``, ``openai_routes.py``, ``auth.py``).

One answer, whichever endpoint asked for it (:meth:`Ingress._answer`):

    audio --SpeechEncoder.encode--> speech [n, D] --Backbone.generate (stream)--> text deltas + PCM chunks
          -> the client

(the Backbone sends the codec frames of all its sessions to the Vocoder deployment in batched calls and
streams the PCM that comes back). While the ingress sends one chunk on, the backbone goes on; the next
item it streams holds everything produced meanwhile, so chunks grow when the client is slow. Every
refusal is a :class:`~serve_apps.protocol.Rejection` (HTTP status + reason), counted in
``deepomni_rejected_requests`` by reason. With an API key, :class:`~serve_apps.auth.ApiKeyMiddleware` in front
of the whole app refuses what comes without it (``serve_apps/auth.py``); a Backbone too busy to queue another
session refuses it as ``overloaded`` (503 + ``Retry-After``), as does Serve's backpressure on its handles.
An answer that loses a deployment mid-way (its replica died, or stopped answering: every wait is bounded,
``serve_apps/faults.py``) ends with an ``unavailable`` error in its surface's format (an SSE ``error`` event
once the stream has started) and the ingress goes on serving.
"""


import asyncio
import base64
import logging
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from . import auth, openai_routes
from .faults import START_TIMEOUT_S, cause_of, unavailable
from .loading import AppConfig
from .messages import (AnswerChunk, AudioRejected, BackboneInfo, Conversation, ConversationTurn, EncodedSpeech,
                       EncoderInfo, GenerateOptions)
from .protocol import (AUDIO_FORMAT, WS_INPUT_FORMATS, WS_INVALID_PAYLOAD, WS_MESSAGE_TOO_BIG,
                       WS_POLICY_VIOLATION, WS_UNSUPPORTED_DATA, AnswerOptions, REASONS, Rejection, decode_b64, pcm_s16le,
                       parse_json_object, reject, sse)
from .realtime import RealtimeSession

log = logging.getLogger("ray.serve")
STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "pcm-recorder.js": "text/javascript"}
MAX_TEXT_CHARS = 4000

app = FastAPI(title="DeepOmni", description="Spoken dialogue with a speech-text MoE LM (docs/serving.md)")
app.add_middleware(auth.ApiKeyMiddleware)  # before @serve.ingress freezes the app; the keys: Ingress.__init__


def _status(e: Rejection) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


def _overloaded(e: Exception) -> Rejection:
    """Serve's own backpressure (a deployment's ``max_queued_requests``, config.yaml) as our refusal."""
    retry = getattr(e, "retry_after_s", None)
    return reject("overloaded", "the server is overloaded: too many requests wait for the model; try again "
                  "shortly", max(1, math.ceil(retry)) if retry else 1)


def _native(ev: dict) -> dict:
    """An answer event as our own protocol sends it (JSON): without the float audio and the summary."""
    return {k: v for k, v in ev.items() if k not in ("wav", "summary")}


class _NativeSession:
    """One connection of our own WebSocket protocol (``WS /v1/dialogue/ws``): turns in (audio frames +
    ``end_of_turn``, or ``text``), answers out.

    One answer runs at a time, as a task, so the connection keeps reading while it streams: a new turn or
    ``cancel`` stops the running answer first (barge-in). The connection is one conversation: every turn is
    answered with the earlier ones in context (an interrupted answer counts as the text it had sent)."""

    def __init__(self, ingress: "Ingress", ws: WebSocket):
        self.ing, self.ws = ingress, ws
        self.cfg = ingress.cfg
        self.turn = 0
        self.fmt, self.rate = "pcm_s16le", 16000
        self.opts = AnswerOptions()
        self.buf = bytearray()
        self.task: asyncio.Task | None = None
        self.history: list[ConversationTurn] = []

    async def close(self, code: int, reason: str, why: str) -> None:
        self.ing._rejected(Rejection(400, why, reason), "dialogue_ws")
        await self.stop_answer()
        await self.ws.close(code=code, reason=reason[:120])

    async def run(self) -> None:
        await self.ws.send_json({"type": "ready", **await self.ing.info(), "input_formats": list(WS_INPUT_FORMATS)})
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("bytes") is not None:
                self.buf += msg["bytes"]
                if len(self.buf) > self.cfg.max_body_bytes:
                    return await self.close(WS_MESSAGE_TOO_BIG, f"turn audio over {self.cfg.max_body_bytes} bytes",
                                            "body_too_large")
                continue
            try:
                data = parse_json_object(msg.get("text") or "", "a text frame")
            except Rejection:
                return await self.close(WS_INVALID_PAYLOAD, "text frames must be JSON objects", "malformed_json")
            if not isinstance(data.get("type"), str):
                return await self.close(WS_INVALID_PAYLOAD, "text frames must be JSON objects with a string 'type'",
                                        "malformed_json")
            kind = data["type"]
            if kind == "start_turn":
                fmt, rate = data.get("format", self.fmt), data.get("sample_rate", self.rate)
                if fmt not in WS_INPUT_FORMATS or not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
                    return await self.close(WS_POLICY_VIOLATION, f"start_turn needs format in {list(WS_INPUT_FORMATS)} "
                                            "and a positive integer sample_rate", "protocol_error")
                try:
                    self.opts = AnswerOptions.parse(data, self.cfg.max_steps_limit)
                except Rejection as e:
                    return await self.close(WS_POLICY_VIOLATION, e.message, e.reason)
                self.fmt, self.rate, self.buf = fmt, rate, bytearray()
            elif kind == "end_of_turn":
                if self.fmt == "pcm_s16le" and len(self.buf) % 2:
                    return await self.close(WS_INVALID_PAYLOAD, "pcm_s16le turn audio has an odd number of bytes",
                                            "bad_audio")
                audio, self.buf = bytes(self.buf), bytearray()
                await self.start_answer(audio=audio)
            elif kind == "text":
                text = data.get("text")
                if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
                    return await self.close(WS_POLICY_VIOLATION, "text needs a non-empty 'text' string",
                                            "protocol_error")
                await self.start_answer(text=text)
            elif kind == "cancel":
                await self.stop_answer()
            else:
                return await self.close(WS_UNSUPPORTED_DATA, f"unknown message type {kind!r}", "protocol_error")

    async def stop_answer(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        self.task = None

    async def start_answer(self, audio: bytes | None = None, text: str | None = None) -> None:
        await self.stop_answer()
        self.turn += 1
        self.task = asyncio.get_running_loop().create_task(self.answer(self.turn, audio, text, time.perf_counter()))

    async def answer(self, turn: int, audio: bytes | None, text: str | None, t0: float) -> None:
        ws, events, said = self.ws, None, []
        user, dropped, ids = None, 0, None
        try:
            audio_ND = None
            if audio is not None:
                audio_ND = await self.ing._encode(audio, self.rate if self.fmt == "pcm_s16le" else None)
            user = ConversationTurn("user", text, audio_ND)
            conv = Conversation((*self.history, user), keep=True)
            events = self.ing._answer(conv, self.opts.generate_options(), t0)
            async for ev in events:
                if ev["type"] == "audio":
                    await ws.send_bytes(pcm_s16le(ev["wav"]))
                    continue
                if ev["type"] == "text":
                    said.append(ev["delta"])
                elif ev["type"] == "end":
                    dropped, ids = ev["dropped_turns"], ev["summary"].text_ids
                await ws.send_json({**_native(ev), "turn": turn})
        except Rejection as e:  # a bad turn: said so, counted, and the connection goes on
            self.ing._rejected(e, "dialogue_ws")
            await ws.send_json({"type": "error", "turn": turn, **e.body()["error"]})
            user = None  # a refused turn is not part of the conversation
        except asyncio.CancelledError:
            try:
                await ws.send_json({"type": "end", "turn": turn, "cancelled": True})
            except Exception:
                pass
            raise
        finally:
            if events is not None:
                await events.aclose()
            if user is not None:  # the turns the model no longer reads are forgotten here too
                answer = ConversationTurn("assistant", "".join(said), text_ids=ids)  # ids: a finished answer's
                self.history = [*self.history[dropped:], user, answer]


@serve.deployment(name="Ingress")  # replicas, autoscaling, num_cpus: config.yaml
@serve.ingress(app)
class Ingress:
    def __init__(self, encoder: DeploymentHandle, backbone: DeploymentHandle, cfg: AppConfig):
        from .metrics import ingress_metrics

        from .openai_routes import AudioIds

        self.encoder, self.backbone, self.cfg = encoder, backbone, cfg
        self.metrics = ingress_metrics()
        # the API key (app arg, else this process's DEEPOMNI_API_KEY), for the middleware of this replica's app
        auth.configure(auth.resolve_keys(cfg.api_key), lambda endpoint: self._rejected(
            Rejection(401, "unauthorized", ""), endpoint))
        self.audio_ids = AudioIds()  # spoken chat answers' transcripts, for clients that send them back by id
        self.started = int(time.time())
        self.max_text_chars = MAX_TEXT_CHARS
        self._info: dict | None = None

    async def info(self) -> dict:
        """Sample rate and limits, asked of the deployments once (the Vocoder refuses, when it starts, a codec
        that does not fit the model)."""
        if self._info is None:
            enc: EncoderInfo
            bb: BackboneInfo
            try:  # bounded, as every wait on another deployment (faults.py)
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

    def _rejected(self, e: Rejection, endpoint: str) -> None:
        self.metrics.rejected_requests.inc(tags={"reason": e.reason, "endpoint": endpoint})

    # ------------------------------------------------------------------------------------ plain routes
    @app.get("/healthz")
    async def healthz(self) -> Response:
        try:  # bounded: while a replica is being replaced the probe says so instead of hanging
            info, stats = await asyncio.wait_for(asyncio.gather(self.info(), self.backbone.stats.remote()),
                                                 self.cfg.stall_timeout_s)
        except Exception as e:
            if not isinstance(e, Rejection) and cause_of(e) is None:
                raise
            why = e if isinstance(e, Rejection) else unavailable("Backbone", cause_of(e), e)
            return JSONResponse({"status": "unavailable", "error": why.message}, 503, headers=why.headers())
        return JSONResponse({"status": "ok", **info, "backbone": stats})

    @app.get("/")
    async def index(self) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(self, name: str) -> Response:
        if name not in STATIC_FILES:
            return JSONResponse({"error": {"reason": "not_found", "message": f"no static file {name!r}"}}, 404)
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])

    # ------------------------------------------------------------------------------------ POST /v1/dialogue
    @app.post("/v1/dialogue")
    async def dialogue(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            audio, pcm_rate, text, opts = await self._parse_dialogue(request)
            audio_ND = await self._encode(audio, pcm_rate) if audio is not None else None
            events = self._answer(Conversation.single(audio_ND, text), opts.generate_options(), t0)
            first = await events.__anext__()  # a refusal by the backbone is still a plain 4xx here
        except Rejection as e:
            self._rejected(e, "dialogue")
            return _status(e)

        async def body() -> AsyncIterator[bytes]:
            try:
                yield sse(first["type"], first)
                async for ev in events:
                    if ev["type"] == "audio":
                        ev = _native(ev) | {"pcm_b64": base64.b64encode(pcm_s16le(ev["wav"])).decode()}
                    yield sse(ev["type"], _native(ev))
            except Rejection as e:  # after the 200 (a deployment failed mid-answer): an error event ends the stream
                self._rejected(e, "dialogue")
                yield sse("error", e.body()["error"])
            finally:  # the client went away: close the answer, which cancels the backbone session
                await events.aclose()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _parse_dialogue(self, request: Request) -> tuple[bytes | None, int | None, str | None, AnswerOptions]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        is_json = ctype == "application/json" or ctype.endswith("+json")
        if not (is_json or ctype.startswith("audio/") or ctype == "application/octet-stream"):
            raise reject("unsupported_media_type", f"Content-Type {ctype or '(none)'!r} is not accepted: send "
                         f"audio bytes as audio/* (audio/wav, audio/flac, ...) or a JSON body as application/json")
        body = await self._read_body(request)
        if not is_json:
            opts = AnswerOptions.parse(dict(request.query_params), self.cfg.max_steps_limit)
            return body, None, None, opts
        data = parse_json_object(body, "the body")
        opts = AnswerOptions.parse(data, self.cfg.max_steps_limit)
        has_audio, text = data.get("audio_b64") is not None, data.get("text")
        if has_audio == (text is not None):
            raise reject("bad_request", "give exactly one of audio_b64 (a spoken question) and text (a written one)")
        if text is not None:
            if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
                raise reject("bad_request", f"text must be a non-empty string of at most {MAX_TEXT_CHARS} characters")
            return None, None, text, opts
        audio = decode_b64(data["audio_b64"])
        fmt = data.get("format", "file")
        if fmt == "file":
            return audio, None, None, opts
        if fmt != "pcm_s16le":
            raise reject("bad_request", f"format must be 'file' or 'pcm_s16le', got {fmt!r}")
        rate = data.get("sample_rate")
        if not isinstance(rate, int) or isinstance(rate, bool):
            raise reject("bad_request", "format pcm_s16le needs an integer sample_rate")
        if len(audio) % 2:
            raise reject("bad_audio", f"pcm_s16le audio must have an even number of bytes, got {len(audio)}")
        return audio, rate, None, opts

    async def _read_body(self, request: Request) -> bytes:
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

    # ------------------------------------------------------------------------------------ one answer
    async def _encode_speech(self, audio: bytes, pcm_rate: int | None) -> EncodedSpeech:
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

    async def _encode(self, audio: bytes, pcm_rate: int | None) -> np.ndarray:
        return (await self._encode_speech(audio, pcm_rate)).audio_ND

    async def _answer(self, conv: Conversation, opts: GenerateOptions, t0: float) -> AsyncIterator[dict]:
        """Events of one answer, whichever surface asked: ``start``, ``text``, ``audio`` (``wav``: float32
        at the codec's ``sample_rate``), ``end`` (with the answer's :class:`AnswerEnd` as ``summary``).
        A refusal is raised as :class:`Rejection` before ``start``. Closing this generator early (client
        gone) cancels the backbone stream and so the session."""
        info = await self.info()
        sr = info["sample_rate"]
        stream = self.backbone.options(stream=True).generate.remote(conv, opts)
        seq, samples, finished = 0, 0, False
        first_audio = last_audio = None
        try:
            started = got_any = False
            while True:
                try:  # bounded: the Backbone sends a keepalive every second while the answer waits (faults.py)
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
                    log.warning("Backbone stream failed (%s): %s", cause, type(e).__name__)
                    raise unavailable("Backbone", cause, e) from e
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
                           "dropped_turns": end.dropped_turns, "summary": end}
                    return
        except BackPressureError as e:  # Serve refused the call: the Backbone's max_queued_requests (config.yaml)
            raise _overloaded(e) from e
        finally:
            if not finished:
                stream.cancel()

    # ------------------------------------------------------------------------------------ OpenAI-compatible
    # (serve_apps/openai_routes.py; docs/serving.md "OpenAI-compatible API")
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await openai_routes.chat_completions(self, request)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(self, request: Request) -> Response:
        return await openai_routes.transcriptions(self, request)

    @app.post("/v1/audio/speech")
    async def speech(self, request: Request) -> Response:
        return await openai_routes.speech(self, request)

    @app.get("/v1/models")
    async def models(self) -> Response:
        return openai_routes.models(self)

    @app.get("/v1/models/{model_id}")
    async def model(self, model_id: str) -> Response:
        return openai_routes.model(self, model_id)

    @app.websocket("/v1/realtime")
    async def realtime(self, ws: WebSocket) -> None:  # OpenAI's Realtime API (serve_apps/realtime.py)
        await ws.accept(subprotocol=auth.accept_subprotocol(ws.scope.get("subprotocols")))
        await RealtimeSession(self, ws).run()

    # ------------------------------------------------------------------------------------ WS /v1/dialogue/ws
    @app.websocket("/v1/dialogue/ws")
    async def dialogue_ws(self, ws: WebSocket) -> None:
        await ws.accept(subprotocol=auth.accept_subprotocol(ws.scope.get("subprotocols")))
        session = _NativeSession(self, ws)
        try:
            await session.run()
        except WebSocketDisconnect:
            pass
        finally:
            await session.stop_answer()
