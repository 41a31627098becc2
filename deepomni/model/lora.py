"""LoRA (the paper's low-rank adapter baseline) on our modules, through peft.

Adapters go on the attention projections of every layer (``q_proj`` or ``q_a_proj`` / ``q_b_proj``,
``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``: plain ``nn.Linear`` subclasses, peft's ``target_modules``)
and on the stacked routed experts of every MoE layer (``gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F]:
peft's ``target_parameters``, a rank-r update per expert, the same path peft takes for transformers' own MoE
layers). The speech encoder and projector get none.

peft injects the adapters into the model in place: the model stays a :class:`DeepOmniModel` that trains,
runs and expert-counts as before; :class:`Lora` keeps peft's ``LoraModel`` beside it for what only peft
does, merging. Every checkpoint a LoRA stage writes is the merged model (an ordinary checkpoint that
exports and serves as any other); the adapters' own state travels next to it for an exact resume
(:meth:`Lora.state_dict`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .model import DeepOmniModel

ATTENTION = r"layers\.\d+\.self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@dataclass
class Lora:
    """The adapters injected into ``model`` (peft's ``LoraModel`` holds it as ``tuner.model``)."""

    tuner: object  # peft.tuners.lora.LoraModel

    @property
    def model(self) -> DeepOmniModel:
        return self.tuner.model

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state with every adapter merged into its weight (our checkpoint's names), on the CPU;
        the training model is left as it is (a copy is merged)."""
        merged = copy.deepcopy(self.tuner).merge_and_unload()
        return {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The unmerged state (base weights and adapters, peft's names): what a resumed run loads back."""
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}


def apply_lora(model: DeepOmniModel, rank: int = 8, alpha: float = 16.0, seed: int = 0) -> Lora:
    """Inject LoRA adapters (B at zero, so the model's function is unchanged until it trains; A drawn from
    a generator seeded with ``seed``) into ``model``; only the adapters require grad afterwards."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=ATTENTION,
                     target_parameters=list(EXPERTS))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        tuner = LoraModel(model, cfg, "default")
    finally:
        torch.random.set_rng_state(state)
    return Lora(tuner)
