"""Property-based fuzzing of what a client controls, without a server: audio bytes (``load_audio``), JSON
bodies and frames (``parse_json_object``), answer options, chat completion bodies (``parse_chat``) and the
Realtime ``session.update`` (``SessionConfig.updated``). Each either gives a usable value or refuses with
the documented error (``AudioError``; a ``Rejection`` or ``OpenAIError`` with a 4xx and a message), never
another exception and never a hang. The server-level fuzzing (HTTP bodies, WebSocket sequences, the
OpenAPI schema) lives in ``tests/test_openai_serve.py``, next to the server it reuses.

Bounded for CI: a few dozen to a few hundred examples per property, no example database (``database=None``),
a generous per-example deadline (the machine is shared) and the module's pytest timeout for a true hang."""

from __future__ import annotations

import io
import json
import math
import struct
from datetime import timedelta

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from deepomni.audio import MAX_SAMPLE_RATE, WHISPER_SAMPLE_RATE, AudioError, load_audio
from serve_apps.openai_api import (CHAT_AUDIO_FORMATS, IGNORED_CHAT_FIELDS, MODEL_ID, REFUSED_CHAT_FIELDS, ChatRequest,
                                   OpenAIError, parse_chat)
from serve_apps.protocol import REASONS, SEED_MAX, AnswerOptions, Rejection, audio_reason, parse_json_object
from serve_apps.realtime_fields import MAX_INSTRUCTIONS_CHARS, SessionConfig

pytestmark = pytest.mark.timeout(120)  # a hang fails the test instead of stalling CI

