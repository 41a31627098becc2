"""One typed configuration system: every config is a dataclass, loaded by :func:`load_config`.

    load_config(TrainConfig, "tiny", {"lr": "1e-3"})      # a preset name, a JSON/YAML file or a dict,
                                                           # then overrides (None values skipped)

:func:`load_config` refuses unknown keys and converts and checks every value from the type hints
(pydantic validates the dataclass: ``"20"`` becomes ``20.0`` for a ``float``, ``"abc"`` is refused with a
message naming the field); a config's own checks run in its ``__post_init__``. Presets ship in the
package, one folder per kind: ``deepomni/presets/{model,train,data,eval,serve}/<name>.json``
(:func:`list_presets`). Command-line flags are derived from the same dataclasses by :func:`add_flags`
(one flag per field, its help taken from the field's comment) and read back by :func:`flag_values`.

The model's own configs (:class:`ModelConfig`, :class:`SpeechEncoderConfig`) and :class:`DataConfig` live
here; the others beside the code they configure (``deepomni.train.config``: TrainConfig, ProfileConfig,
EvalConfig, EncoderPretrainConfig; ``deepomni.train.recipe.PipelineConfig``,
``deepomni.serve.config.AppConfig``, ``deepomni.data.synth.SynthConfig``, ...; docs/config.md lists them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import pydantic

RoutingMode = Literal["all", "speech", "text", "extend"]
T = TypeVar("T")
PRESETS_DIR = "presets"


class ConfigError(ValueError):
    """A config that cannot be loaded: unknown keys, wrong types or values; the message names the fields."""


def configclass(kind: str | None = None):
    """Class decorator: a dataclass that :func:`load_config` validates strictly (unknown keys refused);
    ``kind`` names its preset folder under ``deepomni/presets/`` (None: no presets)."""

    def wrap(cls: type[T]) -> type[T]:
        cls = dataclasses.dataclass(cls)
        cls.__pydantic_config__ = pydantic.ConfigDict(extra="forbid")
        cls.preset_kind = kind  # a plain class attribute (no annotation): not a field
        return cls

    return wrap


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def _describe(err: dict, cls: type) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    where = f"{loc}: " if loc else ""
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{where}unknown field"
    if err["type"] == "value_error":  # raised by __post_init__
        return where + err["msg"].removeprefix("Value error, ")
    return f"{where}{err['msg']} (got {err['input']!r})"


def parse_config(cls: type[T], values: Mapping[str, Any]) -> T:
    """``cls`` from a mapping, every value converted and checked from the type hints."""
    try:
        return _adapter(cls).validate_python(dict(values))
    except pydantic.ValidationError as e:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        errors = "; ".join(_describe(err, cls) for err in e.errors())
        hint = f" (fields: {known})" if "unknown field" in errors else ""
        raise ConfigError(f"{cls.__name__}: {errors}{hint}") from None


def list_presets(kind: str = "model") -> list[str]:
    folder = resources.files("deepomni").joinpath(PRESETS_DIR).joinpath(kind)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json")) if folder.is_dir() else []


def read_config_source(source: str | Path | Mapping[str, Any] | None, kind: str | None) -> dict[str, Any]:
    """The raw mapping of a preset name, a ``.json`` / ``.yaml`` file, or a mapping (None: empty)."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.suffix in (".json", ".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(path.read_text())
        else:
            d = json.loads(path.read_text())
    else:
        res = resources.files("deepomni").joinpath(PRESETS_DIR).joinpath(kind or "-").joinpath(f"{source}.json")
        if kind is None or not res.is_file():
            raise ConfigError(f"unknown {kind or ''} preset {str(source)!r}; available: "
                              f"{', '.join(list_presets(kind)) if kind else 'none'} (or a .json/.yaml file)")
        d = json.loads(res.read_text())
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: a config file holds one mapping of field names to values")
    return d


def load_config(cls: type[T], source: str | Path | Mapping[str, Any] | None = None,
                overrides: Mapping[str, Any] | None = None) -> T:
    """``cls`` from a preset name (``deepomni/presets/<kind>/``), a JSON/YAML file or a mapping, then
    ``overrides`` (keys with None values are skipped: "not given")."""
    d = read_config_source(source, getattr(cls, "preset_kind", None))
    d.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_config(cls, d)


# ------------------------------------------------------------------------------------ command-line flags
def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_mapping(text: str) -> dict[str, Any]:
    """A mapping flag: JSON (``{"asr": 0.3}``) or ``name=value[,name=value...]`` (values checked by the config)."""
    if text.lstrip().startswith("{"):
        return json.loads(text)
    try:
        return {k.strip(): v.strip() for k, v in (part.split("=") for part in text.split(",") if part.strip())}
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected name=value[,name=value...] or JSON, got {text!r}") from e


