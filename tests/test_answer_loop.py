"""The Ray-free answer loop (deepomni.serve.answer_loop): text and speech answers decode exactly what the
engine decodes alone for the prompt the app builds; audio goes to the vocoder as the loop promises (first
frame at once, then chunks of MIN_CHUNK_FRAMES, one stream state threaded through the calls, one flush);
a caller that goes away cancels its session; overload is refused at once; vocoder failures end the
answers cleanly. And the two hosts of the loop, the Serve app's Backbone deployment (built without Serve)
and ``benchmarks/serve_latency.py``'s in-process pipeline, answer the same questions token for token."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from benchmarks.harness import readable_text_head
from deepomni.codec.builtin import BuiltinCodec, BuiltinConfig
from deepomni.config import load_preset
from deepomni.data.sequences import INSTRUCTIONS
from deepomni.model.generate import GenerationConfig
from deepomni.model.model import DeepOmniModel
from deepomni.model.prompt import Turn, conversation
from deepomni.serve.answer_loop import MIN_CHUNK_FRAMES, AnswerLoop, LoopMetrics, VocoderUnavailable
from deepomni.serve.engine import BatchEngine, Request
from deepomni.serve.messages import (RETRY_AFTER_MAX_S, RETRY_AFTER_MIN_S, AnswerError, Conversation,
                                     GenerateOptions, VocodedAudio, VocodeItem)
from deepomni.serve.vocoder import CodecVocoder
from deepomni.text import ByteTokenizer

SAMPLES = 8  # the fake vocoder's samples per frame (and at a flush)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return readable_text_head(DeepOmniModel(load_preset("tiny")).init_weights(seed=0)).eval()  # a whole checkpoint's model


@pytest.fixture(scope="module")
def codec(model):
    """A built-in codec of the model's K x codebook with seeded random codebooks (valid codes, noise audio)."""
    K, C = model.cfg.num_codec_channels, model.cfg.codebook_size
    cfg = BuiltinConfig(num_channels=K, codebook_size=C)
    books = torch.randn(K, C, cfg.frame_dim, generator=torch.Generator().manual_seed(0)) * 4.0
    books[0] -= 50.0
    return BuiltinCodec(cfg, books)


def _speech(model, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, model.cfg.hidden_size)).astype(np.float32)


