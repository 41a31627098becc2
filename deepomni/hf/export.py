"""A complete, loadable HF model directory from a DeepOmni model: weights, ``config.json``, the tokenizer
and ``generation_config.json``, so that ``AutoModelForCausalLM``, ``AutoTokenizer`` and ``GenerationConfig``
(and through them lm-evaluation-harness' ``--model hf``) load it offline.

The exported model is our *text channel*: the backbone with the text vocabulary and its 64 specials
(``vocab_size = text_vocab_size + 64``; the codec blocks and the speech input are dropped). A text-only
position embeds as its text row alone (codec channels PAD say nothing), so on text this model is exactly
ours: same logits, and greedy ``generate`` stopping at ``<|eot|>`` is our greedy text decoding
(:func:`deepomni.model.generate.generate` with ``speech=False``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import ModelConfig
from ..model.channels import TextSpecial, VocabLayout
from ..model.hf.io import export_hf
from ..model.hf.state_dict import ExpertLayout
from ..model.hf.tokenizer import hf_tokenizer

if TYPE_CHECKING:
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import PreTrainedTokenizerBase

    from ..model.generate import GenerationConfig
    from ..model.model import DeepOmniModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def special_ids(cfg: ModelConfig) -> dict[str, int]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` as our text channel uses them."""
    lay = VocabLayout.from_config(cfg)
    return {"bos_token_id": lay.text(TextSpecial.BOS), "eos_token_id": lay.text(TextSpecial.EOT),
            "pad_token_id": lay.text(TextSpecial.PAD)}


def hf_generation_config(cfg: ModelConfig, gen: GenerationConfig | None = None) -> HFGenerationConfig:
    """``transformers.GenerationConfig``: our special ids, greedy (the text channel is decoded greedily), at
    most ``gen.max_steps`` new tokens (our default when None). The codec sampling settings do not apply."""
    import transformers

    from ..model.generate import GenerationConfig

    gen = gen or GenerationConfig()
    return transformers.GenerationConfig(**special_ids(cfg), do_sample=False, num_beams=1, max_new_tokens=gen.max_steps)


def tokenizer_for(cfg: ModelConfig, spec: str) -> PreTrainedTokenizerBase:
    """The exported tokenizer of ``spec`` for a model of config ``cfg`` (``deepomni.model.hf.tokenizer``)."""
    return hf_tokenizer(spec, cfg.text_vocab_size, cfg.num_special_tokens, cfg.max_position_embeddings)


def recorded_tokenizer(checkpoint: str | os.PathLike) -> str | None:
    """The tokenizer a checkpoint directory records: ``hf:<checkpoint>`` when a transformers tokenizer is
    saved in it, else None (a DeepOmni checkpoint does not record one by itself)."""
    d = Path(checkpoint)
    return f"hf:{d}" if any((d / f).is_file() for f in TOKENIZER_FILES) else None


def export_hf_model(
    model: DeepOmniModel,
    out_dir: str | os.PathLike,
    tokenizer: str | PreTrainedTokenizerBase = "bytes",
    *,
    dtype: torch.dtype | None = None,
    expert_layout: ExpertLayout = "per_expert",
    max_shard_bytes: int = 5 * 2**30,
    generation: GenerationConfig | None = None,
) -> Path:
    """Write ``model``'s text channel to ``out_dir`` as a directory transformers loads offline (module doc).

    ``tokenizer``: ``bytes`` or ``hf:<dir>`` (:mod:`deepomni.text`), the one the model was trained with, or
    one :func:`tokenizer_for` built. It is built first, so a bad one fails before anything is written."""
    cfg = model.cfg
    tok = tokenizer_for(cfg, tokenizer) if isinstance(tokenizer, str) else tokenizer
    out = export_hf(model, out_dir, dtype=dtype, expert_layout=expert_layout, max_shard_bytes=max_shard_bytes,
                    text_specials=True, **special_ids(cfg))
    tok.save_pretrained(out)
    # transformers 5 records the class as TokenizersBackend; its alias PreTrainedTokenizerFast loads in 4.x too
    tok_config = out / "tokenizer_config.json"
    tok_config.write_text(json.dumps({**json.loads(tok_config.read_text()),
                                      "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    hf_generation_config(cfg, generation).save_pretrained(out)
    return out


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    expert_layout: ExpertLayout = "per_expert",
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """:func:`export_hf_model` of a DeepOmni checkpoint directory (``deepomni.checkpoint``); ``tokenizer``
    None: the one the checkpoint records (:func:`recorded_tokenizer`), else ``bytes``."""
    from ..checkpoint import CONFIG, load_model

    src, out = Path(checkpoint), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(src)!r} does not exist")
    if out.resolve() == src.resolve():
        raise ValueError(f"the export directory must differ from the checkpoint {str(src)!r} (it would be overwritten)")
    tok = None
    if (src / CONFIG).is_file():  # check the tokenizer before loading the weights (load_model names what is missing)
        cfg = ModelConfig.from_dict(json.loads((src / CONFIG).read_text()))
        tok = tokenizer_for(cfg, tokenizer or recorded_tokenizer(src) or "bytes")
    model, _ = load_model(src)
    return export_hf_model(model, out, tok, dtype=dtype, expert_layout=expert_layout, max_shard_bytes=max_shard_bytes)


__all__ = ["export_checkpoint", "export_hf_model", "hf_generation_config", "recorded_tokenizer", "special_ids",
           "tokenizer_for"]
