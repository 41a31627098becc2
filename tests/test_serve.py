"""The Serve app (serve_apps/) in-process on the embedded local Ray, over HTTP and WebSocket on 127.0.0.1:
each endpoint, the streamed answer (text and audio, first audio before the end), multi-turn WebSocket,
every bad input (status / close code, and a normal request still works after it), and a client that
goes away mid-answer (its session is cancelled and its rows freed)."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest
import requests

from benchmarks.harness import readable_checkpoint, serve_app
from deepomni.audio import encode_audio
from serve_apps.protocol import pcm_s16le
from tests.helpers.serve import (MAX_BODY, SR, assert_answer, backbone_stats, dialogue, speech_wav, ws_turn,
                                 ws_url)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The Serve app on the embedded local Ray at 127.0.0.1, on the readable checkpoint; this module's own."""
    app = {"checkpoint": readable_checkpoint(tmp_path_factory.mktemp("ckpt")), "max_steps": 24,
           "max_body_bytes": MAX_BODY}
    with serve_app(app) as (url, _):
        yield url


@pytest.fixture(scope="module")
def wav_bytes():
    return encode_audio(speech_wav(), SR, "WAV")


# ---------------------------------------------------------------------------------------------- HTTP
def test_healthz(server):
    r = requests.get(f"{server}/healthz", timeout=30)
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["sample_rate"] == SR and h["format"] == "pcm_s16le"
    assert h["max_seconds"] == 8 and h["max_body_bytes"] == MAX_BODY
    assert h["backbone"]["active_sessions"] == 0


def test_page_and_its_scripts_are_served(server):
    r = requests.get(server + "/", timeout=30)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"] and 'id="transcript"' in r.text
    for name in ("app.js", "pcm-recorder.js"):
        assert requests.get(f"{server}/static/{name}", timeout=30).status_code == 200
    assert requests.get(f"{server}/static/secret.py", timeout=30).status_code == 404


def test_dialogue_wav_bytes_streams_text_and_audio(server, wav_bytes):
    events = assert_answer(dialogue(server, wav_bytes, params={"seed": 1}))
    assert events[0][1]["sample_rate"] == SR


def test_dialogue_base64_json_flac(server):
    flac = encode_audio(speech_wav("Hello there."), SR, "FLAC")
    assert_answer(dialogue(server, json_body={"audio_b64": base64.b64encode(flac).decode(), "max_steps": 16}))


def test_dialogue_base64_json_raw_pcm(server):
    pcm = pcm_s16le(speech_wav("Hello there."))
    body = {"audio_b64": base64.b64encode(pcm).decode(), "format": "pcm_s16le", "sample_rate": SR}
    assert_answer(dialogue(server, json_body=body))


def test_dialogue_text_question(server):
    assert_answer(dialogue(server, json_body={"text": "What is the capital of France?"}))
    assert_answer(dialogue(server, json_body={"text": "Two plus two?", "speech": False}), speech=False)


