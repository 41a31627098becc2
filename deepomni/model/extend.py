"""MoExtend (the paper's "add new experts" baseline; Zhong et al. 2024 and the authors' release,
``train_moextend.py``): every MoE layer gets ``n_new`` more routed experts for speech, each a copy of an
existing expert, and as many new router rows, freshly initialised; the original experts and router rows stay
as they were.

    experts   [E, ...]  ->  [E + N, ...]   expert E + i is a copy of expert ``(i + 1) * (E // N) - 1``
                                           (evenly spaced, as the release copies every (E/N)-th expert)
    router    [E, D]    ->  [E + N, D]     the new rows drawn normal(0, initializer_range), seeded

The extended model is an ordinary checkpoint: its config says ``n_routed_experts = E + N`` (so it is
exported and served like any other), and its expert assignment (experts.json) names the new experts as the
speech experts. Training the new experts alone is routing mode ``"extend"``
(:mod:`deepomni.model.modality`): the router sees every expert, only the new experts and their router rows
receive gradient.
"""

from __future__ import annotations

import torch

from ..weights import assign, empty_modules, materialize
from .modality import ExpertAssignment, moe_layers
from .model import DeepOmniModel


def copied_experts(num_experts: int, n_new: int) -> list[int]:
    """The existing expert each new one starts as a copy of (evenly spaced over the layer's experts)."""
    if not 0 < n_new <= num_experts:
        raise ValueError(f"n_new={n_new} must be in [1, {num_experts}] (one copy per existing expert at most)")
    stride = num_experts // n_new
    return [(i + 1) * stride - 1 for i in range(n_new)]


@torch.no_grad()
def extend_experts(model: DeepOmniModel, n_new: int, seed: int = 0) -> tuple[DeepOmniModel, ExpertAssignment]:
    """A new model with ``n_new`` experts added to every MoE layer (see the module doc) and the assignment
    that names them as speech experts. ``model`` is left unchanged."""
    E = model.cfg.n_routed_experts
    src = copied_experts(E, n_new)
    cfg = model.cfg.replace(n_routed_experts=E + n_new)
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for idx in moe_layers(model):
        pre = f"layers.{idx}.mlp."
        for name in ("experts.gate_up_proj", "experts.down_proj"):
            w = state[pre + name]
            state[pre + name] = torch.cat([w, w[src]])
        router = state[pre + "gate.weight"]
        new_rows = torch.randn(n_new, router.shape[1], generator=gen) * cfg.initializer_range
        state[pre + "gate.weight"] = torch.cat([router, new_rows.to(router.dtype)])
    device = next(model.parameters()).device
    with empty_modules(model.embed.weight.dtype):
        out = DeepOmniModel(cfg)
    for name, t in state.items():
        assign(out, name, t, device)
    materialize(out, device)
    out.train(model.training)
    speech = {idx: list(range(E, E + n_new)) for idx in moe_layers(out)}
    return out, ExpertAssignment(E + n_new, speech)
