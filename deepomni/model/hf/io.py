"""HF checkpoint files: :func:`import_hf` reads a local DeepSeek-V2 safetensors directory into a
:class:`~deepomni.model.model.DeepOmniModel`; :func:`export_hf` writes a model's text backbone as one.

The names and the vocabulary handling are ``state_dict``'s, the config fields ``config_map``'s; this module
only finds, opens and writes files. Import builds the model directly in ``dtype`` (not on the meta device:
see :func:`_empty_model`) and fills it one checkpoint tensor at a time from memory-mapped safetensors, so
peak memory is one model plus one tensor; the router weights stay fp32 whatever ``dtype`` (as
transformers keeps ``gate.weight``). Rows the checkpoint lacks (text specials, codec blocks) get a fresh
init (:func:`~deepomni.model.hf.state_dict.init_new_rows`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ...config import ModelConfig
from ...weights import DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, write_safetensors
from .config_map import config_from_hf, hf_config_dict, hf_vocab_rows, load_hf_config_dict
from .state_dict import ExpertLayout, HFTensor, fill_from_hf, init_new_rows, iter_hf_tensors

if TYPE_CHECKING:
    from ..model import DeepOmniModel

NewRowInit = Literal["mean", "normal"]


# ============================================================================================== import
def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """The backbone, constructed directly in ``dtype`` on ``device``, to be overwritten by the checkpoint.

    Constructed for real rather than on the meta device, so nothing relies on ``to_empty`` +
    ``init_weights`` restoring derived buffers. Construction is cheap: the routed experts (most of the
    parameters) and the vocabulary are ``torch.empty``; only the attention / dense / shared weights get a
    throw-away default init. ``torch.set_default_dtype(dtype)`` makes every parameter that is not explicitly
    typed (the router is fp32 by construction) ``dtype`` from the start, so no fp32 copy is ever held."""
    from ..model import DeepOmniModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DeepOmniModel(cfg, with_speech_input=False)
    finally:
        torch.set_default_dtype(previous)
    return model


def checkpoint_files(path: Path) -> list[Path]:
    """The ``*.safetensors`` files of an HF checkpoint directory; clear errors for what is missing."""
    if not path.is_dir():
        raise FileNotFoundError(f"HF checkpoint directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {str(path)!r}")
    files = sorted(path.glob("*.safetensors"))
    index = path / INDEX_FILE
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


def _read_tensors(files: list[Path]) -> Iterator[HFTensor]:
    """Every tensor of ``files`` as ``(name, file name, lazy getter)``, memory-mapped one file at a time."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, file.name, lambda f=f, key=key: f.get_tensor(key)


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

    The config comes from :func:`~deepomni.model.hf.config_map.config_from_hf` (``base`` / ``overrides``
    give the channel and speech fields). Every checkpoint tensor is loaded into the backbone (strictly:
    anything missing, unexpected, duplicated or mis-shaped is a ``ValueError`` naming it); the vocabulary
    rows the checkpoint lacks (text specials, codec blocks) and the speech projector get a fresh init
    (``new_row_init``: ``"mean"`` of the text rows plus 10% noise, or ``"normal"``). The speech encoder,
    when ``with_speech_input``, comes from ``cfg.speech_encoder`` as usual."""
    from ..speech import SpeechInput

    path = Path(path)
    files = checkpoint_files(path)
    cfg = config_from_hf(path, base=base, **overrides)
    rows = hf_vocab_rows(load_hf_config_dict(path), cfg)
    model = _empty_model(cfg, dtype, device)
    fill_from_hf(model, _read_tensors(files), rows, source=f"checkpoint {str(path)!r}")

    gen = torch.Generator().manual_seed(seed)
    V = cfg.text_vocab_size
    init_new_rows(model.embed.weight, V, rows, new_row_init, cfg.initializer_range, gen)
    if model.embed.head_weight is not None:
        init_new_rows(model.embed.head_weight, V, rows, new_row_init, cfg.initializer_range, gen)
    if with_speech_input:
        speech = SpeechInput(cfg.speech_encoder, cfg.hidden_size)
        for n, p in speech.projector.named_parameters():  # as DeepOmniModel.init_weights
            fresh = torch.randn(p.shape, generator=gen) * cfg.initializer_range
            p.copy_(torch.zeros_like(p) if n.endswith("bias") else fresh)
        model.speech = speech.to(device=device, dtype=dtype)
    return model


# ============================================================================================== export
def export_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    expert_layout: ExpertLayout = "per_expert",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    text_specials: bool = False,
    **config_extra: Any,
) -> Path:
    """Write the text backbone of ``model`` as an HF DeepSeek-V2 checkpoint that
    ``transformers.DeepseekV2ForCausalLM.from_pretrained(out_dir)`` loads.

    ``config.json`` has our sizes with ``vocab_size = text_vocab_size`` (the text specials and codec rows are
    dropped) or, with ``text_specials``, the text vocabulary and its 64 specials (the text channel as our
    model reads it; :func:`import_hf` maps it back), and our ``tie_word_embeddings``; ``config_extra`` adds
    DeepseekV2Config fields (e.g. ``bos_token_id``). Weights are written in shards of at most
    ``max_shard_bytes`` (one ``model.safetensors`` if they fit, else ``model-0000i-of-0000N.safetensors`` +
    index), cast to ``dtype`` if given (the router stays fp32). Stale shards in ``out_dir`` are removed."""
    from transformers import DeepseekV2Config

    cfg: ModelConfig = model.cfg
    if cfg.norm_topk_prob:
        warnings.warn(
            "exporting norm_topk_prob=True: transformers' DeepseekV2 ignores it (see config_from_hf)", stacklevel=2
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields = hf_config_dict(cfg, text_specials=text_specials, **config_extra)
    fields.pop("model_type")  # a class attribute of DeepseekV2Config
    hf_cfg = DeepseekV2Config(**fields)
    hf_cfg.dtype = dtype or model.embed.weight.dtype
    hf_cfg.save_pretrained(out)

    write_safetensors(iter_hf_tensors(model, expert_layout, dtype, text_specials=text_specials), out,
                      max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    return out


__all__ = ["NewRowInit", "checkpoint_files", "export_hf", "import_hf"]