def _unwrap_optional(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None -> X
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def flag_type(hint):
    """The argparse ``type`` of a flag derived from a config field's type hint: ``float | None`` -> float,
    bool -> true/false, dicts -> ``a=1,b=2`` or JSON, other composite types -> JSON. A wrong value is then an argparse
    error naming the flag, not a TypeError deep in a job."""
    base = _unwrap_optional(hint)
    if base is bool:
        return parse_bool
    if typing.get_origin(base) is Literal:
        return str
    if typing.get_origin(base) is dict:
        return parse_mapping
    return base if base in (int, float, str) else json.loads


def _flag_kwargs(hint) -> dict[str, Any]:
    """argparse keywords for one field: a bool flag alone means true; tuples take several values; literals
    list their choices."""
    base = _unwrap_optional(hint)
    if base is bool:
        return {"type": parse_bool, "nargs": "?", "const": True, "metavar": "BOOL"}
    if typing.get_origin(base) is Literal:
        return {"type": str, "choices": [str(a) for a in typing.get_args(base)]}
    if typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": flag_type(args[0]), "nargs": "+"}
        if args and len(set(args)) == 1:
            return {"type": flag_type(args[0]), "nargs": len(args)}
    return {"type": flag_type(hint)}


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source (the ``# ...`` after it, or the comment lines above it)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        m = re.match(r"\s+(\w+)\s*:[^#]*(?:#\s*(.*))?$", line)
        if m and not stripped.startswith(("def ", "@")):
            text = " ".join(x for x in ([m.group(2)] if m.group(2) else []) + above if x)
            if text and m.group(1) not in out:
                out[m.group(1)] = text
        above = []
    return out


def add_flags(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = (),
              title: str | None = None) -> None:
    """One ``--field-name`` flag per field of ``cls`` (default None: "not given", the config's own value
    applies); the help text is the field's comment and its default."""
    group = parser.add_argument_group(title or f"{cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown = "<hidden>" if not f.repr else default
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                           help=f"{comments.get(f.name, '')} (default {shown})".strip().replace("%", "%%"),
                           **_flag_kwargs(hints[f.name]))


def flag_values(args: argparse.Namespace, cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (what :func:`add_flags` registered)."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if f.name not in exclude and v is not None:
            out[f.name] = tuple(v) if isinstance(v, list) else v
    return out


@configclass()
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
    # what the frozen encoder reads: "full" pads every utterance to its window (max_source_positions), as
    # Whisper was trained; "utterance" encodes each utterance's own frames only (an encoder pretrained on
    # cut windows, like the shipped foundations': the same features for the valid frames, a fraction of the
    # cost for short questions, and independent of what else is in the batch: a batch is encoded in buckets
    # of similar lengths, the padding masked, deepomni.model.speech.encode_frames)
    window: Literal["full", "utterance"] = "full"
    # how many backbone positions an utterance fills: "frames", one per ``downsample`` encoder frames (20 ms
    # each: about 1.5 positions a character at 2); "ctc", one per character the encoder's CTC head hears
    # (greedy CTC segments, each the mean of its frames: the rate of the text the backbone reads, ~0.9 a
    # character), and the projector starts from the backbone's own embeddings of those characters
    # (deepomni.model.speech.CharProjector). "ctc" needs a CTC-pretrained encoder directory: ctc_head.safetensors
    # and ctc_vocab.json beside it, as ``deepomni foundations build`` writes them
    positions: Literal["frames", "ctc"] = "frames"


@configclass("model")
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
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        return parse_config(cls, d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)  # __post_init__ checks the result

    def __post_init__(self) -> None:
        self.validate()

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


@configclass("data")
class DataConfig:
    """Preprocessing: raw items (audio bytes) -> tokenized sequences (``deepomni data prepare``)."""

    preset: str = "tiny"  # model preset (or JSON path) whose channel layout and encoder the data is built for
    tokenizer: str = "bytes"  # "bytes" | "hf:<dir>" (see deepomni.text)
    # "builtin": fit the built-in codec on the train split's speech answers and save it with the data;
    # "builtin:<dir>" / "snac:<dir>": a saved codec (its K and codebook must match the preset)
    codec: str = "builtin"
    codec_fit_items: int = 200  # answers used to fit the built-in codec
    # the built-in codec's frame, a multiple of its 10 ms mel hop. 40 ms (25 Hz): with one byte of text a
    # step, espeak's ~16 characters a second are 0.66 a frame, so the text channel leads the speech it
    # paces; at 80 ms (12.5 Hz, SNAC's coarse rate) it is 1.3, and speech overtakes the text it should
    # voice (docs/paper.md "Speech output")
    codec_frame_ms: int = 40
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


def load_preset(name_or_path: str | Path) -> ModelConfig:
    """A model preset by name (``tiny``, ``deepseek-v2-lite``) or a ModelConfig JSON file (a relative
    ``speech_encoder.path`` in a file is relative to that file's directory)."""
    cfg = load_config(ModelConfig, name_or_path)
    path = Path(name_or_path)
    return with_encoder_path_from(cfg, path.parent) if path.is_file() else cfg


def with_encoder_path_from(cfg: ModelConfig, directory: str | Path) -> ModelConfig:
    """``cfg`` with a relative ``speech_encoder.path`` resolved against ``directory`` (a config file's or
    a checkpoint's: a foundation set's base/ names its encoder as ``../encoder``)."""
    enc = cfg.speech_encoder
    if not enc.path or Path(enc.path).is_absolute():
        return cfg
    return cfg.replace(speech_encoder=dataclasses.replace(enc, path=str((Path(directory) / enc.path).resolve())))
