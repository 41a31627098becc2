"""Property-based fuzzing of what a client controls, without a server: audio bytes (``load_audio``), JSON
bodies and frames (``parse_json_object``), answer options, chat completion bodies (``parse_chat``) and the
Realtime ``session.update`` (``SessionConfig.updated``). Each either gives a usable value or refuses with
the documented error (``AudioError``; a ``Rejection`` or ``OpenAIError`` with a 4xx and a message), never
another exception and never a hang. The server-level fuzzing (HTTP bodies, WebSocket sequences, the
OpenAPI schema) lives in ``tests/test_serve_fuzz.py``; the strategies both use, in ``tests/helpers/fuzz.py``.

Bounded for CI: a few dozen to a few hundred examples per property, no example database (``database=None``),
a generous per-example deadline (the machine is shared) and the module's pytest timeout for a true hang."""

from __future__ import annotations

import json
import math
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from deepomni.audio import WHISPER_SAMPLE_RATE, AudioError, load_audio
from serve_apps.openai_api import CHAT_AUDIO_FORMATS, MODEL_ID, ChatRequest, OpenAIError, parse_chat
from serve_apps.protocol import REASONS, SEED_MAX, AnswerOptions, Rejection, audio_reason, parse_json_object
from serve_apps.realtime_fields import MAX_INSTRUCTIONS_CHARS, SessionConfig
from tests.helpers.fuzz import (ANSWER_FIELDS, CAP, CHAT_FIELDS, SEEDS, SESSION_FIELDS, json_values, mutated_audio,
                                objects)

pytestmark = pytest.mark.timeout(120)  # a hang fails the test instead of stalling CI

FUZZ = settings(max_examples=150, deadline=timedelta(seconds=5), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_SECONDS = 30.0  # the speech encoder's window (Whisper: 30 s), as the server passes it to load_audio


# ------------------------------------------------------------------------------------------ audio
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
