"""A spoken turn's features go from the SpeechEncoder to the Backbone without passing through the Ingress:
``Answers.hear`` starts the encoder's call and its response goes, unopened, as a top-level argument of the
Backbone's call (Serve resolves it there); the turn names it by index (``ConversationTurn.heard``). Checked
with stand-in handles (no Ray): what the Backbone is sent, and how it reads what it gets."""

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from deepomni.serve.messages import (AnswerChunk, AnswerEnd, AudioRejected, BackboneInfo, CodecInfo, Conversation,
                                     ConversationTurn, EncodedSpeech, EncoderInfo, GenerateOptions)


class _Call:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def remote(self, *args):
        self.calls.append(args)
        return self.fn(*args)


async def _value(v):
    return v


def _handles():
    responses = []

    def encode(audio, rate):
        responses.append(object())  # a DeploymentResponse stand-in: opaque, never awaited by the Ingress
        return responses[-1]

    async def stream(conv, opts, *heard):
        yield AnswerChunk(text="hi", end=AnswerEnd(text="hi", steps=1, text_tokens=1, frames=0, queue_ms=0.0))

    encoder = SimpleNamespace(encode=_Call(encode), info=_Call(lambda: _value(EncoderInfo(8.0, 16))))
    generate = _Call(stream)
    codec = CodecInfo(codec="builtin", sample_rate=16000, num_channels=4, codebook_size=256, frame_rate=25.0)
    backbone = SimpleNamespace(generate=generate, options=lambda **kw: SimpleNamespace(generate=generate),
                               info=_Call(lambda: _value(BackboneInfo(4, 256, 16, 512, codec))))
    return encoder, backbone, responses


def test_the_ingress_passes_the_encoders_response_on_unopened():
    from deepomni.serve.config import AppConfig
    from serve_apps.answers import Answers

    encoder, backbone, responses = _handles()
    answers = Answers(encoder, backbone, AppConfig())

    async def run():
        heard = [answers.hear(b"RIFF...", None), answers.hear(b"\x00\x01", 16000)]
        conv = Conversation((ConversationTurn("user", heard=0), ConversationTurn("assistant", "ok"),
                             ConversationTurn("user", heard=1)))
        first, events = await answers.start(conv, GenerateOptions(), 0.0, heard)
        return first, [ev async for ev in events]

    first, events = asyncio.run(run())
    assert first["type"] == "start" and events[-1]["type"] == "end"
    (conv, _, *passed), = backbone.generate.calls
    assert passed == responses and len(responses) == 2  # the encoder's responses themselves, as arguments
    assert all(t.audio_ND is None for t in conv.turns)  # no features in what the Ingress sends
    assert encoder.encode.calls == [(b"RIFF...", None), (b"\x00\x01", 16000)]


def test_conversation_reads_its_heard_turns():
    a, b = np.ones((3, 4), np.float32), np.zeros((2, 4), np.float32)
    conv = Conversation((ConversationTurn("user", heard=1), ConversationTurn("assistant", "ok"),
                         ConversationTurn("user", "and", heard=0)))
    got = conv.with_heard([EncodedSpeech(b, 0.5), EncodedSpeech(a, 1.0)])
    assert got.turns[0].audio_ND is a and got.turns[2].audio_ND is b and got.turns[2].text == "and"
    assert all(t.heard is None for t in got.turns) and got.turns[1] == conv.turns[1]
    refused = AudioRejected("audio_too_long", "9 s is over the 8 s window")
    assert conv.with_heard([EncodedSpeech(b, 0.5), refused]) is refused
    with pytest.raises(ValueError, match="heard\\[1\\]"):
        conv.with_heard([EncodedSpeech(b, 0.5)])
