"""``WS /v1/realtime`` (OpenAI's Realtime API, GA event names) driven by the official ``openai`` client over
127.0.0.1: two spoken turns with the server events in order (the second reads the first from the kept
context), barge-in by ``response.cancel`` and by a new committed turn, a text item answered in text, bad
inputs (each an ``error`` event, and the session goes on), and server VAD (speech start/stop, automatic
commit and response, barge-in by speech). Every event the server sends is validated against the client's
own pydantic types (``RealtimeServerEvent``)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import pytest
import soxr

from benchmarks.harness import readable_checkpoint, serve_app
from serve_apps.openai_api import MODEL_ID, OPENAI_SAMPLE_RATE
from serve_apps.protocol import pcm_s16le
from tests.helpers.serve import SR, backbone_stats, speech_wav

openai = pytest.importorskip("openai")
pytest.importorskip("websockets")
from tests.helpers.realtime import SERVER_EVENT, no_vad, recv, until  # noqa: E402

CHUNK = OPENAI_SAMPLE_RATE * 2 // 10  # 100 ms of pcm16 at 24 kHz
AUDIO_ORDER = ["response.created", "response.output_item.added", "conversation.item.added",
               "response.content_part.added", "response.output_audio.done", "response.output_audio_transcript.done",
               "response.content_part.done", "response.output_item.done", "conversation.item.done", "response.done"]
TEXT_ORDER = ["response.created", "response.output_item.added", "conversation.item.added",
              "response.content_part.added", "response.output_text.done", "response.content_part.done",
              "response.output_item.done", "conversation.item.done", "response.done"]
ITEM_ADDED = ["conversation.item.added", "conversation.item.done"]
DELTAS = ("response.output_audio.delta", "response.output_audio_transcript.delta", "response.output_text.delta")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve_app({"checkpoint": readable_checkpoint(tmp_path_factory.mktemp("ckpt")), "max_steps": 16}) as (url, _):
        yield url


@pytest.fixture(scope="module")
def question_pcm() -> bytes:
    """~1.5 s of speech as Realtime sends it: pcm16 at 24 kHz."""
    return pcm_s16le(soxr.resample(speech_wav(), SR, OPENAI_SAMPLE_RATE))


def run(server: str, session) -> None:
    """Run ``session(conn)`` on a Realtime connection of the async client (its reads can time out)."""
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        async with client.realtime.connect(model=MODEL_ID) as conn:
            first = await recv(conn)
            assert first.type == "session.created" and first.session.type == "realtime"
            await session(conn)
    asyncio.run(main())


async def say(conn, pcm: bytes) -> None:
    for i in range(0, len(pcm), CHUNK):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + CHUNK]).decode())


def kinds(events) -> list[str]:
    return [e.type for e in events if e.type not in DELTAS]


def deltas(events, kind: str) -> list[str]:
    return [e.delta for e in events if e.type == kind]


def codec(server: str) -> tuple[float, int]:
    """The codec's frame rate and channels, as /healthz reports them (over HTTP: a driver-side Serve handle
    fails outside an event loop in Serve's throughput mode)."""
    import requests

    info = requests.get(f"{server}/healthz", timeout=30).json()
    return info["frame_rate"], info["codec_channels"]


# ------------------------------------------------------------------------------------------ no server
def test_items_become_alternating_turns_and_the_session_validates():
    from openai.types.realtime import RealtimeSessionCreateRequest

    from serve_apps.realtime import Item, SessionConfig, _turns

    a = np.ones((3, 4), np.float32)
    items = [Item("1", "assistant", [], "hi"), Item("2", "user", [], None, a), Item("3", "system", [], "be brief"),
             Item("4", "user", [], "and this", a), Item("5", "assistant", [], "ok")]
    turns = _turns(items)
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[0].text == "" and turns[2].text == "and this" and turns[2].audio_ND.shape == (6, 4)
    assert turns[-1].text == ""  # a response after the assistant's: an empty user turn to answer
    cfg = SessionConfig().updated({"type": "realtime", "output_modalities": ["text"], "max_output_tokens": 7,
                                   "audio": {"input": {"turn_detection": None}, "output": {"voice": "marin"}}}, 64)
    body = RealtimeSessionCreateRequest.model_validate(cfg.body())
    assert body.output_modalities == ["text"] and body.max_output_tokens == 7 and body.audio.output.voice == "marin"
    assert body.audio.input.turn_detection is None and body.audio.input.format.rate == OPENAI_SAMPLE_RATE


