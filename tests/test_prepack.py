"""Prepacked oneDNN weights (deepomni.model.prepack): the same products as F.linear up to rounding, made
again when a weight changes in place, never used while gradients are recorded; a whole model forward
(attention, shared and routed experts, head) agrees with the plain one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepomni.config import load_preset
from deepomni.model import prepack
from deepomni.model.model import DeepOmniModel
from deepomni.model.prepack import Prepacked, linear, prepacked

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this torch build has no oneDNN")


def test_packed_linear_matches_and_follows_in_place_changes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    x = torch.randn(3, 5, 64, generator=g)
    cache = Prepacked()
    with torch.no_grad(), prepacked(cache):
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x[0, :1], w[10:20]), F.linear(x[0, :1], w[10:20]), rtol=1e-5, atol=1e-5)
        assert len(cache) == 2  # the whole weight and the row slice, each packed once
        linear(x, w)
        assert len(cache) == 2
        w.mul_(-3.0)  # in place: the packed copy is stale and must be made again
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_plain_linear_outside_the_context_and_under_autograd():
    w = torch.randn(32, 16, requires_grad=True)
    x = torch.randn(4, 16)
    assert torch.equal(linear(x, w), F.linear(x, w))  # no cache active
    cache = Prepacked()
    with prepacked(cache):
        y = linear(x, w)  # gradients recorded: plain F.linear, differentiable
        assert torch.equal(y, F.linear(x, w)) and y.requires_grad
        with torch.no_grad():
            x64, w64 = x.double(), w.detach().double()
            assert torch.equal(linear(x64, w64), F.linear(x64, w64))
    assert len(cache) == 0  # neither the autograd nor the float64 product packed anything


def test_model_forward_prepacked_matches_plain():
    cfg = load_preset("tiny")
    model = DeepOmniModel(cfg, with_speech_input=False).init_weights(seed=0).eval()
    tokens = torch.randint(0, cfg.text_vocab_size, (2, 9, model.layout.num_channels))
    cache = Prepacked()
    with torch.no_grad():
        plain = model(tokens).logits
        with prepacked(cache):
            packed = model(tokens).logits
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(cache) > n_linear  # every projection, the experts that got rows, the head's channel slices
    for a, b in zip(plain, packed):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_engine_with_prepacked_weights_decodes_as_without():
    from deepomni.model.generate import GenerationConfig
    from deepomni.model.prompt import user_turn
    from deepomni.serve.engine import BatchEngine, Request

    model = DeepOmniModel(load_preset("tiny"), with_speech_input=False).init_weights(seed=0).eval()
    prompts = [user_turn(model.layout, list(range(10 + i, 30 + 3 * i))) for i in range(3)]

    def decode(prepack):
        engine = BatchEngine(model, max_rows=4, max_len=96, prepack=prepack)
        sids = [engine.submit(Request(p, None, GenerationConfig(max_steps=12, speech=False))) for p in prompts]
        text = {sid: [] for sid in sids}
        while not engine.idle:
            for sid, ev in engine.step():
                if ev.kind == "text":
                    text[sid].append(ev.text_id)
        return [text[sid] for sid in sids], engine.prepacked

    plain, none = decode(False)
    packed, cache = decode(True)
    assert none is None and len(cache) > 0  # the decoding steps ran on packed weights
    assert packed == plain and all(plain)
