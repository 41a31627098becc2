"""The OpenAI-compatible surfaces of the Serve app, driven by the official ``openai`` client over 127.0.0.1:
chat completions (text; audio out, streamed and not; audio in; a second turn that reads the first from
the kept context), transcriptions, speech, models, and bad inputs (each a 4xx with OpenAI's error object,
and a good request works after it)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import soundfile as sf

from deepomni.audio import encode_audio, load_audio
from serve_apps.openai_api import MODEL_ID, OPENAI_SAMPLE_RATE
from tests.test_serve import SR, serve_app, speech_wav

openai = pytest.importorskip("openai")
MAX_CONTEXT = 256  # positions: a conversation of a few turns already drops its oldest


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve_app(tmp_path_factory.mktemp("ckpt"), max_steps=16, max_steps_limit=64, max_context=MAX_CONTEXT)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def question_wav() -> bytes:
    return encode_audio(speech_wav(), SR, "WAV")


def _user(text):
    return {"role": "user", "content": text}


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_text_chat_completion(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=[_user("What is the capital of France?")],
                                       max_completion_tokens=8)
    msg = r.choices[0].message
    assert isinstance(msg.content, str) and msg.content and msg.audio is None
    assert r.choices[0].finish_reason == "length"  # the readable test model never ends by itself
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 10
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_second_turn_reads_the_first_from_the_kept_context(client):
    first = [_user("Remember the word apple.")]
    r1 = client.chat.completions.create(model=MODEL_ID, messages=first, max_completion_tokens=6)
    answer = r1.choices[0].message.content
    turn2 = first + [{"role": "assistant", "content": answer}, _user("Which word?")]
    r2 = client.chat.completions.create(model=MODEL_ID, messages=turn2, max_completion_tokens=6)
    # the whole history is the prompt, and all of turn 1 but its last answer token came from the cache
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens + len(answer)
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens + len(answer) - 1


def test_audio_out_not_streamed(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=[_user("Say hello.")],
                                       modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    audio = r.choices[0].message.audio
    assert audio.id and audio.transcript and audio.expires_at > 0
    wav, sr = sf.read(io.BytesIO(base64.b64decode(audio.data)), dtype="float32")
    assert sr == OPENAI_SAMPLE_RATE and len(wav) > 0
    assert r.usage.completion_tokens_details.audio_tokens > 0
    # the answer sent back by id is read as its transcript (same modalities: the same instruction leads)
    r2 = client.chat.completions.create(model=MODEL_ID, messages=[
        _user("Say hello."), {"role": "assistant", "audio": {"id": audio.id}}, _user("Again.")],
        modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}, max_completion_tokens=4)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens


def test_audio_in_and_out_streamed(client, question_wav):
    stream = client.chat.completions.create(
        model=MODEL_ID, stream=True, stream_options={"include_usage": True},
        modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"},
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Answer the recording."},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(question_wav).decode(), "format": "wav"}}]}])
    transcript, pcm, finish, usage, ids = [], [], None, None, set()
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            audio = choice.delta.audio if hasattr(choice.delta, "audio") else None
            audio = audio if isinstance(audio, dict) or audio is None else audio.model_dump()
            if audio:
                ids.add(audio.get("id"))
                transcript.append(audio.get("transcript") or "")
                if audio.get("data"):
                    pcm.append(base64.b64decode(audio["data"]))
            finish = choice.finish_reason or finish
    assert finish in ("stop", "length") and usage is not None
    assert usage.prompt_tokens_details.audio_tokens > 0  # the recording was read
    assert "".join(transcript) and len(ids) == 1
    samples = sum(len(p) for p in pcm) // 2
    assert samples > 0 and all(len(p) % 2 == 0 for p in pcm)


def test_transcriptions(client, question_wav):
    t = client.audio.transcriptions.create(model=MODEL_ID, file=("q.wav", question_wav))
    assert isinstance(t.text, str)
    v = client.audio.transcriptions.create(model=MODEL_ID, file=("q.wav", question_wav),
                                           response_format="verbose_json")
    seconds = len(load_audio(question_wav)) / 16000
    assert abs(v.duration - seconds) < 0.05 and v.text == t.text
    text = client.audio.transcriptions.create(model=MODEL_ID, file=("q.wav", question_wav), response_format="text")
    assert text.strip() == t.text
    events = list(client.audio.transcriptions.create(model=MODEL_ID, file=("q.wav", question_wav), stream=True))
    assert events[-1].type == "transcript.text.done" and events[-1].text == t.text
    assert "".join(e.delta for e in events[:-1]).strip() == t.text


def test_speech(client):
    r = client.audio.speech.create(model=MODEL_ID, voice="alloy", input="Hello there.", response_format="wav")
    # a streamed WAV: 24 kHz, its sizes "unknown" in the header (as a pipe writes it); the audio all there
    assert int.from_bytes(r.content[24:28], "little") == OPENAI_SAMPLE_RATE
    assert len(load_audio(r.content)) == pytest.approx((len(r.content) - 44) / 2 * 16000 / OPENAI_SAMPLE_RATE, abs=2)
    mp3 = client.audio.speech.create(model=MODEL_ID, voice="alloy", input="Hello there.")
    assert len(load_audio(mp3.content)) > 0
    with client.audio.speech.with_streaming_response.create(model=MODEL_ID, voice="alloy", input="Hello.",
                                                            response_format="pcm", stream_format="sse") as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] > 0
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert len(pcm) > 0 and len(pcm) % 2 == 0


# ------------------------------------------------------------------------------------ bad input
BAD = {
    "unknown model": ({"model": "gpt-4o", "messages": [_user("hi")]}, 404, "model_not_found", "model"),
    "no messages": ({"model": MODEL_ID, "messages": []}, 400, "bad_request", "messages"),
    "seed over 64 bits": ({"model": MODEL_ID, "messages": [_user("hi")], "seed": 2 ** 70}, 400, "bad_request", "seed"),
    "bad base64 audio": ({"model": MODEL_ID, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}]}]}, 400, "bad_base64",
        "messages[0].content[0].input_audio.data"),
    "not audio": ({"model": MODEL_ID, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"hello" * 100).decode(), "format": "wav"}}]}]},
        422, "not_audio", None),
    "max_tokens too large": ({"model": MODEL_ID, "messages": [_user("hi")], "max_tokens": 10 ** 6}, 400,
                             "bad_request", "max_tokens"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_chat_requests_get_openai_errors(server, client, name):
    body, status, code, param = BAD[name]
    r = requests.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and err["message"] and err["type"]
    ok = client.chat.completions.create(model=MODEL_ID, messages=[_user("still there?")], max_completion_tokens=2)
    assert ok.choices[0].message.content


def test_malformed_bodies_get_openai_errors(server):
    deep = "[" * 100_000 + "]" * 100_000
    for path, data, headers, status in [
        ("/v1/chat/completions", deep, {"Content-Type": "application/json"}, 400),
        ("/v1/chat/completions", "{not json", {"Content-Type": "application/json"}, 400),
        ("/v1/audio/speech", json.dumps({"model": MODEL_ID, "voice": "a", "input": ""}), {}, 400),
        ("/v1/audio/speech", json.dumps({"model": MODEL_ID, "voice": "a", "input": "x", "response_format": "aac"}),
         {}, 400),
        ("/v1/audio/transcriptions", b"x", {"Content-Type": "application/octet-stream"}, 415),
    ]:
        r = requests.post(f"{server}{path}", data=data, headers=headers, timeout=60)
        assert r.status_code == status, (path, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_the_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="whisper-1", messages=[_user("hi")])
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model=MODEL_ID, file=("x.wav", b"RIFF"), response_format="srt")
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.UnprocessableEntityError):
        client.audio.transcriptions.create(model=MODEL_ID, file=("x.wav", b"not audio at all" * 10))


def test_native_websocket_keeps_the_conversation(server):
    from websockets.sync.client import connect

    from tests.test_serve import ws_turn, ws_url

    with connect(ws_url(server)) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        ends = []
        for i in range(12):  # until the context is full and the oldest turns go, and on
            ws.send(json.dumps({"type": "text", "text": f"Turn {i}: tell me more."}))
            msgs, _ = ws_turn(ws)
            assert msgs[-1]["type"] == "end", msgs[-1]
            ends.append(msgs[-1])
            if sum(e["dropped_turns"] > 0 for e in ends) >= 3:
                break
        assert ends[0]["cached_tokens"] == 0 and ends[0]["dropped_turns"] == 0
        first_drop = next(i for i, e in enumerate(ends) if e["dropped_turns"])
        assert first_drop >= 2, "the first turns all fit"
        for before, after in zip(ends[:first_drop], ends[1:first_drop]):  # each turn reads the earlier ones
            assert after["prompt_tokens"] > before["prompt_tokens"] + len(before["text"])
            assert after["cached_tokens"] >= before["prompt_tokens"]  # ... mostly from the kept context
        # bounded, not broken: every later prompt fits, and after the drop's one full prefill the cache hits again
        assert all(e["prompt_tokens"] + 16 <= MAX_CONTEXT for e in ends)
        extending = [e for e in ends[first_drop + 1:] if e["dropped_turns"] == 0]
        assert extending and all(e["cached_tokens"] > 0 for e in extending)


def test_a_long_chat_is_cut_where_the_kept_context_still_serves(client):
    """A stateless client resends its whole history; past max_context the oldest exchanges go, at a cut
    the next calls keep (so they hit the kept context again) instead of one that moves every call."""
    messages, usage = [], []
    for i in range(10):
        messages.append(_user(f"Question {i}: tell me more."))
        r = client.chat.completions.create(model=MODEL_ID, messages=messages, max_completion_tokens=16)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        usage.append(r.usage)
    prompts = [u.prompt_tokens for u in usage]
    assert all(p + 16 <= MAX_CONTEXT for p in prompts)
    cuts = [i for i in range(1, len(prompts)) if prompts[i] < prompts[i - 1]]
    assert cuts, prompts  # the history outgrew the context
    after_cut = [usage[i].prompt_tokens_details.cached_tokens for i in range(cuts[0] + 1, len(usage)) if i not in cuts]
    assert after_cut and all(c > 0 for c in after_cut), (prompts, after_cut)


# ------------------------------------------------------------------------------------ fuzzing
# Property-based fuzzing of the HTTP and WebSocket surfaces (docs/security.md, "fuzzing"), on this module's
# server: nothing is a 5xx, every refusal is a 4xx with the surface's error object, a WebSocket is closed
# only with a documented code (never 1011) or stays open with error events, and the server answers after.
# The parsers themselves are fuzzed without a server in tests/test_fuzz.py, whose strategies these reuse.
from hypothesis import HealthCheck, Phase, event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from serve_apps.protocol import REASONS  # noqa: E402
from tests.test_fuzz import (ANSWER_FIELDS, CHAT_FIELDS, SESSION_FIELDS, json_values, mostly,  # noqa: E402
                             mutated_audio, near, objects)

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

    from tests.test_serve import ws_url

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
    r = client.chat.completions.create(model=MODEL_ID, messages=[_user("Still there?")], max_completion_tokens=2)
    assert r.choices[0].message.content
