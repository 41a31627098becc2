"""The OpenAI-compatible request parsing and response shapes (serve_apps.openai_api), without Ray; the
end-to-end tests with the official ``openai`` client are in tests/test_openai_serve.py."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile as sf

from serve_apps.openai_api import (MODEL_ID, OPENAI_SAMPLE_RATE, ChatShape, OpenAIError, PcmResampler, Usage,
                                   encode_output_audio, parse_chat)


def _chat(**kw):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], **kw}
    return parse_chat(body, max_steps_limit=1024, max_chars=4000, transcript_of={"audio_1": "said before"}.get)


def _err(**kw) -> OpenAIError:
    with pytest.raises(OpenAIError) as e:
        _chat(**kw)
    return e.value


def test_a_conversation_with_system_audio_and_earlier_answers():
    wav = base64.b64encode(b"RIFF....").decode()
    req = _chat(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is said here?"},
                                     {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]},
        {"role": "assistant", "audio": {"id": "audio_1"}},
        {"role": "user", "content": "and then?"},
        {"role": "user", "content": "tell me"},
    ], modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"}, stream=True,
        stream_options={"include_usage": True}, max_tokens=50, seed=-1, temperature=0.7)
    assert req.system == "Be brief.\nAnswer in English."
    assert [(m.role, m.text, m.audio) for m in req.messages] == [
        ("user", "What is said here?", b"RIFF...."), ("assistant", "said before", None),
        ("user", "and then?\ntell me", None)]  # consecutive user messages are one turn
    assert (req.speech, req.audio_format, req.stream, req.include_usage) == (True, "pcm16", True, True)
    assert (req.max_steps, req.temperature) == (50, 0.7)
    assert 0 <= req.seed < 2 ** 63


@pytest.mark.parametrize("kw, param, code, status", [
    ({"model": "gpt-4o"}, "model", "model_not_found", 404),
    ({"messages": []}, "messages", "bad_request", 400),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "unsupported_content", 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", "unsupported_content", 400),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "!!", "format": "wav"}}]}]},
     "messages[0].content[0].input_audio.data", "bad_base64", 400),
    ({"messages": [{"role": "assistant", "audio": {"id": "nope"}}, {"role": "user", "content": "x"}]},
     "messages[0].audio.id", "bad_request", 400),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages", "bad_request", 400),
    ({"modalities": ["audio"]}, "modalities", "bad_request", 400),
    ({"modalities": ["text", "audio"]}, "audio", "bad_request", 400),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "aac"}}, "audio.format",
     "unsupported_parameter", 400),
    ({"seed": 2 ** 64}, "seed", "bad_request", 400),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "bad_request", 400),
    ({"max_tokens": 10 ** 30}, "max_tokens", "bad_request", 400),
    ({"temperature": "hot"}, "temperature", "bad_request", 400),
    ({"n": 2}, "n", "unsupported_parameter", 400),
    ({"tools": [{"type": "function"}]}, "tools", "unsupported_parameter", 400),
])
def test_bad_requests_name_the_parameter(kw, param, code, status):
    e = _err(**kw)
    assert (e.param, e.code, e.status) == (param, code, status)
    body = e.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert body["type"] == "invalid_request_error"


def test_ignored_fields_are_accepted():
    req = _chat(top_p=0.5, presence_penalty=1.0, user="me", stop=["\n"], store=False)
    assert req.messages[0].text == "hi"


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "pcm16"])
def test_output_audio_is_24khz_in_the_asked_format(fmt):
    t = np.arange(16000) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    data = encode_output_audio(wav, 16000, fmt)
    if fmt == "pcm16":
        assert len(data) == 2 * OPENAI_SAMPLE_RATE
        return
    back, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == OPENAI_SAMPLE_RATE
    assert abs(len(back) - OPENAI_SAMPLE_RATE) < 0.1 * OPENAI_SAMPLE_RATE
    assert 0.15 < np.sqrt(np.mean(back ** 2)) < 0.3  # the tone survives (rms 0.21)


def test_streamed_resampling_matches_the_length():
    rs = PcmResampler(16000)
    wav = np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32)
    out = b"".join(rs.push(c) for c in np.array_split(wav, 7)) + rs.push(np.zeros(0, np.float32), last=True)
    assert abs(len(out) // 2 - OPENAI_SAMPLE_RATE) <= 2


def test_response_shapes_parse_with_the_official_types():
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    shape, usage = ChatShape(), Usage(prompt_tokens=20, cached_tokens=12, audio_prompt_tokens=5, text_tokens=3,
                                      audio_tokens=8)
    c = ChatCompletion.model_validate(shape.completion("hello", "stop", usage, None))
    assert c.choices[0].message.content == "hello" and c.usage.prompt_tokens_details.cached_tokens == 12
    assert c.usage.completion_tokens == 11 and c.usage.total_tokens == 31
    audio = {"id": "audio_x", "data": "AAAA", "transcript": "hello", "expires_at": 1}
    c = ChatCompletion.model_validate(shape.completion("hello", "stop", usage, audio))
    assert c.choices[0].message.audio.transcript == "hello" and c.choices[0].message.content is None
    ch = ChatCompletionChunk.model_validate(shape.chunk({"audio": {"id": "a", "data": "AAAA", "transcript": "he"}}))
    assert ch.choices[0].delta.audio["transcript"] == "he" if isinstance(ch.choices[0].delta.audio, dict) \
        else ch.choices[0].delta.audio.transcript == "he"
    last = ChatCompletionChunk.model_validate(shape.chunk({}, "length", usage))
    assert last.choices[0].finish_reason == "length" and last.usage.prompt_tokens == 20
