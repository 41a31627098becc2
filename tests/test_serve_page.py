"""The web page at ``/`` in headless Chromium (Debian's ``chromium``, driven by Playwright over the DevTools
protocol), a WAV file as the fake microphone, on a checkpoint with a modality expert assignment
(``experts.json``). The page connects when it loads and says so; a full spoken turn (record, stop, the
answer streams back and plays), then a typed one: each becomes a turn with the question, the answer's text,
its time to first audio, a replay button, and one column per MoE layer with the shares of the answer's
routed tokens on speech and on text experts, as the server's ``end`` event gave them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.harness import free_port, readable_checkpoint, serve_app
from deepomni.audio import encode_audio
from tests.helpers.browser import CHROMIUM, FLAGS
from tests.helpers.serve import MAX_BODY, SR, speech_wav

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def moe_layer_ids() -> list[int]:
    from deepomni.config import load_preset
    from deepomni.model.modality import moe_layers
    from deepomni.model.model import DeepOmniModel

    with torch.device("meta"):
        return sorted(moe_layers(DeepOmniModel(load_preset("tiny"))))


@pytest.fixture(scope="module")
def server(tmp_path_factory, moe_layer_ids):
    """tests/test_serve.py's app, on the readable checkpoint with an expert assignment beside it (a seeded
    third of each MoE layer's experts for speech, as ``deepomni profile`` would write it)."""
    from deepomni.model.modality import ExpertAssignment

    ckpt = Path(readable_checkpoint(tmp_path_factory.mktemp("ckpt")))
    E = json.loads((ckpt / "config.json").read_text())["n_routed_experts"]
    gen = torch.Generator().manual_seed(0)
    ExpertAssignment(E, {l: sorted(torch.randperm(E, generator=gen)[:E // 3].tolist())
                         for l in moe_layer_ids}).save(ckpt / "experts.json")
    with serve_app({"checkpoint": str(ckpt), "max_steps": 24, "max_body_bytes": MAX_BODY}) as (url, _):
        yield url


def _layers(page, turn: int) -> list[dict]:
    """The expert columns drawn for a turn: their data attributes."""
    return page.eval_on_selector_all(f".exchange[data-turn='{turn}'] .experts .layer",
                                     "els => els.map(e => ({...e.dataset}))")


def test_page_shows_turns_with_ttfa_replay_and_expert_shares(server, tmp_path, moe_layer_ids):
    from playwright.sync_api import sync_playwright

    mic = tmp_path / "question.wav"
    mic.write_bytes(encode_audio(speech_wav("What is the capital of France?"), SR, "WAV"))
    errors: list[str] = []
    ends: dict[int, dict] = {}  # the server's end events, as the page received them

    def on_socket(ws):
        def frame(payload):
            if isinstance(payload, str) and json.loads(payload).get("type") == "end":
                ends[json.loads(payload)["turn"]] = json.loads(payload)
        ws.on("framereceived", frame)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=[*FLAGS, f"--use-file-for-fake-audio-capture={mic}"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("websocket", on_socket)
            page.goto(server + "/")
            # connected as soon as it loads, and says so
            page.wait_for_function("document.body.dataset.conn === 'connected'", timeout=30_000)
            assert page.inner_text("#conn").startswith("connected") and f"{SR} Hz" in page.inner_text("#conn")
            assert page.get_attribute("body", "data-state") == "idle"

            # spoken turn: Talk, ~1.5 s of the fake microphone, Stop
            page.click("#talk")
            page.wait_for_function("document.body.dataset.state === 'recording'", timeout=20_000)
            page.wait_for_timeout(1500)
            page.click("#talk")
            page.wait_for_function("document.body.dataset.turns === '1'", timeout=60_000)
            assert page.get_attribute("body", "data-state") == "done", page.inner_text("#status")
            played = int(page.get_attribute("body", "data-chunks-played"))
            assert played > 0, "no answer audio was scheduled for playback"
            spoken = page.locator(".exchange[data-turn='1']")
            assert "spoken" in spoken.locator(".turn.user .text").inner_text()
            assert float(spoken.locator(".turn.user").get_attribute("data-seconds")) >= 1.0
            end = ends[1]
            assert spoken.locator(".turn.bot .text").inner_text() == end["text"] and end["text"].strip()
            # time to first audio: measured by the page, the server's beside it
            assert float(spoken.get_attribute("data-ttfa-ms")) > 0
            ttfa = spoken.locator(".meta .ttfa").inner_text()
            assert "first audio" in ttfa and f"server {end['ttfa_ms']:.0f} ms" in ttfa
            # the experts: one column per MoE layer, the server's shares, speech + text = 1
            layers = _layers(page, 1)
            share = end["expert_share"]
            assert [int(c["layer"]) for c in layers] == share["layers"] == moe_layer_ids
            assert spoken.locator(".experts").get_attribute("data-assignment") == "yes"
            for c, s, t, n in zip(layers, share["speech"], share["text"], share["routed"]):
                assert (float(c["speech"]), float(c["text"]), int(c["routed"])) == (s, t, n) and n > 0
                assert 0 <= s <= 1 and s + t == pytest.approx(1.0)
            assert share["tokens"]["speech"] > 0  # the spoken question's frames and the speech answer
            # the spoken answer plays again
            spoken.locator(".replay").click()
            page.wait_for_function("document.body.dataset.replays === '1'", timeout=10_000)

            # typed turn on the same connection: a second turn, answered end to end
            page.fill("#question", "And the capital of Spain?")
            page.click("#send")
            page.wait_for_function("document.body.dataset.turns === '2'", timeout=60_000)
            assert int(page.get_attribute("body", "data-chunks-played")) > played
            assert page.locator(".exchange").count() == 2 and page.locator(".turn.bot").count() == 2
            typed = page.locator(".exchange[data-turn='2']")
            assert typed.locator(".turn.user .text").inner_text() == "And the capital of Spain?"
            assert typed.locator(".turn.bot .text").inner_text() == ends[2]["text"] and ends[2]["text"].strip()
            assert [float(c["speech"]) for c in _layers(page, 2)] == ends[2]["expert_share"]["speech"]
            assert ends[2]["cached_tokens"] > 0  # the first turn's context was kept
            assert page.locator(".exchange[data-turn='2'] .replay").count() == 1
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors


# ------------------------------------------------------------------------------------------ connection
# every value <body>'s data-state and data-conn take, and what #conn says, from now on (window.seen)
RECORD_STATES = """() => {
  const b = document.body, c = document.getElementById("conn");
  window.seen = {state: [b.dataset.state], conn: [b.dataset.conn], says: [c.textContent]};
  new MutationObserver((changes) => {
    for (const m of changes) {
      const key = m.attributeName === "data-state" ? "state" : "conn", v = b.getAttribute(m.attributeName);
      if (window.seen[key].at(-1) !== v) window.seen[key].push(v);
    }
  }).observe(b, {attributes: true, attributeFilter: ["data-state", "data-conn"]});
  new MutationObserver(() => window.seen.says.push(c.textContent)).observe(c, {childList: true});
}"""

def _scripted_server(port: int, script):
    """The page's files and a ``WS /v1/dialogue/ws`` that runs ``script(ws, n)`` for its n-th connection
    (uvicorn in a thread; no Ray, no model); returns the uvicorn server."""
    import threading
    import time

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import FileResponse
    from starlette.routing import Route, WebSocketRoute

    static = Path(__file__).resolve().parent.parent / "serve_apps" / "static"
    count = [0]

    async def ws_route(ws):
        await ws.accept(subprotocol="deepomni")
        count[0] += 1
        await ws.send_json({"type": "ready", "sample_rate": SR, "format": "pcm_s16le", "max_seconds": 8})
        await script(ws, count[0])

    app = Starlette(routes=[Route("/", lambda r: FileResponse(static / "index.html")),
                            Route("/static/{name}", lambda r: FileResponse(static / r.path_params["name"])),
                            WebSocketRoute("/v1/dialogue/ws", ws_route)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the scripted server did not start"
        time.sleep(0.05)
    return server


def test_page_reconnects_and_says_so_and_draws_experts_without_an_assignment():
    """A server that drops the connection after an answer, then mid-answer: the page says it reconnects,
    reconnects, marks the cut answer and where the new conversation starts; an ``expert_share`` without an
    assignment (the random preset) is drawn as the experts each layer used, and labelled so."""
    import asyncio

    from playwright.sync_api import sync_playwright

    share = {"layers": [1, 2, 3], "num_experts": 16, "routed": [96, 96, 96], "experts_used": [9, 12, 16],
             "tokens": {"text": 24, "speech": 0}, "speech": None, "text": None}

    async def script(ws, n: int):
        if n <= 2:
            msg = await ws.receive_json()
            assert msg == {"type": "text", "text": f"question {n}"}
            await ws.send_json({"type": "start", "turn": 1, "sample_rate": SR, "format": "pcm_s16le", "speech": True})
            await ws.send_json({"type": "text", "turn": 1, "delta": "an answer"})
            await ws.send_bytes(bytes(3200))  # 0.1 s of silence
            if n == 1:  # the answer ends, then the connection drops
                await ws.send_json({"type": "end", "turn": 1, "text": "an answer", "steps": 8, "text_tokens": 8,
                                    "frames": 2, "audio_chunks": 1, "audio_seconds": 0.1, "elapsed_ms": 50.0,
                                    "ttfa_ms": 20.0, "queue_ms": 0.1, "rtf": 0.5, "prompt_tokens": 16,
                                    "cached_tokens": 0, "dropped_turns": 0, "expert_share": share})
            await asyncio.sleep(0.2)
            await ws.close(code=1012, reason="service restart")  # n == 2: in the middle of the answer
            return
        await ws.receive()  # the third connection stays

    server = _scripted_server(port := free_port(), script)
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            try:
                page = browser.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"http://127.0.0.1:{port}/")
                page.evaluate(RECORD_STATES)
                page.wait_for_function("document.body.dataset.conn === 'connected'", timeout=20_000)
                page.fill("#question", "question 1")
                page.click("#send")
                page.wait_for_function("document.body.dataset.turns === '1'", timeout=20_000)
                first = page.locator(".exchange[data-turn='1']")
                assert first.locator(".turn.bot .text").inner_text() == "an answer"
                assert first.locator(".experts").get_attribute("data-assignment") == "no"
                assert "No expert assignment" in first.locator(".experts").inner_text()
                assert [c["used"] for c in _layers(page, 1)] == ["9", "12", "16"]
                assert first.locator(".replay").count() == 1 and float(first.get_attribute("data-ttfa-ms")) > 0
                # the drop: said, then a new connection (the server starts a new conversation there)
                page.wait_for_function("document.querySelectorAll('.divider').length === 1", timeout=10_000)
                assert page.get_attribute("body", "data-conn") == "connected"
                seen = page.evaluate("window.seen")
                conn = seen["conn"][seen["conn"].index("connected"):]  # (the page may have connected before we looked)
                assert conn == ["connected", "reconnecting", "connected"], seen
                said = "disconnected (1012: service restart) · reconnecting in"
                assert any(c.startswith(said) for c in seen["says"]), seen
                # a drop mid-answer: the answer is marked, the page reconnects again
                page.fill("#question", "question 2")
                page.click("#send")
                page.wait_for_function("document.querySelectorAll('.divider').length === 2", timeout=10_000)
                cut = page.locator(".exchange").nth(1)
                assert cut.locator(".turn.bot .text").inner_text() == "an answer"
                assert "connection lost" in cut.locator(".meta").inner_text()
                seen = page.evaluate("window.seen")
                assert seen["conn"][-5:] == ["connected", "reconnecting"] * 2 + ["connected"], seen
                assert seen["state"][-3:] == ["answering", "error", "idle"], seen
            finally:
                browser.close()
    finally:
        server.should_exit = True
    assert not errors, errors
