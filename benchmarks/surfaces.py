"""Async clients of every surface of the Serve app, for the benchmarks that load it (``soak``, ``serve_faults``).

    clients = Surfaces.for_speech("http://127.0.0.1:8000", samples16, steps=32)
    ttfa_s = await clients.dialogue_wav(rng, on_chunk=lambda: ...)   # runs one answer to its end
    await clients.close()

Each method runs one request to its end and returns its time to first audio in seconds (None: no audio out;
``dialogue_ws`` also the cached tokens of its second turn), calling ``on_chunk()`` at every piece of the
answer (text or audio). What went wrong is raised: :class:`Refused` for an HTTP status other than 200
(``kind="status"``), an error the server sent inside a started answer (``"error"``) or an answer that ended
without its end (``"broken"``); a lost connection raises what httpx / websockets raise. ``rng`` picks the
written questions and the seeds (None: no seed). The wire formats are docs/serving.md's.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Callable

QUESTIONS = ["What is the capital of France?", "How far away is the moon?", "Tell me a short story.",
             "Why is the sky blue?", "What time is it in Tokyo?"]
WAV_HEADER = 44  # bytes before a WAV's samples


class Refused(Exception):
    """An answer that did not come: ``kind`` "status" (an HTTP status other than 200), "error" (an in-band error
    of a started answer) or "broken" (it ended without its end)."""

    def __init__(self, status: int, body: str, kind: str = "status"):
        super().__init__(f"{status}: {body[:200]}")
        self.status, self.body, self.kind = status, body, kind

    @property
    def inband(self) -> bool:
        return self.kind != "status"


def _nothing() -> None:
    pass


class Surfaces:
    """The clients (module doc). ``timeout``: httpx's per-request timeout (and the WebSocket opening's unless
    ``open_timeout``); ``keepalive``: pooled connections kept (0: a new connection a request); ``chunk_ms``:
    the Realtime microphone's chunk."""

    def __init__(self, url: str, wav: bytes, pcm24: bytes, steps: int, timeout: float = 60.0,
                 connect_timeout: float | None = None, open_timeout: float | None = None, keepalive: int = 64,
                 chunk_ms: int = 100):
        import httpx

        self.url, self.ws_url = url, url.replace("http://", "ws://")
        self.wav, self.pcm24, self.steps, self.chunk_ms = wav, pcm24, steps, chunk_ms
        self.open_timeout = open_timeout or timeout
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=connect_timeout or timeout),
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=keepalive))

    @classmethod
    def for_speech(cls, url: str, samples16, steps: int, **kw) -> "Surfaces":
        """Clients asking the question ``samples16`` (float, 16 kHz): as WAV, and as 24 kHz PCM16 for Realtime."""
        import numpy as np
        import soxr

        from deepomni.audio import encode_audio

        pcm24 = (np.clip(soxr.resample(samples16, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()
        return cls(url, encode_audio(samples16, 16000, "WAV"), pcm24, steps, **kw)

    async def close(self) -> None:
        await self.http.aclose()

    async def _check(self, r) -> None:
        if r.status_code != 200:
            raise Refused(r.status_code, (await r.aread()).decode(errors="replace"))

    # ---------------------------------------------------------------------------------- POST /v1/dialogue
    async def _dialogue(self, on_chunk: Callable[[], None], **kw) -> float | None:
        t0, ttfa, event, ended = time.perf_counter(), None, None, False
        async with self.http.stream("POST", f"{self.url}/v1/dialogue", **kw) as r:
            await self._check(r)
            async for line in r.aiter_lines():  # to the stream's end, so that its connection is kept for reuse
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    if event in ("text", "audio"):
                        on_chunk()
                        if event == "audio" and ttfa is None and json.loads(line[5:]).get("pcm_b64"):
                            ttfa = time.perf_counter() - t0
                    elif event == "error":
                        raise Refused(200, line[5:], "error")
                    elif event == "end":
                        ended = True
        if not ended:
            raise Refused(200, "stream ended without an end event", "broken")
        return ttfa

    async def dialogue_wav(self, rng: random.Random | None = None, on_chunk: Callable[[], None] = _nothing,
                           steps: int | None = None) -> float | None:
        params = {"max_steps": steps or self.steps, **({"seed": rng.randrange(99)} if rng else {})}
        return await self._dialogue(on_chunk, content=self.wav, params=params, headers={"content-type": "audio/wav"})

    async def dialogue_text(self, rng: random.Random, on_chunk: Callable[[], None] = _nothing) -> float | None:
        return await self._dialogue(on_chunk, json={"text": rng.choice(QUESTIONS), "max_steps": self.steps})

    # ----------------------------------------------------------------------------------- WS /v1/dialogue/ws
    async def dialogue_ws(self, rng: random.Random | None = None, on_chunk: Callable[[], None] = _nothing,
                          turns: int = 2) -> tuple[float | None, int]:
        """The spoken question, then (``turns`` 2) a written one with the first in context: ``(TTFA, cached
        tokens of the last turn)``."""
        from websockets.asyncio.client import connect

        ttfa, end = None, {}
        async with connect(f"{self.ws_url}/v1/dialogue/ws", open_timeout=self.open_timeout, max_size=2 ** 24) as ws:
            ready = json.loads(await ws.recv())
            if ready.get("type") != "ready":
                raise Refused(200, f"first message {ready!r}", "broken")
            for turn in range(1, turns + 1):
                t0 = time.perf_counter()
                if turn == 1:
                    await ws.send(json.dumps({"type": "start_turn", "format": "file", "max_steps": self.steps}))
                    await ws.send(self.wav)
                    await ws.send(json.dumps({"type": "end_of_turn"}))
                else:
                    await ws.send(json.dumps({"type": "text", "text": (rng or random).choice(QUESTIONS)}))
                while True:
                    msg = await ws.recv()
                    if isinstance(msg, bytes):
                        on_chunk()
                        if ttfa is None and msg:
                            ttfa = time.perf_counter() - t0
                        continue
                    m = json.loads(msg)
                    if m.get("type") == "text":
                        on_chunk()
                    elif m.get("type") == "error":
                        raise Refused(200, msg, "error")
                    elif m.get("type") == "end":
                        if m.get("cancelled"):
                            raise Refused(200, msg, "broken")
                        end = m
                        break
        return ttfa, end.get("cached_tokens", 0)

    # ---------------------------------------------------------------------------------------- OpenAI HTTP
    async def chat_audio(self, rng: random.Random | None = None, on_chunk: Callable[[], None] = _nothing) -> float | None:
        """``POST /v1/chat/completions`` streamed: the spoken question in, text and pcm16 audio out."""
        body = {"model": "deepomni", "stream": True, "modalities": ["text", "audio"], "max_tokens": self.steps,
                "audio": {"voice": "alloy", "format": "pcm16"},
                "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
                    "data": base64.b64encode(self.wav).decode(), "format": "wav"}}]}]}
        t0, ttfa, finish, done = time.perf_counter(), None, None, False
        async with self.http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
            await self._check(r)
            async for line in r.aiter_lines():  # to the stream's end, so that its connection is kept for reuse
                if line == "data: [DONE]":
                    if finish is None:
                        raise Refused(200, "[DONE] without a finish_reason", "broken")
                    done = True
                elif line.startswith("data: {"):
                    msg = json.loads(line[6:])
                    if "error" in msg:
                        raise Refused(200, line[6:], "error")
                    for choice in msg.get("choices", []):
                        if (choice["delta"].get("audio") or {}).get("data") and ttfa is None:
                            ttfa = time.perf_counter() - t0
                        if choice["delta"].get("audio") or choice["delta"].get("content"):
                            on_chunk()
                        finish = finish or choice.get("finish_reason")
        if not done:
            raise Refused(200, "stream ended without [DONE]", "broken")
        return ttfa

    async def chat_text(self, rng: random.Random, on_chunk: Callable[[], None] = _nothing) -> None:
        body = {"model": "deepomni", "max_tokens": self.steps,
                "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}
        r = await self.http.post(f"{self.url}/v1/chat/completions", json=body)
        await self._check(r)
        if "content" not in r.json()["choices"][0]["message"]:
            raise Refused(200, f"no content: {r.text[:200]}", "broken")

    async def transcriptions(self, rng: random.Random, on_chunk: Callable[[], None] = _nothing) -> None:
        r = await self.http.post(f"{self.url}/v1/audio/transcriptions", data={"model": "deepomni"},
                                 files={"file": ("question.wav", self.wav, "audio/wav")})
        await self._check(r)
        if "text" not in r.json():
            raise Refused(200, f"no text: {r.text[:200]}", "broken")

    async def speech(self, rng: random.Random, on_chunk: Callable[[], None] = _nothing) -> float | None:
        """``POST /v1/audio/speech`` as WAV, streamed as generated."""
        body = {"model": "deepomni", "voice": "alloy", "input": rng.choice(QUESTIONS), "response_format": "wav"}
        t0, ttfa, n = time.perf_counter(), None, 0
        async with self.http.stream("POST", f"{self.url}/v1/audio/speech", json=body) as r:
            await self._check(r)
            async for chunk in r.aiter_bytes():
                n += len(chunk)
                if ttfa is None and n > WAV_HEADER:
                    ttfa = time.perf_counter() - t0
        if n < WAV_HEADER:
            raise Refused(200, f"{n} bytes of WAV", "broken")
        return ttfa

    async def healthz(self, rng: random.Random | None = None, on_chunk: Callable[[], None] = _nothing) -> None:
        r = await self.http.get(f"{self.url}/healthz")
        await self._check(r)
        if r.json().get("status") != "ok":
            raise Refused(200, r.text[:200], "error")

    # ------------------------------------------------------------------------------------ WS /v1/realtime
    async def realtime(self, rng: random.Random | None = None, on_chunk: Callable[[], None] = _nothing) -> float | None:
        """``session.update`` (no VAD), the spoken question appended in ``chunk_ms`` chunks and committed,
        ``response.create``, until ``response.done``: TTFA from the commit."""
        from websockets.asyncio.client import connect

        async with connect(f"{self.ws_url}/v1/realtime?model=deepomni", open_timeout=self.open_timeout,
                           max_size=2 ** 24) as ws:
            async def until(*types: str) -> dict:
                while True:
                    ev = json.loads(await ws.recv())
                    if ev["type"] == "error":
                        raise Refused(200, json.dumps(ev), "error")
                    if ev["type"] in types:
                        return ev

            await until("session.created")
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "output_modalities": ["audio"], "max_output_tokens": self.steps,
                "audio": {"input": {"turn_detection": None}}}}))
            await until("session.updated")
            step = 24000 * 2 * self.chunk_ms // 1000
            for i in range(0, len(self.pcm24), step):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(self.pcm24[i:i + step]).decode()}))
            t0, ttfa = time.perf_counter(), None
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.send(json.dumps({"type": "response.create"}))
            while True:
                ev = await until("response.output_audio.delta", "response.output_audio_transcript.delta",
                                 "response.done")
                if ev["type"] != "response.done":
                    on_chunk()
                    if ev["type"] == "response.output_audio.delta" and ttfa is None and ev.get("delta"):
                        ttfa = time.perf_counter() - t0
                    continue
                status = ev["response"]["status"]
                if status not in ("completed", "incomplete"):
                    raise Refused(200, json.dumps(ev["response"].get("status_details")) + f" ({status})", "broken")
                return ttfa
