"""ModelConfig <-> transformers ``DeepseekV2Config``: one field table read in both directions.

:data:`FIELDS` pairs each backbone field of ours with its DeepseekV2Config key (and the value an HF config
that lacks the key means); :data:`FIXED` lists the DeepseekV2Config keys we do not map but write with a
fixed value and refuse other values of on import. Two relations are explicit converters rather than rows:
RoPE (our ``rope_theta`` + ``rope_scaling`` <-> transformers-5 ``rope_parameters``, or the legacy
``rope_theta`` + ``rope_scaling`` pair of DeepSeek's own config.json) and the vocabulary (an export that
keeps the 64 text specials records our text vocabulary size as ``deepomni_text_vocab_size``).
:func:`config_from_hf` and :func:`hf_config_dict` are both derived from these, so they stay inverses.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import ModelConfig

_REQUIRED = object()  # the HF config must have the key
_FROM_BASE = object()  # absent from the HF config: keep the base config's value


@dataclass(frozen=True)
class Field:
    """One ModelConfig field and its DeepseekV2Config key (same name unless ``hf`` says otherwise)."""

    ours: str
    hf: str = ""
    default: Any = _REQUIRED  # what an absent or null HF value means on import

    @property
    def key(self) -> str:
        return self.hf or self.ours


FIELDS: tuple[Field, ...] = (
    Field("hidden_size"),
    Field("num_hidden_layers"),
    Field("intermediate_size"),
    Field("moe_intermediate_size"),
    Field("n_routed_experts"),
    Field("n_shared_experts", default=0),
    Field("num_experts_per_tok"),
    Field("first_k_dense_replace", default=0),
    Field("norm_topk_prob", default=False),
    Field("routed_scaling_factor", default=1.0),
    Field("aux_loss_alpha", default=_FROM_BASE),  # not a DeepseekV2Config field; DeepSeek's config.json has it
    Field("num_attention_heads"),
    Field("q_lora_rank", default=None),
    Field("kv_lora_rank"),
    Field("qk_nope_head_dim"),
    Field("qk_rope_head_dim"),
    Field("v_head_dim"),
    Field("rms_norm_eps", default=1e-6),
    Field("max_position_embeddings"),
    Field("initializer_range", default=_FROM_BASE),
    Field("text_vocab_size", hf="vocab_size"),  # see _vocab_to_hf / _text_vocab_from_hf for the specials
    Field("tie_word_embeddings", default=False),  # DeepseekV2Config's default
)


@dataclass(frozen=True)
class Fixed:
    """A DeepseekV2Config key with one value here: written on export; on import an absent key means
    ``value`` and anything outside ``value`` / ``accepted`` is refused with ``why`` (no check if empty)."""

    key: str
    value: Any
    why: str = ""
    accepted: tuple[Any, ...] = ()
    exported: bool = True


FIXED: tuple[Fixed, ...] = (
    Fixed("architectures", ["DeepseekV2ForCausalLM"]),
    Fixed("model_type", "deepseek_v2", "only DeepSeek-V2 checkpoints"),
    Fixed("hidden_act", "silu", "SwiGLU with silu only"),
    Fixed("attention_bias", False, "MLA projections have no bias here", accepted=(None,)),
    Fixed("mlp_bias", False, "MLPs have no bias here", accepted=(None,)),
    Fixed("topk_method", "greedy", accepted=(None,),
          why="only greedy top-k routing (group-limited routing, e.g. DeepSeek-V2 236B, is not implemented)"),
    Fixed("n_group", None),  # unused by greedy routing (DeepSeek-V2-Lite's config.json says 1)
    Fixed("topk_group", None),
    Fixed("scoring_func", "softmax", "softmax router scores only", exported=False),
    Fixed("moe_layer_freq", 1, "every layer after first_k_dense_replace is MoE", exported=False),
)

TEXT_VOCAB_KEY = "deepomni_text_vocab_size"  # written by an export that keeps the text specials
_ROPE_META_KEYS = ("rope_theta", "rope_type", "type")


# ================================================================================= special converters
def _rope_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    """``rope_theta`` / ``rope_scaling`` from transformers-5 ``rope_parameters`` or the legacy ``rope_theta`` +
    ``rope_scaling`` pair (DeepSeek-V2-Lite's config.json). Our ``rope_scaling`` keeps the scaling keys with
    ``"type"`` naming the kind, as the ``deepseek-v2-lite`` preset; ``None`` for plain RoPE."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported (DeepSeek-V2 has one RoPE)")
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if kind != "yarn":
        raise ValueError(f"unsupported RoPE type {kind!r}: the importer handles plain RoPE and 'yarn'")
    scaling = {"type": kind}
    scaling.update({k: v for k, v in params.items() if k not in _ROPE_META_KEYS})
    return {"rope_theta": theta, "rope_scaling": scaling}


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling:
        params = dict(cfg.rope_scaling)
        out["rope_type"] = params.pop("rope_type", params.pop("type", "default"))
        params.pop("type", None)
        out.update(params)
    return {"rope_parameters": out}


