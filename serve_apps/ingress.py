"""The HTTP / WebSocket front (FastAPI under ``@serve.ingress``); the protocol is ``docs/serving.md``.

The routes must be methods of the one ``@serve.ingress`` class, so this file is the route table of every
surface, and the native surface itself (``POST /v1/dialogue``, ``WS /v1/dialogue/ws``, ``/healthz``, the
page). Every surface answers through one public API, :class:`~serve_apps.answers.Answers` (one per replica:
encode a spoken turn, answer a conversation as a stream of events, read a bounded body, count a refusal),
which is the only code that calls the SpeechEncoder and Backbone deployments:

    audio --SpeechEncoder.encode--> speech [n, D] --Backbone.generate (stream)--> text deltas + PCM chunks
          -> the client

The surfaces with state of their own live apart and know nothing of this class: ``openai_routes.py``
(:class:`~serve_apps.openai_routes.OpenAIRoutes`), ``realtime.py`` (``WS /v1/realtime``), ``auth.py``.

Every refusal is a :class:`~serve_apps.protocol.Rejection` (HTTP status + reason), counted in
``deepomni_rejected_requests`` by reason. With an API key, :class:`~serve_apps.auth.ApiKeyMiddleware` in front
of the whole app refuses what comes without it (``serve_apps/auth.py``); a Backbone too busy to queue another
session refuses it as ``overloaded`` (503 + ``Retry-After``), as does Serve's backpressure on its handles.
An answer that loses a deployment mid-way (its replica died, or stopped answering: every wait is bounded,
``serve_apps/fault_handling.py``) ends with an ``unavailable`` error in its surface's format (an SSE ``error`` event
once the stream has started) and the ingress goes on serving.
"""


import asyncio
import base64
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deepomni.serve.messages import Conversation, ConversationTurn
from deepomni.serve.config import AppConfig

from . import auth
from .answers import MAX_TEXT_CHARS, Answers
from .openai_routes import OpenAIRoutes
from .protocol import (WS_INPUT_FORMATS, WS_INVALID_PAYLOAD, WS_MESSAGE_TOO_BIG, WS_POLICY_VIOLATION,
                       WS_UNSUPPORTED_DATA, AnswerOptions, Rejection, decode_b64, pcm_s16le, parse_json_object, reject,
                       sse)
from .realtime import RealtimeSession

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "pcm-recorder.js": "text/javascript"}

app = FastAPI(title="DeepOmni", description="Spoken dialogue with a speech-text MoE LM (docs/serving.md)")
app.add_middleware(auth.ApiKeyMiddleware)  # before @serve.ingress freezes the app; the keys: Ingress.__init__


def _status(e: Rejection) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


def _native(ev: dict) -> dict:
    """An answer event as our own protocol sends it (JSON): without the float audio and the summary."""
    return {k: v for k, v in ev.items() if k not in ("wav", "summary")}


class _NativeSession:
    """One connection of our own WebSocket protocol (``WS /v1/dialogue/ws``): turns in (audio frames +
    ``end_of_turn``, or ``text``), answers out.

    One answer runs at a time, as a task, so the connection keeps reading while it streams: a new turn or
    ``cancel`` stops the running answer first (barge-in). The connection is one conversation: every turn is
    answered with the earlier ones in context (an interrupted answer counts as the text it had sent)."""

    def __init__(self, answers: Answers, ws: WebSocket):
        self.answers, self.ws = answers, ws
        self.cfg = answers.cfg
        self.turn = 0
        self.fmt, self.rate = "pcm_s16le", 16000
        self.opts = AnswerOptions()
        self.buf = bytearray()
        self.task: asyncio.Task | None = None
        self.history: list[ConversationTurn] = []
        # the encoder's responses of the spoken turns this session has sent (Answers.hear), which the history's
        # turns name by index: every answer passes them on to the Backbone, so the features never come here
        self.heard: list = []

    async def close(self, code: int, reason: str, why: str) -> None:
        self.answers.rejected(Rejection(400, why, reason), "dialogue_ws")
        await self.stop_answer()
        await self.ws.close(code=code, reason=reason[:120])

    async def run(self) -> None:
        await self.ws.send_json({"type": "ready", **await self.answers.info(), "input_formats": list(WS_INPUT_FORMATS)})
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
        user, dropped, ids, started = None, 0, None, False
        try:
            heard = self.heard
            if audio is not None:
                heard = [*heard, self.answers.hear(audio, self.rate if self.fmt == "pcm_s16le" else None)]
            user = ConversationTurn("user", text, heard=len(heard) - 1 if audio is not None else None)
            conv = Conversation((*self.history, user), keep=True)
            events = self.answers.answer(conv, self.opts.generate_options(), t0, heard)
            async for ev in events:
                started = True  # the Backbone took the turn: its audio, if any, was heard, not refused
                if ev["type"] == "audio":
                    await ws.send_bytes(pcm_s16le(ev["wav"]))
                    continue
                if ev["type"] == "text":
                    said.append(ev["delta"])
                elif ev["type"] == "end":
                    dropped, ids = ev["dropped_turns"], ev["summary"].text_ids
                await ws.send_json({**_native(ev), "turn": turn})
        except Rejection as e:  # a bad turn: said so, counted, and the connection goes on
            self.answers.rejected(e, "dialogue_ws")
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
            # a spoken turn cut off (barge-in) before its answer started may hold audio the encoder refuses: it is
            # not kept, as a turn cut off while being encoded was not (a written one is)
            if user is not None and user.heard is not None and not started:
                user = None
            if user is not None:  # the turns the model no longer reads are forgotten here too
                answer = ConversationTurn("assistant", "".join(said), text_ids=ids)  # ids: a finished answer's
                self._remember([*self.history[dropped:], user, answer], heard)

    def _remember(self, history: list[ConversationTurn], heard: list) -> None:
        """Keep ``history`` and the responses its turns still name, renumbered (a forgotten or refused turn's
        response no longer travels with the answers)."""
        named = sorted({t.heard for t in history if t.heard is not None})
        new = {old: i for i, old in enumerate(named)}
        self.history = [t if t.heard is None else dataclasses.replace(t, heard=new[t.heard]) for t in history]
        self.heard = [heard[i] for i in named]


