"""Typed configuration for DeepOmni models, with presets shipped in the package.

One dataclass per concern; every field that is not obvious carries a comment. Presets are JSON files in
``deepomni/presets/`` (``tiny``, ``deepseek-v2-lite``) and load with :func:`load_preset`.
"""

from __future__ import annotations

import dataclasses
import json
import types
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
import argparse
import typing
from typing import Any, Literal

RoutingMode = Literal["all", "speech", "text"]


@dataclass
class SpeechEncoderConfig:
    """The frozen Whisper-style encoder that reads input speech (16 kHz, 80 mel, 50 Hz after conv stride)."""

    # local directory with a transformers WhisperModel / WhisperEncoder checkpoint; None builds one from
    # the fields below with random weights (tiny preset, tests)
    path: str | None = None
    num_mel_bins: int = 80
    d_model: int = 64
    encoder_layers: int = 2
    encoder_attention_heads: int = 2
    encoder_ffn_dim: int = 128
    max_source_positions: int = 1500  # 30 s of 20 ms frames, as Whisper
    # projector: stack this many consecutive encoder frames before the MLP (1 keeps one position per 20 ms)
    downsample: int = 1


@dataclass
class ModelConfig:
    """A DeepSeek-V2-family MoE backbone extended to K+1 token channels and speech input."""

    # ---- backbone (names follow transformers' DeepseekV2Config so the HF adapter maps 1:1)
    hidden_size: int = 2048
    num_hidden_layers: int = 27
    intermediate_size: int = 10944  # FFN width of the dense layers
    moe_intermediate_size: int = 1408  # FFN width of one routed expert
    n_routed_experts: int = 64
    n_shared_experts: int = 2  # applied to every token as one MLP of width n_shared * moe_intermediate
    num_experts_per_tok: int = 6  # top-k
    first_k_dense_replace: int = 1  # layers [0, k) are dense
    norm_topk_prob: bool = False  # renormalise the top-k weights to sum to 1
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.001  # sequence-level balance loss weight
    num_attention_heads: int = 16
    q_lora_rank: int | None = None  # None: plain q projection (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    # None: plain RoPE; else transformers' rope parameters, e.g. DeepSeek-V2-Lite's
    # {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, ...}
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    text_vocab_size: int = 102400
    # ---- channels: one text channel + K codec channels per position
    num_codec_channels: int = 7  # K (SNAC flattened: 7 per frame)
    codebook_size: int = 4096
    num_special_tokens: int = 64  # reserved after the text block and after every codec block
    # LM head tied to the extended embedding (the paper's layout). False keeps a separate head table of the
    # same layout: needed to import a backbone whose lm_head differs from its embeddings (DeepSeek-V2-Lite)
    tie_word_embeddings: bool = True
    # ---- speech input
    speech_encoder: SpeechEncoderConfig = field(default_factory=SpeechEncoderConfig)
    # ---- MoE kernel: "auto" uses torch's grouped matmul where the device supports it, else a segment loop
    moe_impl: Literal["auto", "grouped_mm", "loop"] = "auto"

    # derived sizes ------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    # serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        if "speech_encoder" in d and isinstance(d["speech_encoder"], dict):
            d["speech_encoder"] = SpeechEncoderConfig(**d["speech_encoder"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> "ModelConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts="
                f"{self.n_routed_experts}]"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError("first_k_dense_replace must be within [0, num_hidden_layers]")
        if self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even (rotary pairs)")
        if self.num_codec_channels < 0:
            raise ValueError("num_codec_channels must be >= 0")


@dataclass
class DataConfig:
    """Preprocessing: raw items (audio bytes) -> tokenized sequences (``deepomni data prepare``)."""

    preset: str = "tiny"  # model preset (or JSON path) whose channel layout and encoder the data is built for
    tokenizer: str = "bytes"  # "bytes" | "hf:<dir>" (see deepomni.text)
    # "builtin": fit the built-in codec on the train split's speech answers and save it with the data;
    # "builtin:<dir>" / "snac:<dir>": a saved codec (its K and codebook must match the preset)
    codec: str = "builtin"
    codec_fit_items: int = 200  # answers used to fit the built-in codec
    max_audio_seconds: float | None = None  # None: the encoder window (max_source_positions * 20 ms)
    batch_size: int = 16  # rows per map_batches call
    feature_actors: int = 1  # actor pool size for log-mel extraction
    codec_actors: int = 1  # actor pool size for codec encoding
    actor_num_cpus: float = 0.5  # fractional CPUs per actor (2-core machines: leave room for the rest)
    # stage actor fault tolerance (Ray's max_restarts / max_task_retries; -1 = unlimited): a killed actor is
    # restarted and its unfinished batches rerun on it; past the limit the run fails (docs/data.md)
    actor_max_restarts: int = 3
    actor_task_retries: int = 3
    rows_per_file: int = 512
    seed: int = 0


PRESETS_DIR = "presets"


def list_presets() -> list[str]:
    files = resources.files("deepomni").joinpath(PRESETS_DIR).iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".json"))


def load_preset(name_or_path: str) -> ModelConfig:
    """Load a preset by name (``tiny``, ``deepseek-v2-lite``) or from a JSON file path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        text = path.read_text()
    else:
        res = resources.files("deepomni").joinpath(PRESETS_DIR).joinpath(f"{name_or_path}.json")
        if not res.is_file():
            raise ValueError(f"unknown preset {name_or_path!r}; available: {', '.join(list_presets())}")
        text = res.read_text()
    return ModelConfig.from_dict(json.loads(text))


# ------------------------------------------------------------------------------------ command-line flags
def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_type(hint):
    """The argparse ``type`` of a flag derived from a config field's type hint: ``float | None`` -> float,
    bool -> true/false, other composite types (tuples, dicts) -> JSON. A wrong value is then an argparse error
    naming the flag, not a TypeError deep in a job."""
    base = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if len(args) == 1 else hint
    if base is bool:
        return parse_bool
    return base if base in (int, float, str) else json.loads
