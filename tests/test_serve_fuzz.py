"""Property-based fuzzing of the Serve app's HTTP and WebSocket surfaces (docs/security.md, "fuzzing"), on
this module's app (the settings of tests/test_openai_serve.py's): nothing is a 5xx, every refusal is a 4xx with
the surface's error object, a WebSocket is closed only with a documented code (never 1011) or stays open with
error events, and the server answers after. The parsers themselves are fuzzed without a server in
tests/test_fuzz.py; the strategies both use are in tests/helpers/fuzz.py."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from benchmarks.harness import readable_checkpoint, serve_app
from serve_apps.openai_api import MODEL_ID
from serve_apps.protocol import REASONS
from tests.helpers.fuzz import (ANSWER_FIELDS, CHAT_FIELDS, SESSION_FIELDS, json_values, mostly, mutated_audio, near,
                                objects)
from tests.helpers.serve import ws_url

pytest.importorskip("openai")  # ``client`` (tests/conftest.py)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = {"checkpoint": readable_checkpoint(tmp_path_factory.mktemp("ckpt")), "max_steps": 16,
           "max_steps_limit": 64, "max_context": 256}
    with serve_app(app) as (url, _):
        yield url


SERVER_FUZZ = settings(max_examples=30, deadline=None, database=None,  # each example's waits are bounded
                       phases=[Phase.explicit, Phase.generate, Phase.shrink],  # explain: slow on a server
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                              HealthCheck.filter_too_much])
WAIT_S = 20  # the longest a fuzzed WebSocket waits for the server's next message
NATIVE_PATHS = ("/v1/dialogue", "/static/", "/healthz", "/")
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
_TONE = (3000 * np.sin(np.arange(3600) * 0.2)).astype("<i2").tobytes()  # 150 ms of pcm16 at 24 kHz


def _assert_refusal(path: str, status: int, content: bytes) -> None:
    """No 5xx; a 4xx carries the surface's error object (native ``reason``, OpenAI ``code``/``message``).
    Paths the router does not know (``/static/a/b``) get Starlette's own ``{"detail": ...}``."""
    assert status < 500, (path, status, content[:300])
    if status < 400:
        return event(f"{path} {status}")
    body = json.loads(content)
    if set(body) == {"detail"} and status in (404, 405):
        assert isinstance(body["detail"], str) and body["detail"]
        return event(f"{path} {status} {body['detail']}")
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], body
    if any(path == p or (p.endswith("/") and p != "/" and path.startswith(p)) for p in NATIVE_PATHS):
        assert isinstance(err["reason"], str) and err["reason"] != "internal_error", body
    else:
        assert set(err) == OPENAI_ERROR_KEYS and err["code"] and err["type"] == "invalid_request_error", body
    event(f"{path} {status} {err.get('reason') or err['code']}")


def _still_serving(server: str) -> None:
    assert requests.get(f"{server}/healthz", timeout=60).status_code == 200


def _post(server: str, path: str, **kwargs) -> None:
    """POST, check the status (and a refusal's body); an answer that streams is closed unread (cancelled)."""
    with requests.post(f"{server}{path}", stream=True, timeout=60, **kwargs) as r:
        _assert_refusal(path, r.status_code, r.content if r.status_code >= 400 else b"")