FUZZ = settings(max_examples=150, deadline=timedelta(seconds=5), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CAP = 64  # max_steps_limit of the parsers under test
MAX_SECONDS = 30.0  # the speech encoder's window (Whisper: 30 s), as the server passes it to load_audio

# ------------------------------------------------------------------------------------------ JSON values
json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
                | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def mostly(usual: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` 3 times in 4, else ``other`` (``st.one_of`` draws its branches about equally)."""
    return st.sampled_from([usual, usual, usual, other]).flatmap(lambda s: s)


def near(*good) -> st.SearchStrategy:
    """Mostly the given values, valid or at an edge, so that parsing goes deep; else any JSON value."""
    return mostly(st.sampled_from(good), json_values)


def objects(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Mostly dicts with any subset of ``fields`` (each with its own values); else dicts of those keys and
    unknown ones with any values."""
    return mostly(st.fixed_dictionaries({}, optional=fields),
                  st.dictionaries(st.sampled_from(sorted(fields)) | st.text(max_size=8), json_values, max_size=5))


# ------------------------------------------------------------------------------------------ audio
def _encoded(fmt: str, subtype: str | None, sr: int = 8000, channels: int = 1, seconds: float = 0.05) -> bytes:
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([x] * channels, axis=1), sr, format=fmt, subtype=subtype)
    return buf.getvalue()


SEEDS = [  # small valid files the mutations start from
    _encoded("WAV", "PCM_16"),
    _encoded("WAV", "PCM_U8", sr=11025),
    _encoded("WAV", "FLOAT", channels=2),
    _encoded("WAV", "PCM_24", sr=16000, channels=3),
    _encoded("FLAC", "PCM_16"),
    _encoded("FLAC", "PCM_24", sr=44100, channels=2, seconds=0.02),
    _encoded("OGG", "VORBIS", sr=16000, seconds=0.1),
    _encoded("MP3", "MPEG_LAYER_III", sr=16000, seconds=0.1),
    _encoded("AIFF", "PCM_16"),
]
INTERESTING_U32 = [0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFF_F000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_0000,
                   0xFFFF_FFFF, 800, 16000, 44100, MAX_SAMPLE_RATE, MAX_SAMPLE_RATE + 1, 999]


@st.composite
def mutated_audio(draw) -> bytes:
    """A valid file with a few of: bytes flipped, a 16/32-bit field set to an edge value, cut, bytes inserted
    or deleted. Positions favour the header (the first 96 bytes), where the sizes and the format are."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        if len(data) < 8:
            break
        pos = draw(st.integers(0, min(len(data), 96) - 1) | st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "u32", "u16", "cut", "insert", "delete"]))
        if op == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "u32" and pos + 4 <= len(data):
            data[pos:pos + 4] = struct.pack(draw(st.sampled_from("<>")) + "I",
                                            draw(st.sampled_from(INTERESTING_U32) | st.integers(0, 2**32 - 1)))
        elif op == "u16" and pos + 2 <= len(data):
            data[pos:pos + 2] = struct.pack(draw(st.sampled_from("<>")) + "H", draw(st.integers(0, 2**16 - 1)))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
    return bytes(data)


def _check_load(data: bytes, max_seconds: float | None) -> None:
    try:
        wav = load_audio(data, max_seconds=max_seconds)
    except AudioError as e:  # the one documented refusal of bytes; the server maps it to a 4xx reason
        assert str(e) and audio_reason(str(e)) in REASONS and REASONS[audio_reason(str(e))] == 422
        event(f"refused: {audio_reason(str(e))}")
        return
    event("decoded")
    assert isinstance(wav, np.ndarray) and wav.dtype == np.float32 and wav.ndim == 1 and wav.size > 0
    assert np.isfinite(wav).all(), "load_audio returned NaN or Inf samples"
    if max_seconds is not None:
        assert len(wav) <= math.floor(max_seconds * WHISPER_SAMPLE_RATE)


@settings(FUZZ, max_examples=300)
@given(st.binary(max_size=2048))
@example(b"RIFF")
@example(b"RIFF\x00\x00\x00\x00WAVE")
@example(b"fLaC" + b"\x00" * 40)
@example(b"OggS" + b"\x00" * 60)
@example(b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 8)
def test_load_audio_arbitrary_bytes(data):
    _check_load(data, MAX_SECONDS)


def _flac_claiming(frames: int) -> bytes:
    """The FLAC seed with STREAMINFO's 36-bit total-samples field set to ``frames``."""
    data = bytearray(SEEDS[4])
    head = int.from_bytes(data[18:26], "big")
    data[18:26] = ((head & ~(2**36 - 1)) | frames).to_bytes(8, "big")
    return bytes(data)


@settings(FUZZ, max_examples=600)
@given(mutated_audio(), st.sampled_from([MAX_SECONDS, 8.0, None]))
@example(_flac_claiming(2**36 - 1), None)  # found by this test: soundfile allocated 256 GiB up front
@example(_flac_claiming(2**32), MAX_SECONDS)
def test_load_audio_mutated_files(data, max_seconds):
    _check_load(data, max_seconds)


# ------------------------------------------------------------------------------------------ JSON bodies
@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200) | json_values.map(json.dumps)
       | st.integers(1, 3000).map(lambda n: "[" * n + "]" * n) | st.integers(1, 6000).map(lambda n: "1" * n))
@example("[" * 100_000 + "]" * 100_000)
@example('{"a": ' + "9" * 5000 + "}")
@example(b"\xff\xfe{\x00}\x00")
def test_parse_json_object(body):
    try:
        out = parse_json_object(body, "the body")
    except Rejection as e:
        assert (e.status, e.reason) == (400, "malformed_json") and e.message
        return
    assert isinstance(out, dict)


ANSWER_FIELDS = {"speech": near(True, False, "true", "no", 1, None),
                 "max_steps": near(1, CAP, CAP + 1, 0, -1, 1.0, 1.5, "8", "1e400", "inf", "nan", True, 2**70),
                 "seed": near(0, SEED_MAX, SEED_MAX + 1, -1, 3.0, "7", "1e400", 10**30)}


@FUZZ
@given(objects(ANSWER_FIELDS)
       | st.dictionaries(st.sampled_from(sorted(ANSWER_FIELDS)), st.text(max_size=30), max_size=3))  # query params
def test_answer_options_parse(raw):
    try:
        opts = AnswerOptions.parse(raw, CAP)
    except Rejection as e:
        assert (e.status, e.reason) == (400, "bad_request") and e.message and len(e.message) < 300
        return
    assert isinstance(opts.speech, bool)
    assert opts.max_steps is None or (type(opts.max_steps) is int and 1 <= opts.max_steps <= CAP)
    assert opts.seed is None or (type(opts.seed) is int and 0 <= opts.seed <= SEED_MAX)


# ------------------------------------------------------------------------------------------ chat completions
_b64_audio = st.sampled_from(["", "@@@", "aGVsbG8=", "UklGRg==", "=", "a"]) | json_values
content_parts = objects({
    "type": near("text", "input_audio", "refusal", "image_url"),
    "text": near("hello", ""),
    "refusal": near("no"),
    "input_audio": objects({"data": _b64_audio, "format": near("wav", "mp3")}),
})
messages = objects({
    "role": near("user", "assistant", "system", "developer", "tool"),
    "content": near("hi", "", None) | st.lists(content_parts, max_size=3),
    "audio": objects({"id": near("audio-known", "audio-gone")}),
})
CHAT_FIELDS = {
    "model": near(MODEL_ID, "gpt-4o", ""),
    "messages": st.lists(messages, max_size=4) | json_values,
    "modalities": near(["text"], ["text", "audio"], ["audio"], [], [[]], [{}], [None, "text"]),
    "audio": objects({"voice": near("alloy"), "format": near(*CHAT_AUDIO_FORMATS, "aac")}),
    "stream": near(True, False), "stream_options": objects({"include_usage": near(True)}),
    "max_tokens": near(1, CAP, CAP + 1, 0, 2.0), "max_completion_tokens": near(1, 10**6),
    "seed": near(0, -(2**63), 2**63 - 1, 2**63, 2**70), "temperature": near(0, 2, 2.5, -0.1, True),
    "n": near(1, 2, None, True, 1.0), "logprobs": near(False, True),
    **{name: json_values for name in REFUSED_CHAT_FIELDS + IGNORED_CHAT_FIELDS[:3]},
}


def _transcript_of(aid: str) -> str | None:
    assert isinstance(aid, str)
    return "an earlier answer" if aid == "audio-known" else None


@settings(FUZZ, max_examples=300)
@given(objects(CHAT_FIELDS) | json_values.filter(lambda v: isinstance(v, dict)))
@example({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "modalities": [[]]})
@example({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "modalities": [{}, "text"]})
def test_parse_chat(data):
    try:
        req = parse_chat(data, CAP, 4000, _transcript_of)
    except OpenAIError as e:
        assert 400 <= e.status < 500 and e.message and e.code
        json.dumps(e.body())
        return
    assert isinstance(req, ChatRequest) and req.messages and req.messages[-1].role == "user"
    assert all(m.role in ("user", "assistant") for m in req.messages)
    assert all(m.text is None or isinstance(m.text, str) for m in req.messages)
    assert all(m.audio is None or isinstance(m.audio, bytes) for m in req.messages)
    assert req.audio_format in CHAT_AUDIO_FORMATS
    assert req.max_steps is None or 1 <= req.max_steps <= CAP
    assert req.seed is None or 0 <= req.seed <= SEED_MAX
    assert req.temperature is None or 0 <= req.temperature <= 2


# ------------------------------------------------------------------------------------------ realtime session
_pcm_format = objects({"type": near("audio/pcm", "audio/pcmu"), "rate": near(24000, 24000.0, 16000, "24000")})
SESSION_FIELDS = {
    "type": near("realtime", "transcription"), "model": near(MODEL_ID, None, "gpt-realtime"),
    "instructions": near("be brief", None, "x" * (MAX_INSTRUCTIONS_CHARS + 1)),
    "output_modalities": near(["audio"], ["text"], ["audio", "text"], [[]]),
    "max_output_tokens": near("inf", 1, CAP, CAP + 1, 0, 3.0, True),
    "tools": near([], [{"type": "function"}]), "tool_choice": json_values, "tracing": json_values,
    "audio": objects({
        "input": objects({"format": _pcm_format, "transcription": json_values, "noise_reduction": json_values,
                          "turn_detection": near(None) | objects({
                              "type": near("server_vad", "semantic_vad"), "threshold": near(0.0, 0.5, 1.0, 1.5),
                              "prefix_padding_ms": near(0, 300, 10_001, 1.5), "silence_duration_ms": near(500, -1),
                              "idle_timeout_ms": near(None, 1000), "create_response": near(True, False, 1),
                              "interrupt_response": near(False, "yes")})}),
        "output": objects({"format": _pcm_format, "voice": json_values, "speed": near(0.25, 1.5, 2, 0)}),
    }),
}


@settings(FUZZ, max_examples=300)
@given(objects(SESSION_FIELDS) | json_values.filter(lambda v: isinstance(v, dict)))
def test_realtime_session_update(s):
    cfg = SessionConfig()
    before = json.dumps(cfg.body())
    try:
        new = cfg.updated(s, CAP)
    except OpenAIError as e:
        assert 400 <= e.status < 500 and e.message and e.code
        json.dumps(e.body())
    else:
        assert isinstance(new, SessionConfig)
        json.dumps(new.body())  # what session.updated sends
        assert new.max_output_tokens is None or 1 <= new.max_output_tokens <= CAP
        assert new.instructions is None or len(new.instructions) <= MAX_INSTRUCTIONS_CHARS
        assert 0.25 <= new.speed <= 1.5
    assert json.dumps(cfg.body()) == before  # updated() copies: the session in force is untouched
