"""Clients of the Serve app's native surfaces (``POST /v1/dialogue`` with its SSE answer, the WebSocket,
``/healthz``) and a spoken question. Starting the app: ``benchmarks.harness.serve_app``."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import requests

MAX_BODY = 1_500_000  # max_body_bytes of the apps that test the limit
SR = 16000


def speech_wav(text: str = "What is the capital of France?") -> np.ndarray:
    """~1-2 s of real speech (espeak-ng), or a voice-like tone where espeak-ng is missing."""
    if shutil.which("espeak-ng"):
        from deepomni.data.espeak import Voice, speak

        return speak(text, Voice("en-us", speed=200))
    from deepomni.smoke import synthetic_utterance

    return synthetic_utterance(1.2)


# ---------------------------------------------------------------------------------------------- HTTP
def sse_events(resp) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in resp.iter_lines():
        if line.startswith(b"event: "):
            kind = line[7:].decode()
        elif line.startswith(b"data: "):
            events.append((kind, json.loads(line[6:])))
    return events


def dialogue(base, data=None, json_body=None, content_type="audio/wav", params=None, timeout=60):
    headers = {} if json_body is not None else {"Content-Type": content_type}
    return requests.post(f"{base}/v1/dialogue", data=data, json=json_body, headers=headers, params=params,
                         stream=True, timeout=timeout)


def assert_answer(resp, speech: bool = True) -> list[tuple[str, dict]]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp)
    kinds = [k for k, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("end") == 1, kinds
    end = events[-1][1]
    deltas = "".join(d["delta"] for k, d in events if k == "text")
    assert deltas and deltas == end["text"], (deltas, end["text"])
    audio = [d for k, d in events if k == "audio"]
    if speech:
        assert audio, "no audio event"
        assert kinds.index("audio") < kinds.index("end")
        assert kinds.index("audio") < len(kinds) - 2, "the first audio must come before the answer's end"
        pcm = b"".join(base64.b64decode(d["pcm_b64"]) for d in audio)
        assert len(pcm) == 2 * sum(d["samples"] for d in audio)
        assert all(d["sample_rate"] == SR and d["format"] == "pcm_s16le" for d in audio)
        assert [d["seq"] for d in audio] == list(range(len(audio)))
        assert end["ttfa_ms"] > 0 and end["audio_seconds"] > 0 and end["audio_chunks"] == len(audio)
    else:
        assert not audio and end["ttfa_ms"] is None
    return events


def backbone_stats(base) -> dict:
    return requests.get(f"{base}/healthz", timeout=30).json()["backbone"]


# ---------------------------------------------------------------------------------------------- WebSocket
def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/v1/dialogue/ws"


def ws_turn(ws) -> tuple[list[dict], list[bytes]]:
    """Messages of one answer, up to its ``end`` (or ``error``)."""
    msgs, chunks = [], []
    while True:
        m = ws.recv(timeout=60)
        if isinstance(m, bytes):
            chunks.append(m)
            continue
        msg = json.loads(m)
        msgs.append(msg)
        if msg["type"] in ("end", "error"):
            return msgs, chunks
