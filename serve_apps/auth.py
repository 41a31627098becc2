"""The optional API key (``docs/serving.md`` "Authentication"): when the app has one (app arg ``api_key``, or
the environment variable ``DEEPOMNI_API_KEY`` of the Ingress replicas), every endpoint asks for it except
``/healthz`` (load balancers and probes) and the page (``/`` and ``/static/*``: files with no data and no
model behind them; the page asks its user for the key and sends it on its WebSocket).

* HTTP: ``Authorization: Bearer <key>`` (what the ``openai`` client sends). Otherwise 401 with
  ``WWW-Authenticate: Bearer``, in the surface's error format: OpenAI's ``{"error": {message, type:
  "invalid_request_error", param: null, code: "invalid_api_key"}}`` under ``/v1/chat/``, ``/v1/audio/``,
  ``/v1/models``; ours, ``{"error": {"reason": "unauthorized", "message"}}``, elsewhere.
* WebSocket (``/v1/dialogue/ws``, ``/v1/realtime``): the same header, or, for browsers (which cannot set
  headers on a WebSocket), the subprotocol ``openai-insecure-api-key.<key>`` (as OpenAI's browser clients
  send it) or the query parameter ``?api_key=<key>``. Otherwise the connection is accepted, told why in
  an ``error`` message of its protocol, and closed with 1008 (policy violation), so that a browser sees
  the code (a refused handshake shows only 1006).

Keys are compared with :func:`hmac.compare_digest` (time independent of where they differ), against
every configured key (comma-separated, for rotation). Nothing here logs a key or echoes one back: the
subprotocol a connection gets is the first one offered that is not a key. Refusals count in
``deepomni_rejected_requests{reason="unauthorized"}``.

:class:`ApiKeyMiddleware` wraps the whole FastAPI app (so new routes, FastAPI's ``/docs`` and unknown
paths are covered without each route remembering to check). Ray Serve freezes the app (a pickled copy)
when ``@serve.ingress`` decorates the class, so the middleware reads the keys from this module's state,
set by each Ingress replica's constructor (:func:`configure`). Until then it refuses everything (503):
a replica that never configured fails closed, not open.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Callable, Iterable
from urllib.parse import parse_qs

from .protocol import WS_POLICY_VIOLATION, http_headers

ENV = "DEEPOMNI_API_KEY"
SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
OPEN_PATHS = frozenset({"/healthz", "/"})
OPEN_PREFIXES = ("/static/",)
OPENAI_PREFIXES = ("/v1/chat/", "/v1/audio/", "/v1/models", "/v1/realtime")
# path -> the rejected-requests metric's endpoint tag
ENDPOINTS = {"/v1/dialogue": "dialogue", "/v1/dialogue/ws": "dialogue_ws", "/v1/chat/completions": "chat_completions",
             "/v1/audio/transcriptions": "transcriptions", "/v1/audio/speech": "speech", "/v1/realtime": "realtime"}

_state: dict = {"keys": None, "on_refused": None}  # None: not configured yet (this replica refuses everything)


def parse_keys(raw: str | None) -> tuple[bytes, ...]:
    """``"k1,k2"`` -> the keys (blank entries dropped); ``None`` or blank: no key."""
    return tuple(k.strip().encode() for k in (raw or "").split(",") if k.strip())


def resolve_keys(api_key: str | None, environ: dict | None = None) -> tuple[bytes, ...]:
    """The app arg if it is set (non-blank), else ``DEEPOMNI_API_KEY``; empty: no key is required."""
    environ = os.environ if environ is None else environ
    return parse_keys(api_key if api_key and api_key.strip() else environ.get(ENV))


def configure(keys: tuple[bytes, ...], on_refused: Callable[[str], None] | None = None) -> None:
    """Called by the Ingress replica: the keys to require (empty: none) and what counts a refusal
    (``on_refused(endpoint)``)."""
    _state["keys"], _state["on_refused"] = tuple(keys), on_refused


def matches(given: str | None, keys: Iterable[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``; every key is compared, in constant time each."""
    if given is None:
        return False
    g = given.encode("utf-8", "surrogateescape")
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(g, k)
    return ok


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def bearer(scope: dict) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (the scheme in any case), else None."""
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def websocket_key(scope: dict) -> str | None:
    """A WebSocket's key: the ``Authorization`` header, else an ``openai-insecure-api-key.<key>``
    subprotocol, else the ``api_key`` query parameter."""
    key = bearer(scope)
    if key is not None:
        return key
    for p in scope.get("subprotocols") or ():
        if p.startswith(SUBPROTOCOL_PREFIX):
            return p[len(SUBPROTOCOL_PREFIX):]
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key")
    return values[0] if values else None


def accept_subprotocol(subprotocols: Iterable[str] | None) -> str | None:
    """The subprotocol to accept a WebSocket with: the first offered that is not a key (a browser that
    offered some fails a handshake that names none; the key is never sent back)."""
    return next((p for p in subprotocols or () if not p.startswith(SUBPROTOCOL_PREFIX)), None)


def _path(scope: dict) -> str:
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def is_openai(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


def endpoint_of(path: str) -> str:
    return ENDPOINTS.get(path, "models" if path.startswith("/v1/models") else "other")


def refusal(path: str, given: str | None, status: int = 401) -> dict:
    """The error body for a request without the right key, in its surface's format."""
    if status == 503:
        message = "this replica is starting: try again"
    elif given is None:
        message = ("You didn't provide an API key: send 'Authorization: Bearer <key>'" +
                   (" (a WebSocket in a browser: the subprotocol openai-insecure-api-key.<key>, or ?api_key=<key>)"
                    if path in ("/v1/realtime", "/v1/dialogue/ws") else ""))
    else:
        message = "Incorrect API key provided."  # never the key itself
    if is_openai(path):
        return {"error": {"message": message, "type": "invalid_request_error" if status == 401 else "server_error",
                          "param": None, "code": "invalid_api_key" if status == 401 else "server_starting"}}
    return {"error": {"reason": "unauthorized" if status == 401 else "internal_error", "message": message}}


class ApiKeyMiddleware:
    """Pure ASGI middleware: lets through requests with the key (or every request when there is none)
    and the open paths; answers the rest itself (see the module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        keys, path = _state["keys"], _path(scope)
        if keys is not None and (not keys or is_open(path)):
            return await self.app(scope, receive, send)
        given = (websocket_key if scope["type"] == "websocket" else bearer)(scope)
        if keys is not None and matches(given, keys):
            return await self.app(scope, receive, send)
        status = 401 if keys is not None else 503
        if status == 401 and _state["on_refused"] is not None:
            try:
                _state["on_refused"](endpoint_of(path))
            except Exception:  # a metrics hiccup must not let the request through or fail it otherwise
                pass
        body = refusal(path, given, status)
        if scope["type"] == "http":
            data = json.dumps(body).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
            headers += [(k.lower().encode(), v.encode()) for k, v in http_headers(status, None).items()]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": data})
            return
        msg = await receive()
        if msg["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept", "subprotocol": accept_subprotocol(scope.get("subprotocols"))})
        await send({"type": "websocket.send", "text": json.dumps(_ws_error(path, body))})
        await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION,
                    "reason": "unauthorized" if status == 401 else "starting"})


def _ws_error(path: str, body: dict) -> dict:
    """The refusal as the connection's protocol says errors: a Realtime ``error`` event, or our ``error``."""
    if path == "/v1/realtime":
        from .openai_api import new_id

        return {"type": "error", "event_id": new_id("event"), "error": {**body["error"], "event_id": None}}
    return {"type": "error", **body["error"]}
