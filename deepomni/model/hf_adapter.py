"""Hugging Face <-> DeepOmni for DeepSeek-V2-family checkpoints (the state-dict adapter, torchtitan style).

Three entry points:

* :func:`config_from_hf` — a ``DeepseekV2Config`` (directory, ``config.json``, dict or config object) to a
  :class:`~deepomni.config.ModelConfig`; the channel / speech fields come from ``base``.
* :func:`import_hf` — a local HF checkpoint directory to a :class:`DeepOmniModel` with the vocabulary
  extended by the text specials and the codec blocks.
* :func:`export_hf` — the text backbone of a :class:`DeepOmniModel` to a directory that
  ``transformers.DeepseekV2ForCausalLM.from_pretrained`` loads (specials and codec rows dropped).

Tensor names (HF -> ours). Our module tree uses transformers' names, so apart from the vocabulary and
the routed experts the map is "drop the ``model.`` prefix"::

    model.embed_tokens.weight                          -> embed.weight[:V]          (V = text_vocab_size)
    lm_head.weight                                     -> embed.head_weight[:V]     (untied models only)
    model.norm.weight                                  -> norm.weight
    model.layers.{l}.mlp.experts.{j}.gate_proj.weight  -> layers.{l}.mlp.experts.gate_up_proj[j, :F]
    model.layers.{l}.mlp.experts.{j}.up_proj.weight    -> layers.{l}.mlp.experts.gate_up_proj[j, F:]
    model.layers.{l}.mlp.experts.{j}.down_proj.weight  -> layers.{l}.mlp.experts.down_proj[j]
    model.layers.{l}.{rest}                            -> layers.{l}.{rest}

The per-expert keys are the hub layout (and what ``save_pretrained`` writes: transformers >= 5 stacks the
experts in memory and reverts that when saving). The stacked keys ``model.layers.{l}.mlp.experts.
{gate_up_proj,down_proj}`` (``save_pretrained(save_original_format=False)``) import too, by the last rule.
:func:`export_hf` writes per-expert keys by default.

Vocabulary extension. Our table is ``[text | 64 text specials | codec 0 | ... | codec K-1]``
(:class:`~deepomni.model.channels.VocabLayout`); the checkpoint fills the text rows, every other row is
new. ``new_row_init="mean"`` (default) draws new rows from ``N(mu, (0.1 * sigma)^2)`` per dimension, with
``mu`` / ``sigma`` the mean / standard deviation of the checkpoint's text rows (of ``lm_head`` for the
untied head): new tokens start near the average token, so the text specials neither dominate nor vanish
from the text softmax and a text-only position's input ``(e_text + K * e_PAD) / (K + 1)`` gets a
near-constant offset rather than random noise, while different codes still differ at step 0.
``new_row_init="normal"`` uses the from-scratch init instead (``N(0, initializer_range^2)``).

Loading is strict: any checkpoint tensor not consumed, any model tensor not filled, a tensor written twice
(e.g. one expert in both layouts) or a shape mismatch is an error that lists the offending names. The model
is constructed directly in ``dtype`` (not on the meta device: see :func:`_empty_model`), then filled one
checkpoint tensor at a time from memory-mapped safetensors: peak memory is one model plus one tensor. The
router weights stay fp32 whatever ``dtype`` (as transformers keeps ``gate.weight``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..config import ModelConfig

if TYPE_CHECKING:
    from .model import DeepOmniModel

# checkpoint entries that are not weights (old exports sometimes carry the rotary buffers)
_IGNORED_HF_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_PER_EXPERT_KEY = re.compile(r"model\.(layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
_LAYER_OR_NORM_KEY = re.compile(r"model\.(layers\.\d+\..+|norm\.weight)")
# parameters of ours that are not part of the HF text backbone (not exported, fresh at import)
_NOT_IN_HF = ("speech.",)
_MAX_LISTED = 20

NewRowInit = Literal["mean", "normal"]
NEW_ROW_NOISE = 0.1  # "mean" init: noise std as a fraction of the per-dimension std of the text rows


# ================================================================================================ config
_ROPE_META_KEYS = ("rope_theta", "rope_type", "type")


def _load_hf_config_dict(hf: str | os.PathLike | Mapping[str, Any] | Any) -> dict[str, Any]:
    if isinstance(hf, Mapping):
        return dict(hf)
    if hasattr(hf, "to_dict"):  # a transformers PreTrainedConfig
        return hf.to_dict()
    path = Path(hf)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no HF config found at {str(hf)!r} (expected a directory with config.json)")
    return json.loads(path.read_text())


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from transformers-5 ``rope_parameters`` or the legacy ``rope_theta`` +
    ``rope_scaling`` pair (DeepSeek-V2-Lite's config.json). Our ``rope_scaling`` keeps the scaling keys with
    ``"type"`` naming the kind, as the ``deepseek-v2-lite`` preset; ``None`` for plain RoPE."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported (DeepSeek-V2 has one RoPE)")
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ValueError(f"unsupported RoPE type {kind!r}: the importer handles plain RoPE and 'yarn'")
    scaling = {"type": kind}
    scaling.update({k: v for k, v in params.items() if k not in _ROPE_META_KEYS})
    return theta, scaling


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling:
        params = dict(cfg.rope_scaling)
        out["rope_type"] = params.pop("rope_type", params.pop("type", "default"))
        params.pop("type", None)
        out.update(params)
    return out


def _check_supported(d: dict[str, Any]) -> None:
    problems = []

    def need(key: str, ok: bool, why: str) -> None:
        if not ok:
            problems.append(f"{key}={d.get(key)!r}: {why}")

    need("model_type", d.get("model_type", "deepseek_v2") == "deepseek_v2", "only DeepSeek-V2 checkpoints")
    need("hidden_act", d.get("hidden_act", "silu") == "silu", "SwiGLU with silu only")
    need("attention_bias", not d.get("attention_bias", False), "MLA projections have no bias here")
    need("mlp_bias", not d.get("mlp_bias", False), "MLPs have no bias here")
    need("topk_method", d.get("topk_method") in (None, "greedy"),
         "only greedy top-k routing (group-limited routing, e.g. DeepSeek-V2 236B, is not implemented)")
    need("scoring_func", d.get("scoring_func", "softmax") == "softmax", "softmax router scores only")
    need("moe_layer_freq", d.get("moe_layer_freq", 1) == 1, "every layer after first_k_dense_replace is MoE")
    need("n_routed_experts", isinstance(d.get("n_routed_experts", 64), int), "an all-dense model is not supported")
    kv = d.get("num_key_value_heads")
    heads = d.get("num_attention_heads", 32)
    need("num_key_value_heads", kv in (None, heads), "MLA has one KV head per query head")
    if problems:
        raise ValueError("unsupported DeepSeek-V2 config: " + "; ".join(problems))
    if d.get("norm_topk_prob") and float(d.get("routed_scaling_factor", 1.0)) != 1.0:
        raise ValueError(
            "norm_topk_prob=True with routed_scaling_factor != 1 is ambiguous across implementations "
            "(the original DeepSeek-V2 code scales only unnormalised weights, ours always scales); not supported"
        )


def config_from_hf(
    hf: str | os.PathLike | Mapping[str, Any] | Any, base: ModelConfig | None = None, **overrides: Any
) -> ModelConfig:
    """A ModelConfig for an HF DeepSeek-V2 config (directory, config.json path, dict or config object).

    Backbone fields come from the HF config; the rest (channels, speech encoder, MoE kernel) from ``base``
    (``ModelConfig()`` defaults when None); ``overrides`` win over both. Raises ``ValueError`` for features
    this backbone does not implement."""
    d = _load_hf_config_dict(hf)
    _check_supported(d)
    base = base if base is not None else ModelConfig()
    theta, scaling = _rope_from_hf(d)
    mapped = dict(
        hidden_size=d["hidden_size"],
        num_hidden_layers=d["num_hidden_layers"],
        intermediate_size=d["intermediate_size"],
        moe_intermediate_size=d["moe_intermediate_size"],
        n_routed_experts=d["n_routed_experts"],
        n_shared_experts=d.get("n_shared_experts") or 0,
        num_experts_per_tok=d["num_experts_per_tok"],
        first_k_dense_replace=d.get("first_k_dense_replace", 0),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        aux_loss_alpha=float(d.get("aux_loss_alpha", base.aux_loss_alpha)),
        num_attention_heads=d["num_attention_heads"],
        q_lora_rank=d.get("q_lora_rank"),
        kv_lora_rank=d["kv_lora_rank"],
        qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"],
        v_head_dim=d["v_head_dim"],
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=d["max_position_embeddings"],
        initializer_range=float(d.get("initializer_range", base.initializer_range)),
        text_vocab_size=d["vocab_size"],
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),  # DeepseekV2Config's default
    )
    if d.get("norm_topk_prob"):
        warnings.warn(
            "norm_topk_prob=True: DeepOmni renormalises the top-k router weights (as the original DeepSeek-V2 "
            "code); transformers' DeepseekV2 ignores this flag, so logits will differ from transformers'",
            stacklevel=2,
        )
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown ModelConfig fields in overrides: {sorted(unknown)}")
    return base.replace(**{**mapped, **overrides})


def hf_config_dict(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The DeepseekV2Config fields of our backbone (text vocabulary only); ``extra`` adds or overrides any
    (e.g. ``bos_token_id``). The inverse of :func:`config_from_hf` on the backbone fields."""
    d = dict(
        architectures=["DeepseekV2ForCausalLM"],
        model_type="deepseek_v2",
        vocab_size=cfg.text_vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense_replace,
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
        topk_method="greedy",
        n_group=None,
        topk_group=None,
        aux_loss_alpha=cfg.aux_loss_alpha,  # not a DeepseekV2Config field; kept as in DeepSeek's config.json
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        rope_parameters=_rope_to_hf(cfg),
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    d.update(extra)
    return d


# ============================================================================================ name map
# A "unit" is the part of one of our parameters that one per-expert-layout HF tensor fills:
#   None             the whole parameter
#   "text"           rows [0, text_vocab_size) of embed.weight / embed.head_weight
#   (j, "gate"|"up"|"down")   expert j's slice of a stacked expert tensor
Unit = Any


def _is_vocab(name: str) -> bool:
    return name in ("embed.weight", "embed.head_weight")


def _units(name: str, p: torch.Tensor) -> list[Unit]:
    """The units an HF checkpoint must fill for our parameter ``name``."""
    if _is_vocab(name):
        return ["text"]
    if name.endswith("mlp.experts.gate_up_proj"):
        return [(j, part) for j in range(p.shape[0]) for part in ("gate", "up")]
    if name.endswith("mlp.experts.down_proj"):
        return [(j, "down") for j in range(p.shape[0])]
    return [None]


def _index(unit: Unit, p: torch.Tensor, text_vocab: int) -> tuple:
    """Where ``unit`` sits in parameter ``p``."""
    if unit is None:
        return ()
    if unit == "text":
        return (slice(0, text_vocab),)
    j, part = unit
    if part == "down":
        return (j,)
    F = p.shape[1] // 2
    return (j, slice(0, F)) if part == "gate" else (j, slice(F, 2 * F))


def hf_name(name: str, unit: Unit = None) -> str:
    """HF (per-expert layout) name of one unit of our parameter ``name``."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "embed.head_weight":
        return "lm_head.weight"
    if isinstance(unit, tuple):
        j, part = unit
        return f"model.{name.rsplit('.', 1)[0]}.{j}.{part}_proj.weight"
    return f"model.{name}"


_ALL = "all"  # an HF tensor that fills every unit of our parameter (stacked experts, plain 1:1 tensors)


def our_name(key: str) -> tuple[str, Unit] | None:
    """``(our parameter name, unit or "all")`` that HF tensor ``key`` fills; None if it has no place."""
    if key == "model.embed_tokens.weight":
        return "embed.weight", "text"
    if key == "lm_head.weight":
        return "embed.head_weight", "text"
    m = _PER_EXPERT_KEY.fullmatch(key)
    if m:
        stacked = "down_proj" if m[3] == "down" else "gate_up_proj"
        return f"{m[1]}.{stacked}", (int(m[2]), m[3])
    m = _LAYER_OR_NORM_KEY.fullmatch(key)
    if m:
        return m[1], _ALL
    return None


def _listing(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


# ============================================================================================== import
def _keep_fp32(name: str) -> bool:
    return name.endswith("mlp.gate.weight")  # the router, fp32 like transformers' _keep_in_fp32_modules_strict


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """The backbone, constructed directly in ``dtype`` on ``device``, to be overwritten by the checkpoint.

    Constructed for real rather than on the meta device, so nothing relies on ``to_empty`` +
    ``init_weights`` restoring derived buffers (the MoE gradient mask itself lives in the forward and
    would survive either way). Construction is cheap: the routed experts
    (most of the parameters) and the vocabulary are ``torch.empty``; only the attention / dense / shared
    weights get a throw-away default init. ``torch.set_default_dtype(dtype)`` makes every parameter
    that is not explicitly typed (the router is fp32 by construction) ``dtype`` from the start, so no
    fp32 copy of the model is ever held."""
    from .model import DeepOmniModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DeepOmniModel(cfg, with_speech_input=False)
    finally:
        torch.set_default_dtype(previous)
    return model


def _checkpoint_files(path: Path) -> list[Path]:
    if not path.is_dir():
        raise FileNotFoundError(f"HF checkpoint directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {str(path)!r}")
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        listed = set(json.loads(index.read_text()).get("weight_map", {}).values())
        absent = sorted(f for f in listed if not (path / f).is_file())
        if absent:
            raise FileNotFoundError(f"shards listed in {index.name} are missing from {str(path)!r}: {absent}")
    if not files:
        other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {other}: convert them to safetensors first)" if other else ""
        raise FileNotFoundError(f"no *.safetensors files in {str(path)!r}{hint}")
    return files


@torch.no_grad()
def _init_new_rows(table: torch.Tensor, n_old: int, how: NewRowInit, std: float, gen: torch.Generator) -> None:
    n_new = table.shape[0] - n_old
    if n_new <= 0:
        return
    z = torch.randn(n_new, table.shape[1], generator=gen, dtype=torch.float32)
    if how == "normal":
        table[n_old:].copy_(z * std)
        return
    if how != "mean":
        raise ValueError(f"new_row_init must be 'mean' or 'normal', got {how!r}")
    # mean / std over the text rows, in fp32 chunks (the table may be large and low precision)
    s1 = torch.zeros(table.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    for chunk in table[:n_old].split(8192):
        c = chunk.to("cpu", torch.float64)
        s1 += c.sum(0)
        s2 += (c * c).sum(0)
    mu = s1 / n_old
    sigma = (s2 / n_old - mu * mu).clamp_min(0).sqrt()
    table[n_old:].copy_((mu.float() + NEW_ROW_NOISE * sigma.float() * z).to(table.device))


@torch.no_grad()
def import_hf(
    path: str | os.PathLike,
    base: ModelConfig | None = None,
    with_speech_input: bool = False,
    dtype: torch.dtype = torch.float32,
    *,
    device: torch.device | str = "cpu",
    new_row_init: NewRowInit = "mean",
    seed: int = 0,
    **overrides: Any,
) -> DeepOmniModel:
    """A DeepOmniModel from a local HF DeepSeek-V2 checkpoint directory (config.json + *.safetensors).

    The config comes from :func:`config_from_hf` (``base`` / ``overrides`` give the channel and speech
    fields). Every checkpoint tensor is loaded into the backbone; the vocabulary rows the checkpoint lacks
    (text specials, codec blocks) and the speech projector get a fresh init (see the module doc). The
    speech encoder, when ``with_speech_input``, comes from ``cfg.speech_encoder`` as usual."""
    from safetensors import safe_open

    from .speech import SpeechInput

    path = Path(path)
    files = _checkpoint_files(path)
    cfg = config_from_hf(path, base=base, **overrides)
    model = _empty_model(cfg, dtype, device)
    V = cfg.text_vocab_size

    params = dict(model.named_parameters())
    todo = {name: set(_units(name, p)) for name, p in params.items()}
    unexpected, twice, bad_shape = [], [], []
    tied_lm_head = None
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if _IGNORED_HF_KEYS.search(key):
                    continue
                target = our_name(key)
                if target is not None and target[0] == "embed.head_weight" and cfg.tie_word_embeddings:
                    tied_lm_head = f.get_tensor(key)  # a tied checkpoint storing lm_head anyway: checked below
                    continue
                if target is None or target[0] not in params:
                    unexpected.append(f"{key} ({file.name})")
                    continue
                name, unit = target
                p = params[name]
                # _ALL: a 1:1 tensor, or a stacked expert tensor filling every expert at once
                units = _units(name, p) if unit == _ALL else [unit]
                index = () if unit == _ALL else _index(unit, p, V)
                expect = p[index].shape
                if any(u not in todo[name] for u in units):
                    twice.append(key)
                    continue
                t = f.get_tensor(key)
                if t.shape != expect:
                    bad_shape.append(f"{key}: checkpoint {tuple(t.shape)}, model {tuple(expect)} ({name})")
                    continue
                p[index].copy_(t)
                todo[name].difference_update(units)
                del t

    missing = [hf_name(name, u) for name, us in todo.items() for u in sorted(us, key=str)]
    if tied_lm_head is not None and "embed.weight" in todo and not todo["embed.weight"]:
        if not torch.equal(tied_lm_head.to(model.embed.weight.dtype), model.embed.weight[:V].cpu()):
            bad_shape.append("lm_head.weight: tie_word_embeddings=True but it differs from embed_tokens")
    if unexpected or missing or twice or bad_shape:
        parts = [f"checkpoint {str(path)!r} does not match the model built from its config.json:"]
        if missing:
            parts.append(_listing("model tensors not in the checkpoint", missing))
        if unexpected:
            parts.append(_listing("checkpoint tensors with no place in the model", unexpected))
        if twice:
            parts.append(_listing("checkpoint tensors filling a part already filled (two layouts?)", twice))
        if bad_shape:
            parts.append(_listing("shape / content mismatches", bad_shape))
        raise ValueError("\n".join(parts))

    gen = torch.Generator().manual_seed(seed)
    _init_new_rows(model.embed.weight, V, new_row_init, cfg.initializer_range, gen)
    if model.embed.head_weight is not None:
        _init_new_rows(model.embed.head_weight, V, new_row_init, cfg.initializer_range, gen)
    if with_speech_input:
        speech = SpeechInput(cfg.speech_encoder, cfg.hidden_size)
        for n, p in speech.projector.named_parameters():  # as DeepOmniModel.init_weights
            fresh = torch.randn(p.shape, generator=gen) * cfg.initializer_range
            p.copy_(torch.zeros_like(p) if n.endswith("bias") else fresh)
        model.speech = speech.to(device=device, dtype=dtype)
    return model


# ============================================================================================== export
ExpertLayout = Literal["per_expert", "stacked"]


def iter_hf_tensors(
    model: nn.Module, expert_layout: ExpertLayout = "per_expert", dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, CPU tensor)`` for every backbone tensor of ``model`` (text rows of the vocabulary only),
    one at a time. Parameters outside the HF backbone (``speech.*``) are skipped; anything else without an
    HF name is an error. Every yielded tensor owns its storage (safetensors refuses shared storage)."""
    cfg = model.cfg
    V = cfg.text_vocab_size
    known = {n for n, _ in model.named_parameters()}
    extra = [n for n in model.state_dict() if n not in known and not n.startswith(_NOT_IN_HF)]
    if extra:
        raise ValueError(f"model state has tensors the HF export does not know: {extra}")

    for name, p in model.named_parameters():
        if name.startswith(_NOT_IN_HF):
            continue
        full = p.detach()
        if hasattr(full, "full_tensor"):  # a DTensor (FSDP / TP sharded): gathered one parameter at a time
            full = full.full_tensor()
        units = _units(name, full)
        if isinstance(units[0], tuple) and full.shape[0] != cfg.n_routed_experts:
            raise ValueError(f"{name} holds {full.shape[0]} of {cfg.n_routed_experts} experts (expert parallel?): "
                             "export from a model with all experts")
        dt = torch.float32 if _keep_fp32(name) else (dtype or full.dtype)

        def own(t: torch.Tensor) -> torch.Tensor:
            return t.to("cpu", dt, copy=True, memory_format=torch.contiguous_format)

        if units == [None]:
            yield hf_name(name), own(full)
        elif units == ["text"]:
            yield hf_name(name), own(full[:V])
        elif expert_layout == "stacked":
            yield hf_name(name), own(full)
        elif expert_layout == "per_expert":
            for u in units:
                yield hf_name(name, u), own(full[_index(u, full, V)])
        else:
            raise ValueError(f"expert_layout must be 'per_expert' or 'stacked', got {expert_layout!r}")


def export_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    expert_layout: ExpertLayout = "per_expert",
    max_shard_bytes: int = 5 * 2**30,
    **config_extra: Any,
) -> Path:
    """Write the text backbone of ``model`` as an HF DeepSeek-V2 checkpoint that
    ``transformers.DeepseekV2ForCausalLM.from_pretrained(out_dir)`` loads.

    ``config.json`` has our sizes with ``vocab_size = text_vocab_size`` (the text specials and codec rows are
    dropped) and our ``tie_word_embeddings``; ``config_extra`` adds DeepseekV2Config fields (e.g.
    ``bos_token_id``). Weights are written in shards of at most ``max_shard_bytes`` (one
    ``model.safetensors`` if they fit, else ``model-0000i-of-0000N.safetensors`` + index), cast to ``dtype``
    if given (the router stays fp32)."""
    from safetensors.torch import save_file
    from transformers import DeepseekV2Config

    cfg: ModelConfig = model.cfg
    if cfg.norm_topk_prob:
        warnings.warn(
            "exporting norm_topk_prob=True: transformers' DeepseekV2 ignores it (see config_from_hf)", stacklevel=2
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a stale shard would be loaded alongside the new ones

    fields = hf_config_dict(cfg, **config_extra)
    fields.pop("model_type")  # a class attribute of DeepseekV2Config
    hf_cfg = DeepseekV2Config(**fields)
    hf_cfg.dtype = dtype or model.embed.weight.dtype
    hf_cfg.save_pretrained(out)

    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            tmp = out / f"shard-{len(shards):05d}.tmp.safetensors"
            save_file(shard, str(tmp), metadata={"format": "pt"})
            shards.append(list(shard))
            shard, size = {}, 0

    for key, t in iter_hf_tensors(model, expert_layout, dtype):
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[key] = t
        size += nbytes
        total += nbytes
    flush()

    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(names):
        (out / f"shard-{i:05d}.tmp.safetensors").rename(out / name)
    if n > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: names[i] for i, keys in enumerate(shards) for k in keys},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return out


__all__ = ["config_from_hf", "export_hf", "hf_config_dict", "hf_name", "import_hf", "iter_hf_tensors", "our_name"]