def _truncated(wav_bytes: bytes) -> bytes:
    return wav_bytes[: len(wav_bytes) // 2]


def _too_long() -> bytes:  # 31 s at 8 kHz: small in bytes, over the encoder's window (tiny: 8 s)
    return encode_audio(np.zeros(31 * 8000, dtype=np.float32) + 0.01, 8000, "WAV")


BAD_INPUTS = {
    # name: (content type or "json", body, status, reason)
    "not_audio": ("audio/wav", b"this is not audio at all, just some text " * 20, 422, "not_audio"),
    "truncated": ("audio/wav", _truncated, 422, "truncated_audio"),
    "empty": ("audio/wav", b"", 422, "empty_audio"),
    "too_long": ("audio/wav", lambda w: _too_long(), 422, "audio_too_long"),
    "oversized": ("audio/wav", b"\0" * (MAX_BODY + 1), 413, "body_too_large"),
    "malformed_json": ("application/json", b'{"audio_b64": "abc"', 400, "malformed_json"),
    "json_not_object": ("application/json", b'["x"]', 400, "malformed_json"),
    "bad_base64": ("json", {"audio_b64": "***not base64***"}, 400, "bad_base64"),
    "audio_and_text": ("json", {"audio_b64": "AAAA", "text": "hi"}, 400, "bad_request"),
    "neither": ("json", {"speech": True}, 400, "bad_request"),
    "max_steps_over_limit": ("json", {"text": "hi", "max_steps": 10**6}, 400, "bad_request"),
    "odd_pcm": ("json", {"audio_b64": "AAAA", "format": "pcm_s16le", "sample_rate": 16000}, 422, "bad_audio"),
    "bad_sample_rate": ("json", {"audio_b64": "AAAAAA==", "format": "pcm_s16le", "sample_rate": 3}, 422, "bad_audio"),
    "unsupported_media_type": ("text/plain", b"hello", 415, "unsupported_media_type"),
    "deeply_nested_json": ("application/json", b"[" * 100_000 + b"]" * 100_000, 400, "malformed_json"),
    "seed_over_64_bits": ("json", {"text": "hi", "seed": 2 ** 70}, 400, "bad_request"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_refused_and_the_server_goes_on(server, wav_bytes, name):
    ctype, body, status, reason = BAD_INPUTS[name]
    body = body(wav_bytes) if callable(body) else body
    if ctype == "json":
        r = dialogue(server, json_body=body)
    else:
        r = dialogue(server, body, content_type=ctype)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["reason"] == reason and err["message"]
    assert_answer(dialogue(server, json_body={"text": "still there?", "max_steps": 8}))


def test_client_disconnect_mid_answer_cancels_the_session(server, wav_bytes):
    t0 = time.perf_counter()
    r = dialogue(server, wav_bytes, params={"max_steps": 1000})
    assert r.status_code == 200
    lines = r.iter_lines()  # kept referenced: dropping the iterator would already hang up
    for line in lines:
        if line.startswith(b"event: audio"):
            break
    assert backbone_stats(server)["active_sessions"] == 1, "the long answer should still be running"
    r.close()  # hang up mid-answer
    deadline = time.perf_counter() + 20
    while time.perf_counter() < deadline:
        st = backbone_stats(server)
        if st["active_sessions"] == 0 and st["rows"] == 0 and st["sessions"] == 0:
            break
        time.sleep(0.2)
    assert st["active_sessions"] == 0 and st["rows"] == 0, st
    assert time.perf_counter() - t0 < 20
    assert_answer(dialogue(server, json_body={"text": "and now?", "max_steps": 8}))


# ---------------------------------------------------------------------------------------------- WebSocket
def test_websocket_two_turns_in_one_connection(server):
    from websockets.sync.client import connect

    pcm = pcm_s16le(speech_wav())
    with connect(ws_url(server)) as ws:
        ready = json.loads(ws.recv(timeout=30))
        assert ready["type"] == "ready" and ready["sample_rate"] == SR and "pcm_s16le" in ready["input_formats"]
        # turn 1: spoken, streamed in ~100 ms binary frames
        ws.send(json.dumps({"type": "start_turn", "format": "pcm_s16le", "sample_rate": SR, "max_steps": 20}))
        for i in range(0, len(pcm), 3200):
            ws.send(pcm[i:i + 3200])
        ws.send(json.dumps({"type": "end_of_turn"}))
        msgs, chunks = ws_turn(ws)
        kinds = [m["type"] for m in msgs]
        assert kinds[0] == "start" and kinds[-1] == "end" and "text" in kinds, kinds
        assert chunks and all(len(c) % 2 == 0 for c in chunks)
        end = msgs[-1]
        assert end["turn"] == 1 and end["audio_chunks"] == len(chunks) and end["ttfa_ms"] > 0
        assert "".join(m["delta"] for m in msgs if m["type"] == "text") == end["text"]
        # turn 2: a whole audio file this time, then turn 3: a written question
        wav = encode_audio(speech_wav("And the capital of Spain?"), 22050, "WAV")
        ws.send(json.dumps({"type": "start_turn", "format": "file", "sample_rate": 22050}))
        ws.send(wav)
        ws.send(json.dumps({"type": "end_of_turn"}))
        msgs, chunks = ws_turn(ws)
        assert msgs[-1]["type"] == "end" and msgs[-1]["turn"] == 2 and chunks
        ws.send(json.dumps({"type": "text", "text": "Thanks!"}))
        msgs, chunks = ws_turn(ws)
        assert msgs[-1]["type"] == "end" and msgs[-1]["turn"] == 3


def test_websocket_bad_turn_is_an_error_message_and_the_connection_goes_on(server):
    from websockets.sync.client import connect

    with connect(ws_url(server)) as ws:
        ws.recv(timeout=30)
        ws.send(json.dumps({"type": "start_turn", "format": "file", "sample_rate": SR}))
        ws.send(b"definitely not audio" * 10)
        ws.send(json.dumps({"type": "end_of_turn"}))
        msgs, _ = ws_turn(ws)
        assert msgs[-1]["type"] == "error" and msgs[-1]["reason"] == "not_audio"
        ws.send(json.dumps({"type": "end_of_turn"}))  # nothing recorded
        msgs, _ = ws_turn(ws)
        assert msgs[-1]["type"] == "error" and msgs[-1]["reason"] == "empty_audio"
        ws.send(json.dumps({"type": "text", "text": "still there?"}))
        msgs, _ = ws_turn(ws)
        assert msgs[-1]["type"] == "end"


WS_VIOLATIONS = {
    # name: (frames to send after "ready", close code)
    "not_json": (["{this is not json"], 1007),
    "not_an_object": (["[1, 2]"], 1007),
    "no_type": (['{"text": "hi"}'], 1007),
    "unknown_type": (['{"type": "dance"}'], 1003),
    "bad_start_turn": (['{"type": "start_turn", "format": "mp5", "sample_rate": 16000}'], 1008),
    "empty_text": (['{"type": "text", "text": ""}'], 1008),
    "odd_pcm": (['{"type": "start_turn", "format": "pcm_s16le", "sample_rate": 16000}', b"\x01\x02\x03",
                 '{"type": "end_of_turn"}'], 1007),
    "too_big": (['{"type": "start_turn", "format": "pcm_s16le", "sample_rate": 16000}', b"\0" * (MAX_BODY + 2)], 1009),
}


@pytest.mark.parametrize("name", list(WS_VIOLATIONS))
def test_websocket_malformed_frames_close_with_a_code(server, name):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    frames, code = WS_VIOLATIONS[name]
    with connect(ws_url(server), max_size=None) as ws:
        ws.recv(timeout=30)
        for f in frames:
            ws.send(f)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                ws.recv(timeout=30)
        assert info.value.rcvd is not None and info.value.rcvd.code == code, info.value
        assert info.value.rcvd.reason
    assert_answer(dialogue(server, json_body={"text": "next one", "max_steps": 8}))


def test_websocket_disconnect_mid_answer_frees_the_session(server):
    from websockets.sync.client import connect

    with connect(ws_url(server)) as ws:
        ws.recv(timeout=30)
        ws.send(json.dumps({"type": "start_turn", "format": "pcm_s16le", "sample_rate": SR, "max_steps": 1000}))
        ws.send(json.dumps({"type": "text", "text": "Tell me a long story."}))
        while not isinstance(ws.recv(timeout=60), bytes):  # until the first audio chunk
            pass
        assert backbone_stats(server)["active_sessions"] == 1
    deadline = time.perf_counter() + 20
    while time.perf_counter() < deadline and backbone_stats(server)["active_sessions"]:
        time.sleep(0.2)
    st = backbone_stats(server)
    assert st["active_sessions"] == 0 and st["rows"] == 0, st


def test_metric_names_follow_prometheus_conventions():
    from serve_apps.metrics import METRIC_NAMES, METRICS, exported_names

    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    for spec in METRICS:
        assert spec.name.startswith("deepomni_") and not spec.name.endswith("_total")
        if spec.kind == "histogram" and "seconds" in spec.description.lower():
            assert spec.name.endswith("_seconds") or spec.name == "deepomni_real_time_factor"
    assert "ray_deepomni_rejected_requests_total" in exported_names()
    assert "ray_deepomni_time_to_first_audio_seconds" in exported_names()


def test_config_yaml_sets_autoscaling_for_every_deployment():
    from serve_apps.app import deployment_options
    from deepomni.serve.config import AppConfig

    opts = deployment_options()
    assert set(opts) == {"Ingress", "SpeechEncoder", "Backbone", "Vocoder"}
    for name, o in opts.items():
        a = o["autoscaling_config"]
        assert 1 <= a["min_replicas"] <= a["max_replicas"] and a["target_ongoing_requests"] > 0, name
        assert 0 < o["ray_actor_options"]["num_cpus"] < 1, name
    with pytest.raises(ValueError, match="AppConfig: chekpoint: unknown field"):
        AppConfig.from_args({"chekpoint": "x"})
    with pytest.raises(FileNotFoundError):
        AppConfig.from_args({"checkpoint": "/nonexistent/ckpt"})
    assert AppConfig.from_args({"max_steps": "32", "codec": ""}).max_steps == 32


def test_deployment_settings_live_only_in_config_yaml(tmp_path):
    """The decorators name the deployments and set nothing else; build_app needs a config that sets them all."""
    import yaml

    from serve_apps.app import CONFIG_YAML, build_app
    from serve_apps.backbone import Backbone
    from serve_apps.encoder import SpeechEncoder
    from serve_apps.ingress import Ingress
    from serve_apps.vocoder import Vocoder

    for d in (Ingress, SpeechEncoder, Backbone, Vocoder):
        assert d._deployment_config.user_configured_option_names == {"name"}, d.name
    with pytest.raises(ValueError, match="Serve config file"):
        build_app({"serve_config": "none"})
    doc = yaml.safe_load(CONFIG_YAML.read_text())
    doc["applications"][0]["deployments"] = [d for d in doc["applications"][0]["deployments"] if d["name"] != "Vocoder"]
    partial = tmp_path / "serve.yaml"
    partial.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="Vocoder"):
        build_app({"serve_config": str(partial)})


def test_serve_defaults_to_the_demo_model(tmp_path, monkeypatch):
    """`deepomni serve` with no flags serves what `make demo` trained (recipe checkpoint + its codec), and
    finds nothing (random weights, said aloud) before the demo ran."""
    from serve_apps.cli import DEMO_OUT, demo_model

    monkeypatch.chdir(tmp_path)
    elsewhere = str(tmp_path / "no-checkout")
    assert demo_model(elsewhere) is None
    ckpt, codec = tmp_path / DEMO_OUT / "runs" / "s3_joint" / "final", tmp_path / DEMO_OUT / "data" / "codec"
    ckpt.mkdir(parents=True)
    codec.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"")
    assert demo_model(elsewhere) is None  # no codec yet: not a finished demo
    (codec / "config.json").write_text("{}")
    assert demo_model(elsewhere) == (str(ckpt), f"builtin:{codec}")


def test_wav_written_to_a_pipe_is_answered(server):
    """``espeak-ng --stdout`` / ``ffmpeg -f wav pipe:`` write unknown sizes (0x7FFFF000 / 0xFFFFFFFF): the
    data that is there is read."""
    import struct

    pcm = pcm_s16le(speech_wav())
    for unknown in (0x7FFFF000, 0xFFFFFFFF):
        header = (b"RIFF" + struct.pack("<I", unknown if unknown == 0xFFFFFFFF else unknown + 36) + b"WAVE" +
                  b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, SR, 2 * SR, 2, 16) + b"data" + struct.pack("<I", unknown))
        assert_answer(dialogue(server, header + pcm, params={"max_steps": 8}))
