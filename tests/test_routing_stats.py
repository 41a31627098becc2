"""Routing statistics (deepomni.model.routing_stats): the MoE layers' no-grad counters equal a direct count of
the router's top-k choices, count nothing unless asked, and no module keeps a tensor with an autograd graph."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from deepomni.model.model import DeepOmniModel
from deepomni.model.moe import MoE
from deepomni.model.routing_stats import ExpertCounter


@pytest.fixture()
def model(tiny_cfg):
    torch.manual_seed(0)
    return DeepOmniModel(tiny_cfg, with_speech_input=False).init_weights(0).train()


def _tokens(model, B=2, L=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 80, (B, L, model.layout.num_channels), generator=gen)


def _capture_choices(model) -> list[list[torch.Tensor]]:
    """Per MoE layer (model order), the router's ``experts_TK`` of every later forward (forward hooks)."""
    seen: list[list[torch.Tensor]] = []
    for moe in model.moe_layers:
        seen.append([])
        moe.gate.register_forward_hook(lambda _m, _i, r, out=seen[-1]: out.append(r.experts_TK.detach().clone()))
    return seen


def _graph_tensors(obj, path: str, depth: int = 0):
    """Paths of tensors with a ``grad_fn`` reachable from ``obj`` through containers and dataclasses
    (sub-modules are visited on their own)."""
    if isinstance(obj, torch.Tensor):
        if obj.grad_fn is not None:
            yield path
    elif isinstance(obj, nn.Module) or depth > 5:
        return
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _graph_tensors(v, f"{path}[{k!r}]", depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            yield from _graph_tensors(v, f"{path}[{i}]", depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _graph_tensors(getattr(obj, f.name), f"{path}.{f.name}", depth + 1)


def test_counts_equal_top_k_choices_per_group(model):
    seen = _capture_choices(model)
    counter = ExpertCounter(model, ("speech", "text"))
    tokens = _tokens(model)
    group_BL = torch.tensor([[0, 1, -1, 0, 0, 1, 1, -1, 0], [1, 1, 1, 0, -1, -1, 0, 1, 1]])
    with counter.count(group_BL):
        model(tokens, labels_BLC=tokens).loss.backward()
    with counter.count(1):  # every token text
        model(tokens)
    counts = counter.take()
    E = model.cfg.n_routed_experts
    group_T = group_BL.reshape(-1)
    for li, (first, second) in enumerate(seen):
        want_speech = torch.bincount(first[group_T == 0].reshape(-1), minlength=E)
        want_text = (torch.bincount(first[group_T == 1].reshape(-1), minlength=E)
                     + torch.bincount(second.reshape(-1), minlength=E))
        assert torch.equal(counts["speech"][li], want_speech), li
        assert torch.equal(counts["text"][li], want_text), li
    k, L = model.cfg.num_experts_per_tok, len(model.moe_layers)
    assert int(counts["speech"].sum()) == 6 * k * L and counts["speech"].dtype == torch.long
    assert all(int(c.sum()) == 0 for c in counter.take().values())  # take restarts the counters
    model(tokens)  # outside count(): nothing counted
    assert all(int(c.sum()) == 0 for c in counter.take().values())
    counter.close()
    assert all(m.tokens_per_expert_GE.shape == (0, E) and m.token_group is None for m in model.moe_layers)


def test_off_by_default_and_not_in_the_state_dict(model):
    moe = model.moe_layers[0]
    assert moe.token_group is None and moe.tokens_per_expert_GE.numel() == 0
    assert not any("tokens_per_expert" in k for k in model.state_dict())
    moe.token_group = 0  # labelled without a counter: refused, not silently dropped
    with pytest.raises(RuntimeError):
        moe(torch.randn(1, 3, model.cfg.hidden_size))
    moe.token_group = None
    counter = ExpertCounter(model)
    with pytest.raises(ValueError), counter.count(torch.zeros(5, dtype=torch.long)):  # wrong number of tokens
        model(_tokens(model, 1, 4))
    assert moe.token_group is None  # the context clears the labels even on error


def test_no_module_keeps_an_autograd_graph(model):
    counter = ExpertCounter(model, ("all",))
    tokens = _tokens(model)
    with counter.count(0):
        out = model(tokens, labels_BLC=tokens)
    assert out.loss.grad_fn is not None  # there was a graph to keep
    leaks = [p for name, mod in model.named_modules() for p in _graph_tensors(vars(mod), name or "model")]
    assert leaks == []
    assert isinstance(model.moe_layers[0], MoE) and not model.moe_layers[0].tokens_per_expert_GE.requires_grad


def test_a_counter_takes_its_layers_back_from_a_newer_one(tiny_model):
    """Two engines on one model (a benchmark's): the older counter, counting again after a newer one with fewer
    groups took the layers over, gets counters of its own size back (from zero) instead of indexing past them."""
    from deepomni.model.routing_stats import ExpertCounter

    tok = torch.randint(0, 50, (1, 6, tiny_model.layout.num_channels))
    wide = ExpertCounter(tiny_model, [f"g{i}" for i in range(8)])
    narrow = ExpertCounter(tiny_model, ["a", "b"])
    with narrow.count(1), torch.no_grad():
        tiny_model(tok)
    with wide.count(7), torch.no_grad():  # group 7 is past the narrow counter's 2 groups
        tiny_model(tok)
    got_LGE = wide.take_LGE()
    assert got_LGE.shape[1] == 8 and got_LGE[:, 7].sum() > 0 and got_LGE[:, :7].sum() == 0
    assert narrow.take_LGE().sum() == 0  # its counts were lost when the wide one took the layers back
    wide.close()
