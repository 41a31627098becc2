"""Hugging Face <-> DeepOmni for DeepSeek-V2-family checkpoints (docs/hf.md).

    config_map   ModelConfig <-> DeepseekV2Config: one field table read both ways
    state_dict   HF tensor names <-> ours: one name table (vocabulary rows, stacked experts), strict loading
    io           the files: import_hf (a local HF safetensors directory -> DeepOmniModel), export_hf
    tokenizer    our text tokenizers (bytes, hf:<dir>) as a transformers tokenizer with our specials
    export       export_hf_model: weights + config + tokenizer + generation_config.json, loadable offline
    lm_eval      our held-out text QA items as a local lm-evaluation-harness task
    cli          ``deepomni export-hf``

The public API is re-exported here, imported on first use so that ``deepomni.model.hf.cli`` (and with it
``deepomni --help``) does not pull in torch: ``from deepomni.model.hf import import_hf, export_hf_model``.
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
    "export_checkpoint": "export",
    "export_hf_model": "export",
    "hf_generation_config": "export",
    "recorded_tokenizer": "export",
    "write_lm_eval_task": "lm_eval",
    "write_text_qa_task": "lm_eval",
}
__all__ = sorted(_HOME)

if TYPE_CHECKING:
    from .config_map import config_from_hf, hf_config_dict
    from .export import export_checkpoint, export_hf_model, hf_generation_config, recorded_tokenizer
    from .io import export_hf, import_hf
    from .lm_eval import write_lm_eval_task, write_text_qa_task
    from .state_dict import hf_name, iter_hf_tensors, our_name
    from .tokenizer import hf_tokenizer


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