def test_turns_the_backbone_dropped_are_forgotten():
    from types import SimpleNamespace

    from serve_apps.realtime import Item, RealtimeSession, _turns

    items = [Item("1", "assistant", [], "hi"), Item("2", "user", [], "q1"), Item("3", "system", [], "be brief"),
             Item("4", "user", [], "q1b"), Item("5", "assistant", [], "a1"), Item("6", "user", [], "q2")]
    session = SimpleNamespace(items=list(items))
    before = _turns(session.items)
    RealtimeSession.forget_turns(session, 2)  # the empty user turn and "hi"
    assert [it.id for it in session.items] == ["2", "3", "4", "5", "6"]
    assert _turns(session.items) == before[2:]
    RealtimeSession.forget_turns(session, 2)  # the exchange q1 q1b -> a1
    assert [it.id for it in session.items] == ["3", "6"]


# ------------------------------------------------------------------------------------------ turns
def test_two_spoken_turns_in_order_with_memory(server, question_pcm):
    frame_rate, channels = codec(server)
    usage = []

    async def session(conn):
        await no_vad(conn)
        for _ in range(2):
            await say(conn, question_pcm)
            await conn.input_audio_buffer.commit()
            events = await until(conn, "conversation.item.done")
            assert kinds(events) == ["input_audio_buffer.committed", *ITEM_ADDED]
            user = events[-1].item
            assert user.role == "user" and user.id == events[0].item_id and user.content[0].type == "input_audio"
            await conn.response.create()
            events = await until(conn, "response.done")
            assert kinds(events) == AUDIO_ORDER, kinds(events)
            first, last = events.index(next(e for e in events if e.type in DELTAS)), len(events) - 6
            assert all(e.type in DELTAS for e in events[first:last])
            assert events[last].type == "response.output_audio.done"
            transcript = "".join(deltas(events, "response.output_audio_transcript.delta"))
            pcm = b"".join(base64.b64decode(d) for d in deltas(events, "response.output_audio.delta"))
            done = events[-1].response
            assert done.status == "incomplete" and done.status_details.reason == "max_output_tokens"  # ran to 16 steps
            assert done.output[0].content[0].transcript == transcript == events[-5].transcript and transcript
            assert done.output[0].content[0].type == "output_audio" and done.output[0].role == "assistant"
            # pcm16 at 24 kHz: as long as the codec frames the answer made
            frames = done.usage.output_token_details.audio_tokens // channels
            assert len(pcm) % 2 == 0 and frames > 0
            assert len(pcm) // 2 == pytest.approx(frames / frame_rate * OPENAI_SAMPLE_RATE, rel=0.1, abs=480)
            usage.append(done.usage)

    run(server, session)
    one, two = usage
    assert one.input_token_details.cached_tokens == 0 and one.input_token_details.audio_tokens > 0
    # the second prompt holds the first turn and its answer, which came from the kept context
    assert two.input_tokens > one.input_tokens + one.output_token_details.text_tokens
    assert two.input_token_details.cached_tokens >= one.input_tokens


def test_text_item_answered_in_text(server):
    async def session(conn):
        await no_vad(conn, output_modalities=["text"], instructions="Answer briefly.")
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Hello there!"}]})
        events = await until(conn, "conversation.item.done")
        assert kinds(events) == ITEM_ADDED
        assert events[-1].item.content[0].text == "Hello there!"
        await conn.response.create(response={"max_output_tokens": 8})
        events = await until(conn, "response.done")
        assert kinds(events) == TEXT_ORDER, kinds(events)
        text = "".join(deltas(events, "response.output_text.delta"))
        done = events[-1].response
        assert text and done.output[0].content[0].text == text == events[-5].text
        assert done.usage.output_token_details.audio_tokens == 0 and done.usage.output_token_details.text_tokens == 8
        assert not deltas(events, "response.output_audio.delta")
        # a text answer has no audio to truncate; an item can be deleted
        await conn.conversation.item.truncate(item_id=done.output[0].id, content_index=0, audio_end_ms=0)
        assert (await recv(conn)).type == "error"
        await conn.conversation.item.delete(item_id=done.output[0].id)
        ev = await recv(conn)
        assert ev.type == "conversation.item.deleted" and ev.item_id == done.output[0].id

    run(server, session)


