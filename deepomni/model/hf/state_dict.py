"""HF DeepSeek-V2 tensor names <-> DeepOmni parameter names (the state-dict adapter, torchtitan style).

:data:`FROM_HF` is the whole name map: HF name patterns (``{}`` = the layer index, then the expert index)
to our parameter names and the :data:`Part` of our parameter the HF tensor fills. Our module tree uses
transformers' names, so apart from the vocabulary and the routed experts a row is "drop ``model.``":

* Vocabulary (``"vocab"``): our table is ``[text | 64 text specials | codec 0 | ... | codec K-1]``
  (:class:`~deepomni.model.channels.VocabLayout`); an HF checkpoint holds its first ``rows`` rows (the text
  block, or the text block and its specials when exported with them), every other row is ours alone.
* Routed experts: we hold them stacked, ``gate_up_proj[E, 2F, D]`` and ``down_proj[E, D, F]``. The hub
  layout (and what ``save_pretrained`` writes: transformers >= 5 stacks the experts in memory and reverts
  that when saving) has one tensor per expert and projection: ``"gate"`` is ``gate_up_proj[j, :F]``,
  ``"up"`` is ``gate_up_proj[j, F:]``, ``"down"`` is ``down_proj[j]``. The stacked keys
  (``save_pretrained(save_original_format=False)``) map whole (``"all"``).

:data:`TO_HF` is the same table inverted. A *unit* is what one per-expert-layout HF tensor fills:
``None`` (the whole parameter), ``"text"`` (the checkpoint's vocabulary rows) or ``(j, part)`` (expert j's
slice). :func:`fill_from_hf` loads a stream of HF tensors into a model strictly;
:func:`iter_hf_tensors` yields a model's tensors under their HF names. Neither touches files (see ``io``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import nn

Part = Literal["all", "vocab", "gate", "up", "down"]
Unit = Any  # None | "text" | (expert index, "gate" | "up" | "down")
ExpertLayout = Literal["per_expert", "stacked"]

_L = "model.layers.{}."
FROM_HF: dict[str, tuple[str, Part]] = {
    "model.embed_tokens.weight": ("embed.weight", "vocab"),
    "lm_head.weight": ("embed.head_weight", "vocab"),  # untied models only
    "model.norm.weight": ("norm.weight", "all"),
    _L + "input_layernorm.weight": ("layers.{}.input_layernorm.weight", "all"),
    _L + "post_attention_layernorm.weight": ("layers.{}.post_attention_layernorm.weight", "all"),
    # MLA attention (q_proj without a q LoRA; q_a_proj / q_a_layernorm / q_b_proj with one)
    _L + "self_attn.q_proj.weight": ("layers.{}.self_attn.q_proj.weight", "all"),
    _L + "self_attn.q_a_proj.weight": ("layers.{}.self_attn.q_a_proj.weight", "all"),
    _L + "self_attn.q_a_layernorm.weight": ("layers.{}.self_attn.q_a_layernorm.weight", "all"),
    _L + "self_attn.q_b_proj.weight": ("layers.{}.self_attn.q_b_proj.weight", "all"),
    _L + "self_attn.kv_a_proj_with_mqa.weight": ("layers.{}.self_attn.kv_a_proj_with_mqa.weight", "all"),
    _L + "self_attn.kv_a_layernorm.weight": ("layers.{}.self_attn.kv_a_layernorm.weight", "all"),
    _L + "self_attn.kv_b_proj.weight": ("layers.{}.self_attn.kv_b_proj.weight", "all"),
    _L + "self_attn.o_proj.weight": ("layers.{}.self_attn.o_proj.weight", "all"),
    # dense MLP (layers [0, first_k_dense_replace))
    _L + "mlp.gate_proj.weight": ("layers.{}.mlp.gate_proj.weight", "all"),
    _L + "mlp.up_proj.weight": ("layers.{}.mlp.up_proj.weight", "all"),
    _L + "mlp.down_proj.weight": ("layers.{}.mlp.down_proj.weight", "all"),
    # MoE: router, shared experts, routed experts per expert (hub layout) or stacked
    _L + "mlp.gate.weight": ("layers.{}.mlp.gate.weight", "all"),
    _L + "mlp.shared_experts.gate_proj.weight": ("layers.{}.mlp.shared_experts.gate_proj.weight", "all"),
    _L + "mlp.shared_experts.up_proj.weight": ("layers.{}.mlp.shared_experts.up_proj.weight", "all"),
    _L + "mlp.shared_experts.down_proj.weight": ("layers.{}.mlp.shared_experts.down_proj.weight", "all"),
    _L + "mlp.experts.{}.gate_proj.weight": ("layers.{}.mlp.experts.gate_up_proj", "gate"),
    _L + "mlp.experts.{}.up_proj.weight": ("layers.{}.mlp.experts.gate_up_proj", "up"),
    _L + "mlp.experts.{}.down_proj.weight": ("layers.{}.mlp.experts.down_proj", "down"),
    _L + "mlp.experts.gate_up_proj": ("layers.{}.mlp.experts.gate_up_proj", "all"),
    _L + "mlp.experts.down_proj": ("layers.{}.mlp.experts.down_proj", "all"),
}
TO_HF: dict[tuple[str, Part], str] = {ours: hf for hf, ours in FROM_HF.items()}

# checkpoint entries that are not weights (old exports sometimes carry the rotary buffers)
IGNORED_HF_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# parameters of ours outside the HF text backbone (not exported, fresh at import)
NOT_IN_HF = ("speech.",)
_INDEX = re.compile(r"\.(\d+)(?=\.)")
_MAX_LISTED = 20


def _abstract(name: str) -> tuple[str, list[str]]:
    """``model.layers.3.mlp.experts.5.up_proj.weight`` -> (the pattern with ``{}``, ``["3", "5"]``)."""
    return _INDEX.sub(".{}", name), _INDEX.findall(name)


# ========================================================================================= name map
def _units(name: str, p: torch.Tensor) -> list[Unit]:
    """The units an HF checkpoint must fill for our parameter ``name``."""
    if name in ("embed.weight", "embed.head_weight"):
        return ["text"]
    if name.endswith("mlp.experts.gate_up_proj"):
        return [(j, part) for j in range(p.shape[0]) for part in ("gate", "up")]
    if name.endswith("mlp.experts.down_proj"):
        return [(j, "down") for j in range(p.shape[0])]
    return [None]


def _index(unit: Unit, p: torch.Tensor, rows: int) -> tuple:
    """Where ``unit`` sits in parameter ``p`` (``rows``: the checkpoint's vocabulary rows)."""
    if unit is None:
        return ()
    if unit == "text":
        return (slice(0, rows),)
    j, part = unit
    if part == "down":
        return (j,)
    F = p.shape[1] // 2
    return (j, slice(0, F)) if part == "gate" else (j, slice(F, 2 * F))


def hf_name(name: str, unit: Unit = None) -> str:
    """HF (per-expert layout) name of one unit of our parameter ``name``; ``unit=None`` on a stacked expert
    parameter gives the stacked key. Raises ``KeyError`` for a parameter the HF backbone does not have."""
    pattern, idx = _abstract(name)
    if isinstance(unit, tuple):
        j, part = unit
        return TO_HF[(pattern, part)].format(*idx, j)
    whole: Part = "vocab" if (pattern, "vocab") in TO_HF else "all"
    if (pattern, whole) not in TO_HF:
        raise KeyError(f"our parameter {name!r} has no HF name")
    return TO_HF[(pattern, whole)].format(*idx)


_ALL = "all"  # an HF tensor that fills every unit of our parameter (stacked experts, plain 1:1 tensors)


def our_name(key: str) -> tuple[str, Unit] | None:
    """``(our parameter name, unit or "all")`` that HF tensor ``key`` fills; None if it has no place."""
    pattern, idx = _abstract(key)
    if pattern not in FROM_HF:
        return None
    ours, part = FROM_HF[pattern]
    if part == "vocab":
        return ours, "text"
    if part == "all":
        return ours.format(*idx), _ALL
    layer, expert = idx
    return ours.format(layer), (int(expert), part)


# ============================================================================================ import
def _listing(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


# one checkpoint tensor: (HF name, where it comes from (for messages), a getter that reads it)
HFTensor = tuple[str, str, Callable[[], torch.Tensor]]


@torch.no_grad()
def fill_from_hf(model: nn.Module, tensors: Iterable[HFTensor], rows: int, source: str = "checkpoint") -> None:
    """Copy every tensor of ``tensors`` into ``model``'s backbone, strictly.

    ``rows``: how many vocabulary rows the checkpoint holds. Any tensor without a place, any model unit
    not filled, a unit filled twice (e.g. one expert in both layouts) or a shape mismatch is a
    ``ValueError`` listing the offending names. A tensor is read (``getter()``) only once its place is
    known to be free, and dropped after the copy: peak memory is the model plus one tensor."""
    tied = bool(model.cfg.tie_word_embeddings)
    params = dict(model.named_parameters())
    todo = {name: set(_units(name, p)) for name, p in params.items() if not name.startswith(NOT_IN_HF)}
    unexpected, twice, bad_shape = [], [], []
    tied_lm_head = None
    for key, where, read in tensors:
        if IGNORED_HF_KEYS.search(key):
            continue
        target = our_name(key)
        if target is not None and target[0] == "embed.head_weight" and tied:
            tied_lm_head = read()  # a tied checkpoint storing lm_head anyway: checked below
            continue
        if target is None or target[0] not in todo:
            unexpected.append(f"{key} ({where})")
            continue
        name, unit = target
        p = params[name]
        units = _units(name, p) if unit == _ALL else [unit]
        index = () if unit == _ALL else _index(unit, p, rows)
        expect = p[index].shape
        if any(u not in todo[name] for u in units):
            twice.append(key)
            continue
        t = read()
        if t.shape != expect:
            bad_shape.append(f"{key}: checkpoint {tuple(t.shape)}, model {tuple(expect)} ({name})")
            continue
        p[index].copy_(t)
        todo[name].difference_update(units)
        del t

    missing = [hf_name(name, u) for name, us in todo.items() for u in sorted(us, key=str)]
    if tied_lm_head is not None and "embed.weight" in todo and not todo["embed.weight"]:
        if not torch.equal(tied_lm_head.to(model.embed.weight.dtype), model.embed.weight[:rows].cpu()):
            bad_shape.append("lm_head.weight: tie_word_embeddings=True but it differs from embed_tokens")
    if unexpected or missing or twice or bad_shape:
        parts = [f"{source} does not match the model built from its config.json:"]
        if missing:
            parts.append(_listing("model tensors not in the checkpoint", missing))
        if unexpected:
            parts.append(_listing("checkpoint tensors with no place in the model", unexpected))
        if twice:
            parts.append(_listing("checkpoint tensors filling a part already filled (two layouts?)", twice))
        if bad_shape:
            parts.append(_listing("shape / content mismatches", bad_shape))
        raise ValueError("\n".join(parts))


# ============================================================================================ export
def keep_fp32(name: str) -> bool:
    return name.endswith("mlp.gate.weight")  # the router, fp32 like transformers' _keep_in_fp32_modules_strict


def iter_hf_tensors(
    model: nn.Module,
    expert_layout: ExpertLayout = "per_expert",
    dtype: torch.dtype | None = None,
    *,
    text_specials: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, CPU tensor)`` for every backbone tensor of ``model``, one at a time. The vocabulary keeps
    its text rows, and the text specials after them when ``text_specials``. Parameters outside the HF
    backbone (``speech.*``) are skipped; anything else without an HF name is an error. Every yielded tensor
    owns its storage (safetensors refuses shared storage); the router stays fp32 whatever ``dtype``."""
    if expert_layout not in ("per_expert", "stacked"):
        raise ValueError(f"expert_layout must be 'per_expert' or 'stacked', got {expert_layout!r}")
    cfg = model.cfg
    rows = cfg.text_vocab_size + (cfg.num_special_tokens if text_specials else 0)
    params = dict(model.named_parameters())
    unknown = [n for n in model.state_dict() if n not in params and not n.startswith(NOT_IN_HF)]
    for n in params:
        if not n.startswith(NOT_IN_HF):
            try:
                hf_name(n)
            except KeyError:
                unknown.append(n)
    if unknown:
        raise ValueError(f"model state has tensors the HF export does not know: {unknown}")

    for name, p in params.items():
        if name.startswith(NOT_IN_HF):
            continue
        full = p.detach()
        if hasattr(full, "full_tensor"):  # a DTensor (FSDP / TP sharded): gathered one parameter at a time
            full = full.full_tensor()
        units = _units(name, full)
        if isinstance(units[0], tuple) and full.shape[0] != cfg.n_routed_experts:
            raise ValueError(f"{name} holds {full.shape[0]} of {cfg.n_routed_experts} experts (expert parallel?): "
                             "export from a model with all experts")
        dt = torch.float32 if keep_fp32(name) else (dtype or full.dtype)

        def own(t: torch.Tensor) -> torch.Tensor:
            return t.to("cpu", dt, copy=True, memory_format=torch.contiguous_format)

        if units == [None] or (expert_layout == "stacked" and units[0] != "text"):
            yield hf_name(name), own(full)
        elif units == ["text"]:
            yield hf_name(name), own(full[:rows])
        else:
            for u in units:
                yield hf_name(name, u), own(full[_index(u, full, rows)])


# ================================================================================ vocabulary growth
NEW_ROW_NOISE = 0.1  # "mean" init: noise std as a fraction of the per-dimension std of the text rows


@torch.no_grad()
def init_new_rows(table: torch.Tensor, n_stats: int, n_keep: int, how: str, std: float,
                  gen: torch.Generator) -> None:
    """Fresh rows ``[n_keep:)`` of an embedding / head table whose first ``n_keep`` rows came from a checkpoint.

    ``"mean"``: ``N(mu, (0.1 * sigma)^2)`` per dimension, ``mu`` / ``sigma`` over the text rows ``[0, n_stats)``:
    new tokens start near the average token, so the text specials neither dominate nor vanish from the
    text softmax and a text-only position's input gets a near-constant offset rather than random noise,
    while different codes still differ at step 0. ``"normal"``: the from-scratch ``N(0, std^2)``."""
    n_new = table.shape[0] - n_keep
    if n_new <= 0:
        return
    z = torch.randn(n_new, table.shape[1], generator=gen, dtype=torch.float32)
    if how == "normal":
        table[n_keep:].copy_(z * std)
        return
    if how != "mean":
        raise ValueError(f"new_row_init must be 'mean' or 'normal', got {how!r}")
    # mean / std over the text rows, in float64 chunks (the table may be large and low precision)
    s1 = torch.zeros(table.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    for chunk in table[:n_stats].split(8192):
        c = chunk.to("cpu", torch.float64)
        s1 += c.sum(0)
        s2 += (c * c).sum(0)
    mu = s1 / n_stats
    sigma = (s2 / n_stats - mu * mu).clamp_min(0).sqrt()
    table[n_keep:].copy_((mu.float() + NEW_ROW_NOISE * sigma.float() * z).to(table.device))


__all__ = ["FROM_HF", "TO_HF", "ExpertLayout", "HFTensor", "fill_from_hf", "hf_name", "init_new_rows",
           "iter_hf_tensors", "keep_fp32", "our_name"]
