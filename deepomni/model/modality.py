"""Modality experts (docs/paper.md "Adaptive modality expert assignment"): the per-layer speech / text expert
lists, saved as a JSON artifact next to the checkpoint, and the routing modes that train them apart.

    mode "all"    : router sees every expert; no gradient mask         (text_pretrain, S1, S3, baselines)
    mode "speech" : router logits outside the speech experts are -inf before the softmax, and of the
                    routed experts and router rows only the speech experts' get gradient      (S2.1)
    mode "text"   : the same with the text experts                                            (S2.2)
    mode "extend" : router sees every expert; of the routed experts and router rows only the speech
                    experts' get gradient (MoExtend: the speech experts are the added ones,
                    deepomni.model.extend)

Which other parameters train (shared experts, norms, embeddings, ...) is the stage's ``trainable``
predicate (:mod:`deepomni.train.stages`), not the mode. Freezing with stacked expert weights: not
``requires_grad`` and not a parameter hook, but a gradient mask in the forward
(:func:`~deepomni.model.moe.mask_grad_rows`, applied to the stacked expert weights and the router weight by
:class:`~deepomni.model.moe.MoE`'s router and experts) zeroes the gradient rows of the other experts.
Adam's update of a row whose gradient has always been zero is exactly zero, but decoupled weight decay
would still shrink it, so :func:`param_groups` puts the stacked expert tensors and router weights in a
group without weight decay whenever a mode other than "all" is set (docs/paper.md "Routing masks and
gradient masks").
The profiler that measures modality load and chooses the lists is :mod:`deepomni.train.profile`;
:func:`assign_from_load` is the paper's selection rule on a given load; :func:`expert_share` measures an
answer's routed pairs against an assignment (the serving engine's ``expert_share``).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..atomic import write_atomic
from ..config import RoutingMode
from .moe import MoE

MODES: tuple[str, ...] = typing.get_args(RoutingMode)  # ("all", "speech", "text", "extend")


@dataclass
class ExpertAssignment:
    """Speech experts per MoE layer (text experts: the rest), keyed by the layer's index in the model."""

    num_experts: int
    speech: dict[int, list[int]]

    def text(self, layer: int) -> list[int]:
        s = set(self.speech[layer])
        return [e for e in range(self.num_experts) if e not in s]

    def experts(self, layer: int, mode: str) -> list[int] | None:
        if mode == "all":
            return None
        if mode in ("speech", "extend"):
            return sorted(self.speech[layer])
        if mode == "text":
            return self.text(layer)
        raise ValueError(f"unknown routing mode {mode!r}; expected one of {MODES}")

    def validate(self, moe_layers: list[int] | None = None) -> None:
        for layer, ids in self.speech.items():
            if len(set(ids)) != len(ids) or any(not 0 <= e < self.num_experts for e in ids):
                raise ValueError(f"layer {layer}: speech experts {ids} must be distinct ids in [0, {self.num_experts})")
        if moe_layers is not None and sorted(self.speech) != sorted(moe_layers):
            raise ValueError(f"assignment covers layers {sorted(self.speech)}, the model's MoE layers are {moe_layers}")

    # ------------------------------------------------------------------------------------ artifact
    def to_json(self) -> dict:
        return {
            "num_experts": self.num_experts,
            "layers": {str(l): {"speech": sorted(v), "text": self.text(l)} for l, v in sorted(self.speech.items())},
        }

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_json(), indent=1))  # the whole file or none: it marks "done"

    @classmethod
    def load(cls, path: str | Path) -> "ExpertAssignment":
        try:
            d = json.loads(Path(path).read_text())
            layers = d["layers"]
            a = cls(int(d["num_experts"]), {int(l): list(map(int, v["speech"])) for l, v in layers.items()})
        except FileNotFoundError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not an expert-assignment artifact ({e})") from e
        for l, v in layers.items():
            if "text" in v and sorted(v["text"]) != a.text(int(l)):
                raise ValueError(f"{path}: layer {l}: text experts must be exactly the complement of speech experts")
        a.validate()
        return a


# the score an expert is ranked by for speech, from its share of the speech (rho_A) and text (rho_T) load.
# "paper": the paper's rho_A * (1 - rho_T). With E experts the shares are ~1/E, so (1 - rho_T) is ~1 and the
# score ranks by speech load alone (at E = 16 the experts it picked carried 30% of the text load, above the
# 25% of chance: benchmarks/results/assignment.md); "difference": rho_A - rho_T, which weighs both alike
SCORES = {"paper": lambda a, t: a * (1 - t), "difference": lambda a, t: a - t}


