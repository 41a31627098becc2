"""Hypothesis strategies of what a client sends: JSON values, audio files with a few bytes or fields changed,
and the fields of answer options, chat completion bodies and Realtime ``session.update`` (mostly values valid
or at an edge, so that parsing goes deep). The parsers are fuzzed with them in tests/test_fuzz.py, the
server's endpoints in tests/test_serve_fuzz.py."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf
from hypothesis import strategies as st

from deepomni.audio import MAX_SAMPLE_RATE
from serve_apps.openai_api import CHAT_AUDIO_FORMATS, IGNORED_CHAT_FIELDS, MODEL_ID, REFUSED_CHAT_FIELDS
from serve_apps.protocol import SEED_MAX
from serve_apps.realtime_fields import MAX_INSTRUCTIONS_CHARS

CAP = 64  # max_steps_limit of the parsers under test

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


# ------------------------------------------------------------------------------------------ answer options
ANSWER_FIELDS = {"speech": near(True, False, "true", "no", 1, None),
                 "max_steps": near(1, CAP, CAP + 1, 0, -1, 1.0, 1.5, "8", "1e400", "inf", "nan", True, 2**70),
                 "seed": near(0, SEED_MAX, SEED_MAX + 1, -1, 3.0, "7", "1e400", 10**30)}


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