class FakeVocoder:
    """Records every call; each item gets ``SAMPLES`` samples a frame (and as many at its flush), and as its
    state the frames it has seen; ``fail``: raise that instead."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[list[VocodeItem]] = []
        self.fail = fail

    async def decode(self, items: list[VocodeItem]) -> list[VocodedAudio]:
        self.calls.append(items)
        if self.fail is not None:
            raise self.fail
        out = []
        for it in items:
            F = 0 if it.codes_KF is None else it.codes_KF.shape[1]
            pcm = np.full(F * SAMPLES + (SAMPLES if it.final else 0), 0.5, dtype=np.float32)
            out.append(VocodedAudio(pcm, None if it.final else (it.state or 0) + F))
        return out


class Recorded(LoopMetrics):
    def __init__(self):
        self.cancels: list[str] = []
        self.tokens: dict[str, int] = {}

    def cancelled(self, reason: str) -> None:
        self.cancels.append(reason)

    def generated_tokens(self, channel: str, n: int) -> None:
        self.tokens[channel] = self.tokens.get(channel, 0) + n


def _loop(model, vocoder=None, max_rows: int = 8, max_queued: int | None = None, **kw) -> AnswerLoop:
    return AnswerLoop(model, BatchEngine(model, max_rows=max_rows, max_queued=max_queued), ByteTokenizer(),
                      vocoder=vocoder, **kw)


def _alone(model, prompt_LC: torch.Tensor, audio_ND: torch.Tensor | None, gen: GenerationConfig):
    """What the engine decodes for one request on its own: text ids and codec frames [K] as lists."""
    engine = BatchEngine(model, max_rows=4)
    engine.submit(Request(prompt_LC, audio_ND, gen))
    text, frames = [], []
    while not engine.idle:
        for _, ev in engine.step():
            if ev.kind == "text":
                text.append(ev.text_id)
            elif ev.kind == "frame":
                frames.append(ev.frame_K.tolist())
    return text, frames


async def _collect(agen) -> list:
    return [chunk async for chunk in agen]


# ------------------------------------------------------------------------------------------ the loop
def test_text_answer_is_what_the_engine_decodes_for_the_apps_prompt(model):
    metrics = Recorded()
    loop = _loop(model, metrics=metrics)  # no vocoder: text only, even when speech is asked
    chunks = asyncio.run(_collect(loop.generate(Conversation.single(text="What is the capital?"),
                                                GenerateOptions(speech=True, max_steps=12))))
    end = chunks[-1].end
    assert end is not None and chunks[-1].error is None and all(c.end is None for c in chunks[:-1])
    assert all(c.pcm is None and not c.keepalive for c in chunks)
    tok = ByteTokenizer()
    prompt = conversation(model.layout, [Turn("user", tuple(tok.encode("What is the capital?")))],
                          tok.encode(INSTRUCTIONS["text_qa"]))
    text, _ = _alone(model, prompt, None, GenerationConfig(max_steps=12, speech=False))
    assert list(end.text_ids) == text and len(text) == 12 == end.steps == end.text_tokens
    assert "".join(c.text for c in chunks) == end.text == tok.decode(text) and end.text.isprintable()
    assert (end.prompt_tokens, end.cached_tokens, end.frames, end.finish_reason) == (prompt.shape[0], 0, 0, "length")
    assert loop.stats()["sessions"] == 0 and loop.engine.idle
    assert metrics.tokens["text"] == 12 and not metrics.cancels


def test_speech_answer_goes_to_the_vocoder_in_chunks_with_one_stream_state(model):
    voc = FakeVocoder()
    loop = _loop(model, voc)
    audio = _speech(model, 10, seed=1)
    chunks = asyncio.run(_collect(loop.generate(Conversation.single(audio_ND=audio),
                                                GenerateOptions(max_steps=24, seed=3))))
    end = chunks[-1].end
    assert end is not None and end.audio_prompt_tokens == 10 and end.codec_channels == model.layout.num_codec_channels
    # what the engine decodes alone for the spoken question's prompt, with the same seed
    prompt = conversation(model.layout, [Turn("user", None, 10)], ByteTokenizer().encode(INSTRUCTIONS["spoken_qa"]))
    text, frames = _alone(model, prompt, torch.from_numpy(audio), GenerationConfig(max_steps=24, speech=True, seed=3))
    assert list(end.text_ids) == text and end.prompt_tokens == prompt.shape[0] and len(frames) > MIN_CHUNK_FRAMES
    items = [it for call in voc.calls for it in call]  # one session: every item is its
    sent = np.concatenate([it.codes_KF for it in items if it.codes_KF is not None], axis=1)
    assert sent.T.tolist() == frames and end.frames == len(frames)
    # the first frame goes at once; later ones in chunks of MIN_CHUNK_FRAMES, except the final item
    assert items[0].state is None and items[0].codes_KF.shape[1] >= 1
    assert all(it.codes_KF.shape[1] >= MIN_CHUNK_FRAMES for it in items[1:-1])
    assert [it.final for it in items] == [False] * (len(items) - 1) + [True]
    seen = np.cumsum([0 if it.codes_KF is None else it.codes_KF.shape[1] for it in items])
    assert [it.state for it in items[1:]] == seen[:-1].tolist()  # each call continues the last one's state
    pcm = [c.pcm for c in chunks if c.pcm is not None]
    assert sum(len(p) for p in pcm) == (len(frames) + 1) * SAMPLES
    # a speech answer's text travels with its audio: no text before the first audio
    first_text = next(i for i, c in enumerate(chunks) if c.text)
    first_audio = next(i for i, c in enumerate(chunks) if c.pcm is not None)
    assert first_audio <= first_text and "".join(c.text for c in chunks) == end.text


def test_a_caller_that_goes_away_cancels_its_session(model):
    metrics = Recorded()
    loop = _loop(model, metrics=metrics)

    async def run() -> int:
        agen = loop.generate(Conversation.single(text="Tell me a long story."), GenerateOptions(max_steps=2000))
        first = await agen.__anext__()
        assert first.text and first.end is None
        await agen.aclose()
        for _ in range(200):  # the loop frees its rows between two steps
            if loop.stats()["sessions"] == 0 and loop.engine.idle:
                break
            await asyncio.sleep(0.01)
        return loop.engine.stats()["active_sessions"]

    assert asyncio.run(run()) == 0 and loop.stats()["sessions"] == 0 and loop.engine.idle
    assert metrics.cancels == ["client_gone"]


def test_overload_is_refused_at_once_with_a_retry_after(model):
    loop = _loop(model, max_rows=2, max_queued=0)  # two text answers fill the rows; none may wait

    async def run():
        long = [loop.generate(Conversation.single(text=f"question {i}"), GenerateOptions(max_steps=2000))
                for i in range(2)]
        firsts = [await agen.__anext__() for agen in long]  # both decoding
        refused = await _collect(loop.generate(Conversation.single(text="one more"), GenerateOptions(max_steps=4)))
        stats = loop.stats()
        for agen in long:
            await agen.aclose()
        return firsts, refused, stats

    firsts, refused, stats = asyncio.run(run())
    assert all(f.error is None for f in firsts)
    assert len(refused) == 1 and refused[0].end is None
    err = refused[0].error
    assert err.reason == "overloaded" and "max_queued=0" in err.message
    assert RETRY_AFTER_MIN_S <= err.retry_after_s <= RETRY_AFTER_MAX_S
    assert stats["overloaded"] == 1 and stats["max_queued"] == 0 and stats["active_sessions"] == 2


@pytest.mark.parametrize("fail, reason", [
    (VocoderUnavailable(AnswerError("unavailable", "the Vocoder went away", 3)), "unavailable"),
    (RuntimeError("codec exploded"), "internal_error"),
])
def test_a_failed_vocoder_call_ends_its_answers_with_an_error(model, fail, reason):
    loop = _loop(model, FakeVocoder(fail=fail))
    chunks = asyncio.run(_collect(loop.generate(Conversation.single(audio_ND=_speech(model, 6, seed=2)),
                                                GenerateOptions(max_steps=24, seed=0))))
    err = chunks[-1].error
    assert err is not None and err.reason == reason and chunks[-1].end is None
    assert err == fail.error if reason == "unavailable" else "codec exploded" in err.message
    assert loop.stats()["sessions"] == 0 and loop.stats()["vocoder_calls"] == 0


def test_an_answers_end_says_where_its_tokens_were_routed(model):
    """``AnswerEnd.expert_share``: per MoE layer the pairs of the tokens the answer ran (both items read the
    prompt, each decodes a row a step but the last), and against the checkpoint's modality assignment the
    shares on speech and on text experts, which sum to 1; without one, the shares are None."""
    from deepomni.model.modality import ExpertAssignment, moe_layers

    E, k = model.cfg.n_routed_experts, model.cfg.num_experts_per_tok
    layers = sorted(moe_layers(model))
    experts = ExpertAssignment(E, {l: list(range(i, E, 3)) for i, l in enumerate(layers)})
    audio = _speech(model, 6, seed=2)
    for assignment in (experts, None):
        loop = _loop(model, FakeVocoder(), experts=assignment)
        spoken = asyncio.run(_collect(loop.generate(Conversation.single(audio_ND=audio),
                                                    GenerateOptions(max_steps=16, seed=1)))).pop().end
        typed = asyncio.run(_collect(loop.generate(Conversation.single(text="What is it?"),
                                                   GenerateOptions(speech=False, max_steps=12)))).pop().end
        # the readable model's text never ends: both items decode every step
        assert spoken.expert_share["tokens"] == {"speech": 2 * 6 + spoken.steps - 1,
                                                 "text": 2 * (spoken.prompt_tokens - 6) + spoken.steps - 1}
        assert typed.expert_share["tokens"] == {"speech": 0, "text": typed.prompt_tokens + typed.steps - 1}
        for end in (spoken, typed):
            share = end.expert_share
            assert share["layers"] == layers and share["num_experts"] == E
            assert share["routed"] == [k * sum(share["tokens"].values())] * len(layers)
            assert all(0 < n <= E for n in share["experts_used"])
            if assignment is None:
                assert share["speech"] is None and share["text"] is None
            else:
                assert all(0 <= s <= 1 and s + t == pytest.approx(1.0) for s, t in zip(share["speech"], share["text"]))


def test_a_prompt_that_cannot_fit_is_refused(model):
    loop = _loop(model, max_context=16)
    chunks = asyncio.run(_collect(loop.generate(Conversation.single(text="far too long for sixteen positions"))))
    assert len(chunks) == 1 and chunks[0].error.reason == "prompt_too_long" and "holds 16" in chunks[0].error.message


def test_the_loop_needs_neither_ray_nor_an_audio_library_nor_the_serve_app():
    """The GPU image has no Ray and no soundfile/soxr, and deepomni does not depend on serve_apps."""
    code = ("import sys, deepomni.serve.answer_loop, deepomni.serve.vocoder, deepomni.serve.messages; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'serve_apps', 'soundfile', 'soxr') "
            "or m == 'deepomni.audio'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------------------------ the two hosts agree
class _Recording:
    """A vocoder that records the codec frames it is sent (one answer at a time: all of them are its)."""

    def __init__(self, inner):
        self.inner, self.frames_FK = inner, []

    async def decode(self, items):
        self.frames_FK += [f for it in items if it.codes_KF is not None for f in it.codes_KF.T.tolist()]
        return await self.inner.decode(items)

    def take(self) -> list:
        out, self.frames_FK = self.frames_FK, []
        return out


def test_the_benchmark_and_the_backbone_answer_token_for_token(model, codec, tmp_path):
    """The Backbone deployment's class (built without Serve, its Vocoder handle calling the same codec
    in-process) and serve_latency's in-process pipeline, on the same weights: the same spoken questions,
    asked the way each host asks them, get the same text tokens and codec frames (and as much audio)."""
    pytest.importorskip("ray")
    from benchmarks.serve_latency import InProcess
    from deepomni.checkpoint import save_model
    from deepomni.serve.config import AppConfig
    from serve_apps.backbone import Backbone

    steps = 20
    ckpt = str(save_model(model, tmp_path / "model"))
    backbone_voc = _Recording(CodecVocoder(codec, "builtin:test"))
    handle = types.SimpleNamespace(  # the Vocoder deployment's handle, as the Backbone calls it
        decode=types.SimpleNamespace(remote=backbone_voc.decode),
        info=types.SimpleNamespace(remote=lambda: asyncio.sleep(0, backbone_voc.inner.info())))
    threads = torch.get_num_threads()
    try:  # the replica sets its torch threads (1): not for the rest of this test session
        backbone = Backbone.func_or_class(AppConfig(checkpoint=ckpt, device="cpu", max_steps=steps), handle)
    finally:
        torch.set_num_threads(threads)
    questions = {f"q{i}".encode(): _speech(model, n, seed=10 + i) for i, n in enumerate((7, 12, 9))}
    bench = InProcess(backbone.model, codec, steps, max_rows=32,
                      encode_many=lambda wavs: [torch.from_numpy(questions[w]) for w in wavs])
    bench.loop.vocoder = bench_voc = _Recording(bench.loop.vocoder)

    async def via_backbone(audio_ND) -> tuple:  # as the ingress asks: the question's speech, the request's seed
        chunks = await _collect(backbone.generate(Conversation.single(audio_ND=audio_ND),
                                                  GenerateOptions(max_steps=steps, seed=0)))
        end = chunks[-1].end
        return end.text_ids, backbone_voc.take(), sum(len(c.pcm) for c in chunks if c.pcm is not None), end.frames

    async def via_benchmark(wav: bytes) -> tuple:
        ans = await bench.answer(wav)
        return ans.end.text_ids, bench_voc.take(), round(ans.audio_s * codec.sample_rate), ans.end.frames

    async def run():
        info = await backbone.info()
        return info, [await via_backbone(a) for a in questions.values()], [await via_benchmark(w) for w in questions]

    info, served, benched = asyncio.run(run())
    assert info.codec.codec == "builtin:test" and info.codec.num_channels == model.cfg.num_codec_channels
    for (text_s, frames_s, samples_s, n_s), (text_b, frames_b, samples_b, n_b) in zip(served, benched):
        assert len(text_s) == steps and len(frames_s) == n_s > 0
        assert text_s == text_b and frames_s == frames_b and samples_s == samples_b > 0 and n_s == n_b
    # different questions, different answers (the random model's greedy text is alike; its speech is not)
    assert len({(s[0], str(s[1])) for s in served}) == len(questions)
    assert backbone.stats()["sessions"] == 0 and bench.loop.stats()["sessions"] == 0
