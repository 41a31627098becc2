"""The app's guards (docs/serving.md "Authentication" and "Overload"): an API key on every endpoint but
``/healthz`` and the page (the official ``openai`` client with the right and a wrong key, our endpoints with
requests, both WebSockets by header, subprotocol and query parameter, closed with 1008 without it, the page
asking for the key), and a bounded queue in front of the Backbone's rows (a session beyond it refused at once:
503 + Retry-After on HTTP, an ``error`` on the WebSockets; counted; a new request works once the load drops).

One Serve app for both, with tiny limits: 2 rows per Backbone replica and 1 session waiting."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import pytest
import requests

from benchmarks.harness import readable_checkpoint, serve_app
from serve_apps import auth
from serve_apps.openai_api import MODEL_ID, OpenAIError
from serve_apps.protocol import REASONS, reject
from tests.helpers.browser import CHROMIUM, FLAGS
from tests.helpers.serve import assert_answer, backbone_stats, ws_turn

openai = pytest.importorskip("openai")
pytest.importorskip("websockets")
from tests.helpers.realtime import no_vad, recv, until  # noqa: E402

KEY = "dk_test-0123456789abcdef_KEY"  # a token: fits a WebSocket subprotocol
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 1950  # decoding steps of an answer that holds its row for the whole test (the tiny model holds 2048
# positions; the readable checkpoint never ends an answer early)


# ------------------------------------------------------------------------------------------ no server
def test_keys_are_compared_in_constant_time_and_read_from_the_arg_or_the_environment(monkeypatch):
    keys = auth.parse_keys(" old-key , new-key ,, ")
    assert keys == (b"old-key", b"new-key")  # several, for rotation
    assert auth.matches("new-key", keys) and auth.matches("old-key", keys)
    assert not auth.matches("new-ke", keys) and not auth.matches("", keys) and not auth.matches(None, keys)
    assert not auth.matches("x", ())
    assert auth.resolve_keys("arg", {auth.ENV: "env"}) == (b"arg",)
    assert auth.resolve_keys(None, {auth.ENV: "env"}) == (b"env",)
    assert auth.resolve_keys("  ", {auth.ENV: ""}) == () and auth.resolve_keys(None, {}) == ()
    calls = []
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or a == b)
    assert auth.matches("old-key", keys) and len(calls) == 2  # no early exit: every key is compared


def test_where_a_websocket_key_comes_from():
    def scope(headers=(), subprotocols=(), query=b""):
        return {"headers": list(headers), "subprotocols": list(subprotocols), "query_string": query}

    assert auth.bearer(scope([(b"authorization", b"bearer  abc ")])) == "abc"
    assert auth.bearer(scope([(b"authorization", b"Basic abc")])) is None
    assert auth.bearer(scope([(b"authorization", b"Bearer ")])) is None
    everywhere = scope([(b"authorization", b"Bearer h")], ["openai-insecure-api-key.s"], b"api_key=q")
    assert auth.websocket_key(everywhere) == "h"  # the header first, then the subprotocol, then the query
    assert auth.websocket_key(scope((), ["realtime", "openai-insecure-api-key.s"], b"api_key=q")) == "s"
    assert auth.websocket_key(scope((), ["realtime"], b"model=x&api_key=q%2Bw")) == "q+w"
    assert auth.websocket_key(scope()) is None
    assert auth.accept_subprotocol(["openai-insecure-api-key.s", "realtime"]) == "realtime"  # never the key
    assert auth.accept_subprotocol(["openai-insecure-api-key.s"]) is None and auth.accept_subprotocol(None) is None
    assert [auth.is_open(p) for p in ("/healthz", "/", "/static/app.js", "/v1/models", "/docs", "/staticx")] == \
        [True, True, True, False, False, False]
    assert auth.endpoint_of("/v1/chat/completions") == "chat_completions" and auth.endpoint_of("/x") == "other"


def test_refusal_reasons_and_their_headers():
    assert REASONS["unauthorized"] == 401 and REASONS["overloaded"] == 503
    e = reject("overloaded", "busy", 3)
    assert e.headers() == {"Retry-After": "3"} and e.body()["error"]["retry_after_s"] == 3
    o = OpenAIError.from_rejection(e)
    assert (o.status, o.type, o.code, o.reason, o.headers()) == (503, "server_error", "server_overloaded",
                                                                 "overloaded", {"Retry-After": "3"})
    u = OpenAIError.from_rejection(reject("unauthorized", "no key"))
    assert (u.status, u.type, u.code, u.reason) == (401, "invalid_request_error", "invalid_api_key", "unauthorized")
    assert u.headers()["WWW-Authenticate"].startswith("Bearer")
    assert set(u.body()["error"]) == {"message", "type", "param", "code"}


def test_app_config_keeps_the_key_out_of_its_repr_and_checks_max_queued():
    from deepomni.serve.config import AppConfig

    cfg = AppConfig.from_args({"api_key": "s3cret", "max_queued": "3"})
    assert "s3cret" not in repr(cfg) and cfg.api_key == "s3cret" and cfg.queue_limit() == 3
    assert AppConfig.from_args({"max_rows": 8}).queue_limit() == 8  # default: max_rows
    assert AppConfig.from_args({"max_queued": None}).max_queued is None
    with pytest.raises(ValueError, match="max_queued"):
        AppConfig.from_args({"max_queued": -1})


# ------------------------------------------------------------------------------------------ the app
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = {"checkpoint": readable_checkpoint(tmp_path_factory.mktemp("ckpt")), "max_steps": 16,
           "max_steps_limit": 2000, "max_rows": 2, "max_queued": 1, "api_key": KEY}
    # the counters reach /metrics within a second
    with serve_app(app, env={"RAY_metrics_report_interval_ms": "1000"}) as (url, _):
        yield url


def client(server, key=KEY, cls=None):
    return (cls or openai.OpenAI)(base_url=f"{server}/v1", api_key=key, max_retries=0, timeout=60)


def ws_base(server: str) -> str:
    return server.replace("http://", "ws://")


def test_healthz_and_the_page_need_no_key(server):
    h = requests.get(f"{server}/healthz", timeout=30)
    assert h.status_code == 200 and h.json()["backbone"]["max_queued"] == 1
    assert requests.get(f"{server}/", timeout=30).status_code == 200
    assert requests.get(f"{server}/static/app.js", timeout=30).status_code == 200


def test_the_openai_client_with_the_key_works_and_a_wrong_key_is_refused(server):
    good = client(server)
    assert [m.id for m in good.models.list().data] == [MODEL_ID]
    r = good.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                     max_completion_tokens=4)
    assert r.choices[0].message.content
    bad = client(server, "not-the-key")
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key" and e.value.body["param"] is None
    assert "not-the-key" not in str(e.value)  # the key is not echoed
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


UNAUTHORIZED = {  # path: (method, body, OpenAI's error format)
    "/v1/dialogue": ("POST", {"text": "hi"}, False),
    "/v1/chat/completions": ("POST", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}, True),
    "/v1/audio/speech": ("POST", {"model": MODEL_ID, "input": "hi", "voice": "a"}, True),
    "/v1/audio/transcriptions": ("POST", None, True),
    "/v1/models": ("GET", None, True),
    "/v1/models/deepomni": ("GET", None, True),
    "/docs": ("GET", None, False),  # FastAPI's own pages too
    "/no/such/path": ("GET", None, False),
}


@pytest.mark.parametrize("path", list(UNAUTHORIZED))
def test_every_other_http_endpoint_needs_the_key(server, path):
    method, body, openai_format = UNAUTHORIZED[path]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}):
        r = requests.request(method, f"{server}{path}", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (path, headers, r.text)
        assert r.headers["WWW-Authenticate"].startswith("Bearer") and KEY not in r.text
        err = r.json()["error"]
        if openai_format:
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
            assert err["param"] is None and err["message"]
        else:
            assert err["reason"] == "unauthorized" and err["message"]
    if path == "/v1/dialogue":
        r = requests.post(f"{server}{path}", json={"text": "hi", "speech": False, "max_steps": 4}, headers=AUTH,
                          stream=True, timeout=60)
        assert_answer(r, speech=False)
    elif method == "GET" and openai_format:
        assert requests.get(f"{server}{path}", headers=AUTH, timeout=30).status_code == 200


def test_websockets_take_the_key_from_a_header_a_subprotocol_or_the_query(server):
    from openai.types.realtime import RealtimeServerEvent
    from pydantic import TypeAdapter
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    native, realtime = f"{ws_base(server)}/v1/dialogue/ws", f"{ws_base(server)}/v1/realtime"

    def refused(url, **kw):
        with connect(url, **kw) as ws:
            first = json.loads(ws.recv(timeout=30))
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=30)
        assert info.value.rcvd.code == 1008 and info.value.rcvd.reason == "unauthorized"
        return first

    err = refused(native)
    assert err["type"] == "error" and err["reason"] == "unauthorized"
    assert refused(native, subprotocols=["deepomni", "openai-insecure-api-key.wrong"])["reason"] == "unauthorized"
    assert refused(native + "?api_key=wrong")["reason"] == "unauthorized"
    ev = TypeAdapter(RealtimeServerEvent).validate_python(
        refused(realtime, subprotocols=["realtime", "openai-insecure-api-key.wrong"]))
    assert ev.type == "error" and ev.error.code == "invalid_api_key"

    for kw in ({"additional_headers": AUTH}, {"subprotocols": ["deepomni", f"openai-insecure-api-key.{KEY}"]},
               {"url": native + f"?api_key={KEY}"}):
        with connect(kw.pop("url", native), **kw) as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "ready"
            assert ws.subprotocol == ("deepomni" if "subprotocols" in kw else None)  # the key is not echoed
    with connect(realtime, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created" and ws.subprotocol == "realtime"

    async def official():  # the openai client sends Authorization: Bearer
        async with client(server, cls=openai.AsyncOpenAI).realtime.connect(model=MODEL_ID) as conn:
            return json.loads(await asyncio.wait_for(conn.recv_bytes(), 30))["type"]
    assert asyncio.run(official()) == "session.created"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_page_asks_for_the_key_and_then_answers(server):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            page.fill("#question", "Hello?")
            page.click("#send")
            page.wait_for_function("document.body.dataset.state === 'needs-key'", timeout=30_000)
            assert page.is_visible("#apikey") and "API key" in page.inner_text("#status")
            page.fill("#apikey", KEY)
            page.click("#usekey")
            page.wait_for_function("document.body.dataset.state === 'idle'", timeout=30_000)
            assert not page.is_visible("#apikey")
            page.click("#send")  # the question is still in its field
            page.wait_for_function("document.body.dataset.turns === '1'", timeout=60_000)
            assert page.locator(".turn.bot").count() == 1
        finally:
            browser.close()
    assert not errors, errors


# ------------------------------------------------------------------------------------------ overload
def _long_answer(server, out: list | None = None):
    r = requests.post(f"{server}/v1/dialogue", json={"text": "Talk for a long time.", "speech": False,
                                                     "max_steps": LONG}, headers=AUTH, stream=True, timeout=120)
    if out is not None:
        out.append(r)
    return r


def _wait_for(server, pred, what: str, timeout: float = 30) -> dict:
    deadline = time.perf_counter() + timeout
    while True:
        st = backbone_stats(server)
        if pred(st):
            return st
        assert time.perf_counter() < deadline, f"{what}: {st}"
        time.sleep(0.05)


def test_sessions_beyond_the_queue_are_refused_at_once_and_served_once_the_load_drops(server):
    # two text answers take both rows; a third waits in the queue (its response has not begun)
    running = [_long_answer(server), _long_answer(server)]
    assert [r.status_code for r in running] == [200, 200]
    waiting: list = []
    t = threading.Thread(target=_long_answer, args=(server, waiting), daemon=True)
    t.start()
    st = _wait_for(server, lambda s: s["queued"] == 1, "the third session should wait")
    assert st["active_sessions"] == 2 and not waiting
    refused_before = st["overloaded"]

    # native HTTP: 503 + Retry-After, at once
    t0 = time.perf_counter()
    r = requests.post(f"{server}/v1/dialogue", json={"text": "and me?"}, headers=AUTH, timeout=30)
    elapsed = time.perf_counter() - t0
    assert r.status_code == 503 and elapsed < 1.0, (r.status_code, elapsed)
    retry = int(r.headers["Retry-After"])
    err = r.json()["error"]
    assert err["reason"] == "overloaded" and err["retry_after_s"] == retry and 1 <= retry <= 30
    # OpenAI's surface: 503 server_overloaded (the client would retry after Retry-After; here max_retries=0)
    t0 = time.perf_counter()
    with pytest.raises(openai.InternalServerError) as e:
        client(server).chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}])
    assert time.perf_counter() - t0 < 1.0
    assert e.value.status_code == 503 and e.value.code == "server_overloaded"
    assert e.value.response.headers["Retry-After"].isdigit()
    # our WebSocket: an error for that turn, and the connection stays
    from websockets.sync.client import connect

    with connect(f"{ws_base(server)}/v1/dialogue/ws", additional_headers=AUTH) as ws:
        ws.recv(timeout=30)
        ws.send(json.dumps({"type": "text", "text": "and me?"}))
        msgs, _ = ws_turn(ws)
        assert msgs[-1]["type"] == "error" and msgs[-1]["reason"] == "overloaded" and msgs[-1]["retry_after_s"] >= 1

        # Realtime: an error event and a failed response; the session goes on
        async def realtime():
            async with client(server, cls=openai.AsyncOpenAI).realtime.connect(model=MODEL_ID) as conn:
                await recv(conn)
                await no_vad(conn)
                await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                          "content": [{"type": "input_text", "text": "hi"}]})
                await until(conn, "conversation.item.done")
                await conn.response.create()
                return await until(conn, "response.done")
        events = asyncio.run(realtime())
        errors = [ev for ev in events if ev.type == "error"]
        assert [ev.error.code for ev in errors] == ["server_overloaded"]
        assert events[-1].response.status == "failed"
        assert backbone_stats(server)["overloaded"] == refused_before + 4

        # the load drops: the waiting session starts, then a new one is served (on the same WebSocket too)
        for resp in running:
            resp.close()
        t.join(timeout=30)
        assert waiting and waiting[0].status_code == 200
        waiting[0].close()
        _wait_for(server, lambda s: s["active_sessions"] == 0 and s["queued"] == 0 and s["rows"] == 0,
                  "the hung-up sessions should be freed")
        ws.send(json.dumps({"type": "start_turn", "format": "pcm_s16le", "sample_rate": 16000, "max_steps": 4}))
        ws.send(json.dumps({"type": "text", "text": "and now?"}))
        msgs, _ = ws_turn(ws)
        assert msgs[-1]["type"] == "end", msgs[-1]
    r = requests.post(f"{server}/v1/dialogue", json={"text": "and now?", "max_steps": 8}, headers=AUTH,
                      stream=True, timeout=60)
    assert_answer(r)


def test_refusals_are_counted_by_reason(server):
    """Runs after the tests above: their 401s and 503s reach Ray's metrics endpoint."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    want = {("unauthorized", "chat_completions"), ("unauthorized", "dialogue_ws"), ("unauthorized", "realtime"),
            ("unauthorized", "models"), ("unauthorized", "other"), ("overloaded", "dialogue"),
            ("overloaded", "chat_completions"), ("overloaded", "dialogue_ws"), ("overloaded", "realtime")}
    deadline, seen = time.perf_counter() + 60, set()
    while time.perf_counter() < deadline and not want <= seen:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("ray_deepomni_rejected_requests_total{") and float(line.rsplit(" ", 1)[1]) >= 1:
                tags = dict(re.findall(r'(\w+)="([^"]*)"', line))
                seen.add((tags.get("reason"), tags.get("endpoint")))
        time.sleep(1)
    assert want <= seen, sorted(want - seen)