def assign_from_load(load_speech_LE: torch.Tensor, load_text_LE: torch.Tensor, n_speech: int,
                     layer_ids: list[int], score: str = "paper") -> ExpertAssignment:
    """Per layer, the ``n_speech`` experts with the largest score (:data:`SCORES`; the paper's rule:
    ``rho_A * (1 - rho_T)``)."""
    if load_speech_LE.shape != load_text_LE.shape or load_speech_LE.shape[0] != len(layer_ids):
        raise ValueError("load tensors must both be [num_moe_layers, num_experts]")
    if score not in SCORES:
        raise ValueError(f"unknown assignment score {score!r}; expected one of {sorted(SCORES)}")
    E = load_speech_LE.shape[1]
    if not 0 < n_speech < E:
        raise ValueError(f"n_speech must be in (0, {E})")
    top = torch.topk(SCORES[score](load_speech_LE, load_text_LE), n_speech, dim=1).indices
    return ExpertAssignment(E, {l: sorted(top[i].tolist()) for i, l in enumerate(layer_ids)})


# ---------------------------------------------------------------------------------------- routing modes
def moe_layers(model: nn.Module) -> dict[int, MoE]:
    """MoE modules keyed by their layer index (``layers.<i>.mlp``)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, MoE):
            parts = name.split(".")
            out[int(parts[parts.index("layers") + 1])] = mod
    return out


def set_routing_mode(model: nn.Module, mode: RoutingMode, assignment: ExpertAssignment | None = None) -> None:
    """Mask routing and gradients of every MoE layer to the experts of ``mode``."""
    if mode not in MODES:
        raise ValueError(f"unknown routing mode {mode!r}; expected one of {MODES}")
    layers = moe_layers(model)
    if mode != "all":
        if assignment is None:
            raise ValueError(f"routing mode {mode!r} needs an expert assignment")
        assignment.validate(list(layers))
    for idx, moe in layers.items():
        ids = None if assignment is None else assignment.experts(idx, mode)
        if ids is None:
            moe.set_expert_masks(None, None)
        else:
            mask = torch.zeros(moe.num_experts, dtype=torch.bool)
            mask[ids] = True
            moe.set_expert_masks(None if mode == "extend" else mask, mask)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: decay on matrices, none on norms/biases, and none on tensors that hold several
    experts while a modality mask freezes some of them (so frozen rows stay bit-identical)."""
    masked = {id(p) for m in moe_layers(model).values() if m.trainable_E is not None
              for p in (m.experts.gate_up_proj, m.experts.down_proj, m.gate.weight)}
    embed = getattr(model, "embed", None)
    if embed is not None and getattr(embed, "trainable_rows", None) is not None:  # row-masked tables too
        masked |= {id(p) for p in (embed.weight, embed.head_weight) if p is not None}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or id(p) in masked else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

# ------------------------------------------------------------------------------- where an answer's tokens went
def expert_share(routed: dict[str, torch.Tensor], layer_ids: Sequence[int], top_k: int,
                 assignment: ExpertAssignment | None = None) -> dict:
    """Routed pairs (``routed``: modality of the token -> ``[moe layers, E]``; ``layer_ids[l]``: row l's model
    layer; ``top_k``: experts per token) summed up as plain JSON, per MoE layer: the pairs (``routed``), the
    experts that got any (``experts_used``) and, with the modality ``assignment``, the share of the pairs on
    the layer's speech experts and on its text experts (``speech``, ``text``: they sum to 1; None without an
    assignment); ``tokens``: the tokens of each modality the counts hold."""
    all_LE = sum(routed.values())
    L, E = all_LE.shape
    routed_L = all_LE.sum(1)
    out = {"layers": [int(i) for i in layer_ids], "num_experts": E, "routed": routed_L.tolist(),
           "experts_used": (all_LE > 0).sum(1).tolist(),
           "tokens": {m: int(c_LE[0].sum()) // top_k if L else 0 for m, c_LE in routed.items()},
           "speech": None, "text": None}
    if assignment is not None:
        on_speech_LE = torch.zeros(L, E, dtype=torch.bool)
        for l, layer in enumerate(layer_ids):
            on_speech_LE[l, assignment.speech[int(layer)]] = True
        share_L = (all_LE * on_speech_LE).sum(1).double() / routed_L.clamp(min=1)
        out["speech"] = [round(float(x), 4) for x in share_L]
        out["text"] = [round(1.0 - x, 4) if n else 0.0 for x, n in zip(out["speech"], routed_L.tolist())]
    return out
