"""The training stages as data (PAPER.md "Training stages"), one row of the paper's table per :class:`Stage`.

| stage            | data (tasks)                    | trainable                                             | router      |
|------------------|---------------------------------|-------------------------------------------------------|-------------|
| text_pretrain    | text_qa, text-input spoken_qa   | all but the speech input (our tiny base LLM)          | all experts |
| s1_align         | asr                             | projector, extended embedding rows (+ untied head's)  | unchanged   |
| s2_speech_experts| spoken_qa, tts (speech answers) | speech experts, router, shared experts, dense layers, | speech only |
|                  |                                 | norms, embeddings; attention of MoE layers frozen     |             |
| s2_text_experts  | text_qa                         | text experts + the same shared parts                  | text only   |
| s3_joint         | all tasks                       | all but the speech encoder and projector              | all experts |
| full_finetune    | all tasks                       | all but the speech encoder (baseline "PureMoE")       | all experts |

``text_only`` stages (text_pretrain) read only text-input rows and see the text channel alone: codec inputs
are replaced by the codec PAD token and codec labels ignored, so the base LLM learns text, not speech.
Learning rates are the paper's (S1 2e-5, S2.1 1e-4, S2.2 2e-5, S3 5e-5); tiny models need larger ones,
set per stage by the training preset (``deepomni/presets/train/tiny.json``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

_MOE_ATTN = re.compile(r"layers\.(\d+)\.self_attn\.")


@dataclass(frozen=True)
class Stage:
    name: str
    tasks: tuple[str, ...]  # tokenized rows whose ``task`` is one of these
    trainable: Callable[[str, "object"], bool]  # (parameter name, ModelConfig) -> requires_grad
    mode: str  # routing mode (deepomni.model.modality.MODES)
    lr: float  # paper default; overridden by TrainConfig.lr / the preset's per-stage lr
    steps: int  # default number of optimizer steps
    text_only: bool = False  # text-input rows only, codec channels blanked (see module doc)
    needs_assignment: bool = False  # routing mode needs experts.json
    extension_rows_only: bool = False  # embedding table: only the rows the text vocabulary lacks train


# ------------------------------------------------------------------------------ trainable predicates
def _speech_input(name: str) -> bool:
    return name.startswith("speech.")


def _moe_attention(name: str, cfg) -> bool:
    m = _MOE_ATTN.match(name)
    return m is not None and cfg.is_moe_layer(int(m.group(1)))


def all_but_speech_input(name: str, cfg) -> bool:
    return not _speech_input(name)


def projector_and_embeddings(name: str, cfg) -> bool:
    return name.startswith("speech.projector.") or name.startswith("embed.")


def all_but_moe_attention(name: str, cfg) -> bool:
    """S2: experts (the mode's, via the gradient mask), router, shared experts, dense layers, norms,
    embeddings; not the attention of MoE layers, not the speech input."""
    return not _speech_input(name) and not _moe_attention(name, cfg)


def all_but_encoder(name: str, cfg) -> bool:
    return not name.startswith("speech.encoder.")


ALL_TASKS = ("asr", "tts", "spoken_qa", "text_qa")

STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("text_pretrain", ("text_qa", "spoken_qa"), all_but_speech_input, "all", 1e-4, 1000, text_only=True),
    Stage("s1_align", ("asr",), projector_and_embeddings, "all", 2e-5, 1000, extension_rows_only=True),
    Stage("s2_speech_experts", ("spoken_qa", "tts"), all_but_moe_attention, "speech", 1e-4, 1000,
          needs_assignment=True),
    Stage("s2_text_experts", ("text_qa",), all_but_moe_attention, "text", 2e-5, 1000, needs_assignment=True),
    Stage("s3_joint", ALL_TASKS, all_but_speech_input, "all", 5e-5, 1000),
    Stage("full_finetune", ALL_TASKS, all_but_encoder, "all", 5e-5, 1000),
]}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    return STAGES[name]


def set_trainable(model, stage: Stage) -> tuple[int, int]:
    """Set ``requires_grad`` per the stage; returns (trainable, total) parameter counts."""
    n_train = n_all = 0
    model.embed.trainable_rows = model.embed.extension_rows() if stage.extension_rows_only else None
    for name, p in model.named_parameters():
        p.requires_grad_(bool(stage.trainable(name, model.cfg)))
        n_all += p.numel()
        n_train += p.numel() if p.requires_grad else 0
    return n_train, n_all