# ------------------------------------------------------------------------------------------ barge-in
async def long_answer(conn) -> list:
    """Start a long spoken answer; the events up to its first audio."""
    await conn.response.create(response={"max_output_tokens": 1000})
    return await until(conn, "response.output_audio.delta")


def test_barge_in(server, question_pcm):
    async def session(conn):
        await no_vad(conn)
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Tell me a long story."}]})
        await until(conn, "conversation.item.done")
        # response.cancel stops the answer that is playing
        await long_answer(conn)
        await conn.response.cancel()
        events = await until(conn, "response.done")
        done = events[-1].response
        assert done.status == "cancelled" and done.status_details.reason == "client_cancelled"
        assert kinds(events)[-5:] == AUDIO_ORDER[-5:] and done.output[0].status == "incomplete"
        assert done.output[0].content[0].transcript == events[-5].transcript
        # a new committed turn stops it too; the turn is then answered, with the interrupted answer in context
        started = await long_answer(conn)
        await say(conn, question_pcm)
        await conn.input_audio_buffer.commit()
        events = await until(conn, "input_audio_buffer.committed")
        assert kinds(events)[-7:] == AUDIO_ORDER[-6:] + ["input_audio_buffer.committed"]  # stopped, then the turn
        cancelled = events[-2].response
        assert cancelled.id == started[0].response.id and cancelled.status == "cancelled"
        assert cancelled.status_details.reason == "turn_detected"
        assert kinds(await until(conn, "conversation.item.done")) == ITEM_ADDED
        # truncate the interrupted answer to what was heard
        heard = cancelled.output[0]
        await conn.conversation.item.truncate(item_id=heard.id, content_index=0, audio_end_ms=10 ** 6)
        ev = await recv(conn)
        assert ev.type == "error" and ev.error.param == "audio_end_ms"  # longer than the audio sent
        await conn.conversation.item.truncate(item_id=heard.id, content_index=0, audio_end_ms=0)
        ev = await recv(conn)
        assert ev.type == "conversation.item.truncated" and ev.item_id == heard.id and ev.audio_end_ms == 0
        await conn.response.create()
        events = await until(conn, "response.done")
        assert kinds(events) == AUDIO_ORDER and events[-1].response.status == "incomplete"

    run(server, session)
    stats = backbone_stats(server)
    assert stats["active_sessions"] == 0 and stats["rows"] == 0, stats


