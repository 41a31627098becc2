"""The OpenAI-compatible surfaces of the Serve app, driven by the official ``openai`` client over 127.0.0.1:
chat completions (text; audio out, streamed and not; audio in; a second turn that reads the first from
the kept context), transcriptions, speech, models, and bad inputs (each a 4xx with OpenAI's error object,
and a good request works after it)."""

from __future__ import annotations

import base64
import io
import json

import pytest
import requests
import soundfile as sf

from benchmarks.harness import readable_checkpoint, serve_app
from deepomni.audio import encode_audio, load_audio
from serve_apps.openai_api import MODEL_ID, OPENAI_SAMPLE_RATE
from tests.helpers.serve import SR, speech_wav, ws_turn, ws_url

openai = pytest.importorskip("openai")
MAX_CONTEXT = 256  # positions: a conversation of a few turns already drops its oldest


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """This module's app; ``client`` (tests/conftest.py) is the official client on it."""
    app = {"checkpoint": readable_checkpoint(tmp_path_factory.mktemp("ckpt")), "max_steps": 16,
           "max_steps_limit": 64, "max_context": MAX_CONTEXT}
    with serve_app(app) as (url, _):
        yield url


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