def _vocab_to_hf(cfg: ModelConfig, text_specials: bool) -> dict[str, Any]:
    if not text_specials:
        return {"vocab_size": cfg.text_vocab_size}
    return {"vocab_size": cfg.text_vocab_size + cfg.num_special_tokens, TEXT_VOCAB_KEY: cfg.text_vocab_size}


def hf_vocab_rows(d: Mapping[str, Any], cfg: ModelConfig) -> int:
    """How many rows of our text channel an HF checkpoint with config ``d`` fills: the text vocabulary, or
    the text vocabulary and its specials (an export with ``text_specials``). Raises if neither."""
    rows = int(d["vocab_size"])
    if rows not in (cfg.text_vocab_size, cfg.text_vocab_size + cfg.num_special_tokens):
        raise ValueError(f"HF vocab_size={rows} is neither text_vocab_size={cfg.text_vocab_size} nor that plus "
                         f"num_special_tokens={cfg.num_special_tokens}")
    return rows


# ============================================================================================ import
def load_hf_config_dict(hf: str | os.PathLike | Mapping[str, Any] | Any) -> dict[str, Any]:
    """The HF config as a dict: from a directory, a config.json path, a dict or a config object."""
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


def _check_supported(d: Mapping[str, Any]) -> None:
    problems = [f"{f.key}={d.get(f.key)!r}: {f.why}" for f in FIXED
                if f.why and d.get(f.key, f.value) not in (f.value, *f.accepted)]
    if not isinstance(d.get("n_routed_experts", 64), int):
        problems.append(f"n_routed_experts={d.get('n_routed_experts')!r}: an all-dense model is not supported")
    kv, heads = d.get("num_key_value_heads"), d.get("num_attention_heads", 32)
    if kv not in (None, heads):
        problems.append(f"num_key_value_heads={kv!r}: MLA has one KV head per query head")
    if problems:
        raise ValueError("unsupported DeepSeek-V2 config: " + "; ".join(problems))
    if d.get("norm_topk_prob") and float(d.get("routed_scaling_factor", 1.0)) != 1.0:
        raise ValueError(
            "norm_topk_prob=True with routed_scaling_factor != 1 is ambiguous across implementations "
            "(the original DeepSeek-V2 code scales only unnormalised weights, ours always scales); not supported"
        )


def _field_from_hf(f: Field, d: Mapping[str, Any], base: ModelConfig) -> Any:
    value = d.get(f.key)
    if value is not None:
        return value
    if f.default is _REQUIRED:
        raise ValueError(f"the HF config has no {f.key!r} (needed for ModelConfig.{f.ours})")
    return getattr(base, f.ours) if f.default is _FROM_BASE else f.default


def config_from_hf(
    hf: str | os.PathLike | Mapping[str, Any] | Any, base: ModelConfig | None = None, **overrides: Any
) -> ModelConfig:
    """A ModelConfig for an HF DeepSeek-V2 config (directory, config.json path, dict or config object).

    Backbone fields come from the HF config; the rest (channels, speech encoder, MoE kernel) from ``base``
    (``ModelConfig()`` defaults when None); ``overrides`` win over both. Raises ``ValueError`` for features
    this backbone does not implement and for unknown or ill-typed fields."""
    d = load_hf_config_dict(hf)
    _check_supported(d)
    base = base if base is not None else ModelConfig()
    mapped = {f.ours: _field_from_hf(f, d, base) for f in FIELDS}
    mapped.update(_rope_from_hf(d))
    if TEXT_VOCAB_KEY in d:
        mapped["text_vocab_size"] = d[TEXT_VOCAB_KEY]
    if d.get("norm_topk_prob"):
        warnings.warn(
            "norm_topk_prob=True: DeepOmni renormalises the top-k router weights (as the original DeepSeek-V2 "
            "code); transformers' DeepseekV2 ignores this flag, so logits will differ from transformers'",
            stacklevel=2,
        )
    # one validation path for every field: types converted and checked, unknown override names refused
    return ModelConfig.from_dict({**base.to_dict(), **mapped, **overrides})


# ============================================================================================ export
def hf_config_dict(cfg: ModelConfig, *, text_specials: bool = False, **extra: Any) -> dict[str, Any]:
    """The DeepseekV2Config fields of our backbone: the text vocabulary only, or with its 64 specials when
    ``text_specials``. ``extra`` adds or overrides any (e.g. ``bos_token_id``). The inverse of
    :func:`config_from_hf` on the backbone fields."""
    d: dict[str, Any] = {f.key: f.value for f in FIXED if f.exported}
    d.update({f.key: getattr(cfg, f.ours) for f in FIELDS})
    d["num_key_value_heads"] = cfg.num_attention_heads
    d.update(_rope_to_hf(cfg))
    d.update(_vocab_to_hf(cfg, text_specials))
    d.update(extra)
    return d


__all__ = ["FIELDS", "FIXED", "Field", "Fixed", "TEXT_VOCAB_KEY", "config_from_hf", "hf_config_dict",
           "hf_vocab_rows", "load_hf_config_dict"]