def test_fuzz_openapi_schema(server):
    """schemathesis on the schema FastAPI generates: the GET routes' path parameters, and the POST routes
    (which read their bodies themselves, so the schema declares none) without a body."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json", timeout=60)
    assert {"/v1/chat/completions", "/v1/dialogue", "/v1/models/{model_id}"} <= set(schema.raw_schema["paths"])
    session = requests.Session()

    @settings(SERVER_FUZZ, max_examples=40)
    @given(schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(GenerationMode.NEGATIVE))
    def call(case):
        r = case.call(base_url=server, session=session, timeout=60)
        _assert_refusal(case.path, r.status_code, r.content)

    call()
    _still_serving(server)


NATIVE_FIELDS = {"text": near("Hi.", "", " ", "x" * 4001),
                 "audio_b64": near("", "@@", "UklGRg==", base64.b64encode(_TONE).decode()),
                 "format": near("file", "pcm_s16le", "mp3"), "sample_rate": near(16000, 0, -1, 1.5, "16000", True),
                 **ANSWER_FIELDS}
SPEECH_FIELDS = {"model": near(MODEL_ID, "tts-1"), "input": near("Hi.", "", " ", "x" * 4097),
                 "voice": near("alloy", None), "response_format": near("wav", "pcm", "flac", "mp3", "opus", "aac"),
                 "stream_format": near("audio", "sse", "text"), "speed": json_values}
JSON_BODIES = {"/v1/dialogue": objects(NATIVE_FIELDS), "/v1/chat/completions": objects(CHAT_FIELDS),
               "/v1/audio/speech": objects(SPEECH_FIELDS)}
CONTENT_TYPES = mostly(st.just("application/json"), st.sampled_from([
    "application/json; charset=utf-8", "application/x+json", "audio/wav", "audio/flac", "application/octet-stream",
    "text/plain", ""]))


@SERVER_FUZZ
@given(path=st.sampled_from(sorted(JSON_BODIES)), data=st.data())
def test_fuzz_json_endpoints(server, path, data):
    """Arbitrary bodies (JSON objects shaped like the route's, any JSON value, bytes, audio files) and
    Content-Types on the POST routes that read JSON."""
    body = data.draw(mostly(JSON_BODIES[path].map(json.dumps),
                            json_values.map(json.dumps) | st.binary(max_size=300) | mutated_audio()), label="body")
    ctype = data.draw(CONTENT_TYPES, label="content_type")
    params = data.draw(st.dictionaries(st.sampled_from(sorted(ANSWER_FIELDS)), st.text(max_size=8), max_size=2),
                       label="params")
    _post(server, path, data=body.encode() if isinstance(body, str) else body,
          headers={"Content-Type": ctype} if ctype else {}, params=params)
    _still_serving(server)


_form_fields = st.fixed_dictionaries({"model": near(MODEL_ID, "whisper-1")}, optional={
    "response_format": near("json", "text", "verbose_json", "srt"), "stream": near("true", "false", "1", "maybe"),
    "language": st.text(max_size=4), "temperature": st.text(max_size=4)}).map(
    lambda d: {k: v if isinstance(v, str) else json.dumps(v) for k, v in d.items()})


@SERVER_FUZZ
@given(file=st.none() | st.binary(max_size=400) | mutated_audio(), fields=_form_fields,
       raw=st.none() | st.binary(max_size=200))
def test_fuzz_transcriptions_multipart(server, file, fields, raw):
    """``/v1/audio/transcriptions``: forms with any fields and file bytes (or none), and raw bytes sent as
    a multipart body."""
    if raw is not None:
        _post(server, "/v1/audio/transcriptions", data=raw, headers={"Content-Type": "multipart/form-data; boundary=x"})
    else:
        _post(server, "/v1/audio/transcriptions", data=fields,
              files=None if file is None else {"file": ("question.wav", file)})
    _still_serving(server)


# ------------------------------------------------------------------------------------ WebSocket sequences
def _frames(events: st.SearchStrategy) -> st.SearchStrategy:
    """Frames of a WebSocket sequence: mostly protocol-shaped events, else bytes (noise, PCM, audio files) or
    junk text (not JSON, or JSON that is not an object)."""
    return mostly(events.map(json.dumps), st.binary(max_size=200) | st.sampled_from([_TONE]) | mutated_audio()
                  | st.text(max_size=30) | json_values.map(json.dumps))


def _events(kinds: dict[str, dict[str, st.SearchStrategy]], fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Events of each kind with its own fields (optional), or of any kind with any of ``fields``."""
    return st.one_of(*[st.fixed_dictionaries({"type": st.just(kind)}, optional=own) for kind, own in kinds.items()],
                     st.fixed_dictionaries({"type": st.sampled_from([*kinds, "dance"])}, optional=fields))


_turn_fields = {"format": near("pcm_s16le", "file", "mp5"), "sample_rate": near(16000, 24000, 0, -5, "16000", 2.5),
                **ANSWER_FIELDS}
NATIVE_EVENTS = _events(
    {"start_turn": _turn_fields, "end_of_turn": {}, "cancel": {},
     "text": {"text": near("Hi.", "Tell me more.", "", " ", "x" * 4001), **ANSWER_FIELDS}},
    {"text": near("Hi.", ""), **_turn_fields})
NATIVE_CLOSE_CODES = {1000, 1003, 1007, 1008, 1009}


def _starts_an_answer(frame) -> bool:
    try:
        data = json.loads(frame) if isinstance(frame, str) else None
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("type") in ("end_of_turn", "text")


# a valid start, so that what follows meets an answer in progress and a conversation
NATIVE_PREFIXES = st.sampled_from([[], [{"type": "text", "text": "Hi."}],
                                   [{"type": "start_turn", "format": "pcm_s16le", "sample_rate": 24000}, _TONE,
                                    {"type": "end_of_turn"}]]).map(
    lambda frames: [f if isinstance(f, bytes) else json.dumps(f) for f in frames])


@settings(SERVER_FUZZ, max_examples=40)
@given(frames=st.tuples(NATIVE_PREFIXES, st.lists(_frames(NATIVE_EVENTS), min_size=1, max_size=6)).map(
    lambda t: t[0] + t[1]))
def test_fuzz_native_websocket_sequences(server, frames):
    """``/v1/dialogue/ws``: after any sequence, either the server closed with a documented code, or it
    still answers on the connection (a last 1-step text turn), and every ``error`` message has a 4xx reason."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    turns = sum(map(_starts_an_answer, frames)) + 1  # each one a turn while the connection stays open
    with connect(ws_url(server), max_size=None, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        try:
            for f in [*frames, json.dumps({"type": "start_turn", "speech": False, "max_steps": 1}),
                      json.dumps({"type": "text", "text": "Still there?"})]:
                ws.send(f)
            while True:
                m = ws.recv(timeout=WAIT_S)
                if isinstance(m, bytes):
                    continue
                msg = json.loads(m)
                if msg["type"] == "error":
                    assert REASONS.get(msg["reason"], 500) < 500 and msg["message"], msg
                    event(f"error {msg['reason']}")
                if msg["type"] in ("end", "error") and msg["turn"] == turns:
                    assert msg["type"] == "end" and not msg.get("cancelled"), msg
                    event(f"open after {turns - 1} turns")
                    break
        except ConnectionClosed as e:
            assert e.rcvd is not None and e.rcvd.code in NATIVE_CLOSE_CODES and e.rcvd.reason, (e, frames)
            event(f"closed {e.rcvd.code}")
    _still_serving(server)


_pcm_b64 = (st.sampled_from(["", "@@", base64.b64encode(b"\x01").decode(), base64.b64encode(_TONE).decode()])
            | st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()))
_content_part = objects({"type": near("input_text", "input_audio", "output_text", "output_audio", "image"),
                         "text": near("Hi."), "audio": _pcm_b64, "transcript": near("Said before.")})
_session = st.fixed_dictionaries({"type": near("realtime", "transcription")},
                                 optional={k: v for k, v in SESSION_FIELDS.items() if k != "type"})
_item_id = near("item_fuzz", "nope")
REALTIME_FIELDS = {
    "session": _session, "audio": _pcm_b64,
    "item": objects({"type": near("message", "function_call"), "role": near("user", "assistant", "system"),
                     "id": near("item_fuzz", ""), "content": st.lists(_content_part, max_size=2) | json_values}),
    "previous_item_id": near(None, "root", "item_fuzz", "nope"), "item_id": _item_id,
    "content_index": near(0, 1), "audio_end_ms": near(0, 10, -1, 10**9), "response_id": near(None, "resp_x"),
    "response": objects({"instructions": near("Be brief."), "output_modalities": near(["text"], ["audio"]),
                         "max_output_tokens": near(1, 2, "inf", 0), "conversation": near("auto", "none"),
                         "input": json_values, "metadata": json_values, "audio": json_values, "tools": near([])}),
    "event_id": near("evt_fuzz")}
REALTIME_EVENTS = _events({
    kind: {k: REALTIME_FIELDS[k] for k in own} for kind, own in {
        "session.update": ["session"], "input_audio_buffer.append": ["audio"], "input_audio_buffer.commit": [],
        "input_audio_buffer.clear": [], "conversation.item.create": ["item", "previous_item_id"],
        "conversation.item.delete": ["item_id"], "conversation.item.truncate": ["item_id", "content_index",
                                                                                "audio_end_ms"],
        "conversation.item.retrieve": ["item_id"], "output_audio_buffer.clear": [], "response.create": ["response"],
        "response.cancel": ["response_id"]}.items()}, REALTIME_FIELDS)

_user_item = {"type": "conversation.item.create", "item": {
    "id": "item_fuzz", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi."}]}}
_said_item = {"type": "conversation.item.create", "item": {
    "id": "item_fuzz", "type": "message", "role": "assistant",
    "content": [{"type": "output_audio", "transcript": "Hello."}]}}
REALTIME_PREFIXES = st.sampled_from([  # valid starts, so that what follows meets items, audio and an answer
    [], [_user_item], [_said_item], [_user_item, {"type": "response.create", "response": {"max_output_tokens": 4}}],
    [{"type": "input_audio_buffer.append", "audio": base64.b64encode(_TONE).decode()}]]).map(
    lambda events: [json.dumps(e) for e in events])


@settings(SERVER_FUZZ, max_examples=40)
@given(frames=st.tuples(REALTIME_PREFIXES, st.lists(_frames(REALTIME_EVENTS), min_size=1, max_size=6)).map(
    lambda t: t[0] + t[1]), model=mostly(st.sampled_from([None, MODEL_ID]), near("gpt-realtime", "")))
def test_fuzz_realtime_sequences(server, frames, model):
    """``/v1/realtime``: any sequence leaves the connection open with ``error`` events for what was refused
    (all 4xx), up to a last event whose error comes back; a wrong ``model`` is an error event and 1008."""
    from urllib.parse import urlencode

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    query = "" if model is None else "?" + urlencode({"model": model if isinstance(model, str) else json.dumps(model)})
    with connect(server.replace("http://", "ws://") + "/v1/realtime" + query, max_size=None, open_timeout=30) as ws:
        if model not in (None, MODEL_ID):
            ev = json.loads(ws.recv(timeout=30))
            assert ev["type"] == "error" and ev["error"]["code"] == "model_not_found", ev
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        else:
            assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
            for f in [*frames, json.dumps({"type": "fuzz.done", "event_id": "evt_last"})]:
                ws.send(f)
            while True:  # the connection stays open (ConnectionClosed fails the test) up to the last event's error
                ev = json.loads(ws.recv(timeout=WAIT_S))
                note(str(ev)[:300])
                if ev["type"] == "error":
                    err = ev["error"]
                    assert err["type"] == "invalid_request_error" and err["code"] != "internal_error", ev
                    event(f"error {err['code']}")
                    if err["event_id"] == "evt_last":
                        break
                else:
                    event(ev["type"])
    _still_serving(server)


def test_serving_after_the_fuzzing(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Still there?"}],
                                       max_completion_tokens=2)
    assert r.choices[0].message.content
