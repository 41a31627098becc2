"""The web page at ``/`` in headless Chromium (Debian's ``chromium``, driven by Playwright over the DevTools
protocol), a WAV file as the fake microphone: a full spoken turn (record, stop, the answer streams back),
then a typed one; the transcript fills and the answer audio is scheduled for playback."""

from __future__ import annotations

import shutil

import pytest

from deepomni.audio import encode_audio

from test_serve import SR, server, speech_wav  # noqa: F401  (the module-scoped app fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")

# as root, in a sandbox with no network: no Chromium sandbox, no background connections
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


def test_page_records_streams_plays_and_shows_the_transcript(server, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    mic = tmp_path / "question.wav"
    mic.write_bytes(encode_audio(speech_wav("What is the capital of France?"), SR, "WAV"))
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=[*FLAGS, f"--use-file-for-fake-audio-capture={mic}"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            # spoken turn: Talk, ~1.5 s of the fake microphone, Stop
            page.click("#talk")
            page.wait_for_function("document.body.dataset.state === 'recording'", timeout=20_000)
            page.wait_for_timeout(1500)
            page.click("#talk")
            page.wait_for_function("document.body.dataset.turns === '1'", timeout=60_000)
            assert page.get_attribute("body", "data-state") == "done", page.inner_text("#status")
            played = int(page.get_attribute("body", "data-chunks-played"))
            assert played > 0, "no answer audio was scheduled for playback"
            user = page.inner_text(".turn.user .text")
            bot = page.inner_text(".turn.bot .text")
            assert "spoken question" in user and float(user.split(",")[1].split()[0]) >= 1.0, user
            assert bot.strip(), "the answer's text did not reach the transcript"
            assert "first audio" in page.inner_text("#stats")
            # typed turn on the same connection
            page.fill("#question", "And the capital of Spain?")
            page.click("#send")
            page.wait_for_function("document.body.dataset.turns === '2'", timeout=60_000)
            assert int(page.get_attribute("body", "data-chunks-played")) > played
            assert page.locator(".turn.bot").count() == 2
        finally:
            browser.close()
    assert not errors, errors