@serve.deployment(name="Ingress")  # replicas, autoscaling, num_cpus: config.yaml
@serve.ingress(app)
class Ingress:
    def __init__(self, encoder: DeploymentHandle, backbone: DeploymentHandle, cfg: AppConfig):
        self.answers = Answers(encoder, backbone, cfg)  # what every surface calls (answers.py)
        self.openai = OpenAIRoutes(self.answers)
        # the API key (app arg, else this process's DEEPOMNI_API_KEY), for the middleware of this replica's app
        auth.configure(auth.resolve_keys(cfg.api_key), lambda endpoint: self.answers.rejected(
            Rejection(401, "unauthorized", ""), endpoint))

    # ------------------------------------------------------------------------------------ plain routes
    @app.get("/healthz")
    async def healthz(self) -> Response:
        try:  # bounded: while a replica is being replaced the probe says so instead of hanging
            health = await self.answers.health()
        except Rejection as why:
            return JSONResponse({"status": "unavailable", "error": why.message}, 503, headers=why.headers())
        return JSONResponse({"status": "ok", **health})

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
            # the question's features go from the encoder straight to the Backbone (Answers.hear); the answer up
            # to its start: a refusal (of the audio, or by the backbone) is still a plain 4xx here
            heard = [] if audio is None else [self.answers.hear(audio, pcm_rate)]
            first, events = await self.answers.start(Conversation.single(text=text, heard=0 if heard else None),
                                                     opts.generate_options(), t0, heard)
        except Rejection as e:
            self.answers.rejected(e, "dialogue")
            return _status(e)

        async def body() -> AsyncIterator[bytes]:
            try:
                yield sse(first["type"], first)
                async for ev in events:
                    if ev["type"] == "audio":
                        ev = _native(ev) | {"pcm_b64": base64.b64encode(pcm_s16le(ev["wav"])).decode()}
                    yield sse(ev["type"], _native(ev))
            except Rejection as e:  # after the 200 (a deployment failed mid-answer): an error event ends the stream
                self.answers.rejected(e, "dialogue")
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
        body = await self.answers.read_body(request)
        cap = self.answers.cfg.max_steps_limit
        if not is_json:
            opts = AnswerOptions.parse(dict(request.query_params), cap)
            return body, None, None, opts
        data = parse_json_object(body, "the body")
        opts = AnswerOptions.parse(data, cap)
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

    # ------------------------------------------------------------------------------------ OpenAI-compatible
    # (serve_apps/openai_routes.py; docs/serving.md "OpenAI-compatible API")
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self.openai.chat_completions(request)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(self, request: Request) -> Response:
        return await self.openai.transcriptions(request)

    @app.post("/v1/audio/speech")
    async def speech(self, request: Request) -> Response:
        return await self.openai.speech(request)

    @app.get("/v1/models")
    async def models(self) -> Response:
        return self.openai.models()

    @app.get("/v1/models/{model_id}")
    async def model(self, model_id: str) -> Response:
        return self.openai.model(model_id)

    @app.websocket("/v1/realtime")
    async def realtime(self, ws: WebSocket) -> None:  # OpenAI's Realtime API (serve_apps/realtime.py)
        await ws.accept(subprotocol=auth.accept_subprotocol(ws.scope.get("subprotocols")))
        await RealtimeSession(self.answers, ws).run()

    # ------------------------------------------------------------------------------------ WS /v1/dialogue/ws
    @app.websocket("/v1/dialogue/ws")
    async def dialogue_ws(self, ws: WebSocket) -> None:
        await ws.accept(subprotocol=auth.accept_subprotocol(ws.scope.get("subprotocols")))
        session = _NativeSession(self.answers, ws)
        try:
            await session.run()
        except WebSocketDisconnect:
            pass
        finally:
            await session.stop_answer()