# ------------------------------------------------------------------------------------------ bad input
BAD = {  # name: (raw client event, error code, param)
    "not json": ("{nope", "invalid_json", None),
    "unknown event type": ({"type": "dance"}, "invalid_value", "type"),
    "bad base64 audio": ({"type": "input_audio_buffer.append", "audio": "@@not base64@@"}, "bad_base64", "audio"),
    "commit on empty buffer": ({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty", None),
    "unsupported audio format": ({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "format": {"type": "audio/pcmu"}}}}}, "invalid_value", "session.audio.input.format.type"),
    "semantic vad": ({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "turn_detection": {"type": "semantic_vad"}}}}}, "invalid_value", "session.audio.input.turn_detection.type"),
    "beta field": ({"type": "session.update", "session": {"type": "realtime", "voice": "alloy"}},
                   "unknown_parameter", "session.voice"),
    "tools": ({"type": "session.update", "session": {"type": "realtime", "tools": [
        {"type": "function", "name": "f"}]}}, "unsupported_parameter", "session.tools"),
    "max_output_tokens too large": ({"type": "response.create", "response": {"max_output_tokens": 10 ** 6}},
                                    "invalid_value", "response.max_output_tokens"),
    "image content": ({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_image", "image_url": "data:"}]}}, "unsupported_content", "item.content[0].type"),
    "truncate unknown item": ({"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0,
                               "audio_end_ms": 10}, "item_not_found", "item_id"),
    "cancel with none active": ({"type": "response.cancel"}, "response_cancel_not_active", None),
    "no audio": ({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_audio", "audio": ""}]}}, "empty_audio", None),
}


def test_bad_inputs_are_error_events_and_the_session_goes_on(server):
    async def session(conn):
        await no_vad(conn)
        for i, (name, (event, code, param)) in enumerate(BAD.items()):
            if isinstance(event, dict):
                event = json.dumps({**event, "event_id": f"evt_{i}"})
            await conn.send_raw(event)
            ev = await recv(conn)
            assert ev.type == "error", (name, ev)
            assert ev.error.type == "invalid_request_error" and ev.error.message, (name, ev)
            assert (ev.error.code, ev.error.param) == (code, param), (name, ev.error)
            assert ev.error.event_id == (None if name == "not json" else f"evt_{i}"), name
        # the session is as it was: no VAD, audio out
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Still there?"}]})
        await until(conn, "conversation.item.done")
        await conn.response.create()
        await conn.response.create()  # while one is active
        events = await until(conn, "response.done")
        errors = [e for e in events if e.type == "error"]
        assert [e.error.code for e in errors] == ["conversation_already_has_active_response"]
        assert [k for k in kinds(events) if k != "error"] == AUDIO_ORDER
        # an answer the model cannot give (the prompt does not fit): an error, and the response failed
        await conn.response.create(response={"instructions": "x" * 15000})
        events = await until(conn, "response.done")
        assert kinds(events) == ["response.created", "error", "response.done"]
        failed = events[-1].response
        assert failed.status == "failed"
        assert events[1].error.code == failed.status_details.error.code == "prompt_too_long"

    run(server, session)


def test_disconnect_mid_answer_frees_the_session(server):
    async def session(conn):
        await no_vad(conn)
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Talk for a while."}]})
        await long_answer(conn)  # and the client goes away

    run(server, session)
    deadline = time.perf_counter() + 20
    while time.perf_counter() < deadline and backbone_stats(server)["active_sessions"]:
        time.sleep(0.2)
    stats = backbone_stats(server)
    assert stats["active_sessions"] == 0 and stats["rows"] == 0, stats


def test_unknown_model_is_an_error_event_then_close(server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(f"{server.replace('http', 'ws')}/v1/realtime?model=gpt-realtime") as ws:
        ev = SERVER_EVENT.validate_json(ws.recv(timeout=30))
        assert ev.type == "error" and ev.error.code == "model_not_found" and ev.error.param == "model"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=30)
        assert info.value.rcvd.code == 1008


# ------------------------------------------------------------------------------------------ server VAD
def test_server_vad_commits_answers_and_is_interrupted_by_speech(server, question_pcm):
    pytest.importorskip("silero_vad")
    silence = lambda s: b"\0\0" * int(OPENAI_SAMPLE_RATE * s)  # noqa: E731
    utterance = silence(0.6) + question_pcm + silence(1.0)

    async def session(conn):
        await conn.session.update(session={"type": "realtime", "max_output_tokens": 1000, "audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 300, "prefix_padding_ms": 200}}}})
        ev = await recv(conn)
        assert ev.type == "session.updated" and ev.session.audio.input.turn_detection.silence_duration_ms == 300
        await say(conn, utterance)
        events = await until(conn, "response.output_audio.delta")
        order = kinds(events)
        assert order[:6] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                             "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done",
                             "response.created"], order
        started, stopped, committed = events[:3]
        assert started.item_id == stopped.item_id == committed.item_id
        speech_ms = len(question_pcm) // 48
        assert 300 <= started.audio_start_ms <= 900 and stopped.audio_end_ms > started.audio_start_ms + speech_ms // 2
        assert stopped.audio_end_ms <= 600 + speech_ms + 1000
        # the answer is long: speech while it plays stops it (interrupt_response), and is answered in turn
        await say(conn, utterance)
        events = await until(conn, "response.done")
        stopped = events[-1].response
        assert stopped.status == "cancelled" and stopped.status_details.reason == "turn_detected"
        assert "input_audio_buffer.speech_started" in kinds(events)
        events = await until(conn, "response.output_audio.delta")
        assert kinds(events)[:5] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                                     "conversation.item.added", "conversation.item.done", "response.created"]
        await conn.response.cancel()
        events = await until(conn, "response.done")
        assert events[-1].response.status == "cancelled"

    run(server, session)
