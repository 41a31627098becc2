"""Parquet schema of tokenized items: what the trainer reads (written by ``deepomni data prepare``).

One row per training sequence. Arrays are stored flat with their shapes beside them, so any Parquet reader
(and Ray Data) handles them without tensor extensions:

| column | type | meaning |
|---|---|---|
| id, split, task, input_modality | string | from the raw item |
| question_text, answer_text | string | kept for evaluation |
| length, num_channels | int32 | L and C of the sequence |
| tokens, labels | list<int32> | ``[L, C]`` channel-local ids / targets (-100 = no loss), row-major |
| audio_positions | int32 | AUDIO placeholder positions in the prompt (0: text input) |
| audio_segments | list<int32> | with ``speech_encoder.positions="ctc"``: the ``[start, end)`` encoder-frame run of each of those positions, flat (``s0, e0, s1, e1, ...``); empty otherwise |
| mel | list<float16> | ``[mel_bins, mel_frames]`` log-mel of the spoken question (empty for text input) |
| mel_bins, mel_frames | int32 | its shape |
| answer_frames | int32 | codec frames of the spoken answer (0: none) |
| error | string | null; set on rejected rows, which are written under ``status=rejected`` |
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

TOKENIZED_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("split", pa.string()),
    ("task", pa.string()),
    ("input_modality", pa.string()),
    ("question_text", pa.string()),
    ("answer_text", pa.string()),
    ("length", pa.int32()),
    ("num_channels", pa.int32()),
    ("tokens", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("audio_positions", pa.int32()),
    ("audio_segments", pa.list_(pa.int32())),
    ("mel", pa.list_(pa.float16())),
    ("mel_bins", pa.int32()),
    ("mel_frames", pa.int32()),
    ("answer_frames", pa.int32()),
    ("error", pa.string()),
])


def row_tensors(row: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(tokens_LC, labels_LC, mel_MT or None)`` of one tokenized row (as Ray Data / pyarrow give it)."""
    L, C = int(row["length"]), int(row["num_channels"])
    tokens = torch.as_tensor(np.asarray(row["tokens"], dtype=np.int64)).view(L, C)
    labels = torch.as_tensor(np.asarray(row["labels"], dtype=np.int64)).view(L, C)
    mel = None
    if int(row["mel_frames"] or 0) > 0:
        mel = torch.as_tensor(np.asarray(row["mel"], dtype=np.float32)).view(int(row["mel_bins"]), -1)
    return tokens, labels, mel


def row_segments(row: dict) -> list[tuple[int, int]] | None:
    """The stored CTC segments of a row's spoken question (``audio_segments``), or None where it has none
    (text input, or ``positions="frames"``)."""
    flat = row.get("audio_segments") or []
    return list(zip(flat[0::2], flat[1::2])) or None


def prepare_summary(data: str | Path | None) -> dict:
    """What ``deepomni data prepare`` recorded of a data directory (``prepare_summary.json``: codec,
    data_config, counts); empty where nothing is recorded."""
    summary = Path(data) / "prepare_summary.json" if data else None
    return json.loads(summary.read_text()) if summary is not None and summary.is_file() else {}


def prepared_tokenizer(data: str | Path | None) -> str:
    """The tokenizer spec a data directory was prepared with; ``"bytes"``, the default, where it is not
    recorded."""
    return prepare_summary(data).get("data_config", {}).get("tokenizer") or "bytes"
