"""Hugging Face <-> DeepOmni for DeepSeek-V2-family checkpoints (docs/hf.md).

    config_map   ModelConfig <-> DeepseekV2Config: one field table read both ways
    state_dict   HF tensor names <-> ours: one name table (vocabulary rows, stacked experts), strict loading
    io           the files: import_hf (a local HF safetensors directory -> DeepOmniModel), export_hf
    tokenizer    our text tokenizers (bytes, hf:<dir>) as a transformers tokenizer with our specials

Exporting a checkpoint directory (with tokenizer and generation config), the lm-evaluation-harness task and
``deepomni export-hf`` read checkpoints and prepared data, so they live above the model, in
:mod:`deepomni.hf`. The public API is re-exported here, imported on first use so that ``deepomni --help``
does not pull in torch: ``from deepomni.model.hf import import_hf, export_hf``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOME = {
    "config_from_hf": "config_map",
    "hf_config_dict": "config_map",
    "hf_name": "state_dict",
    "our_name": "state_dict",
    "iter_hf_tensors": "state_dict",
    "import_hf": "io",
    "export_hf": "io",
    "hf_tokenizer": "tokenizer",
}
__all__ = sorted(_HOME)

if TYPE_CHECKING:
    from .config_map import config_from_hf, hf_config_dict
    from .io import export_hf, import_hf
    from .state_dict import hf_name, iter_hf_tensors, our_name
    from .tokenizer import hf_tokenizer


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
