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

Laid out as ``<data>/tokenized/split=<split>/status=<ok|rejected>/part-<task>.parquet`` (Hive partitions; the
files in name order hold the rows in the order ``prepare`` read them: :mod:`deepomni.data.shard_sink` writes
them). This module owns the layout: everything that reads tokenized rows (training, profiling, evaluation,
preference pairs, the lm-eval export) goes through :func:`iter_rows` / :func:`read_rows` (pyarrow, in process)
or :func:`read_dataset` (a Ray Dataset, for the trainers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
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


# below this many bytes of shards :func:`read_dataset` reads the rows in the calling process and hands Ray
# Data one table: Ray Data's read tasks would start worker processes that cost more than the read (tens of
# seconds a stage on 2 cores)
DRIVER_READ_BYTES = 256 * 1024**2


def shard_dir(data: str | Path, split: str) -> Path:
    """The directory of a split's accepted rows."""
    return Path(data) / "tokenized" / f"split={split}" / "status=ok"


def shard_files(data: str | Path, split: str, columns: Sequence[str] = ()) -> list[str]:
    """A split's accepted shards, sorted; a clear error where there are none, or where they lack ``columns``
    (a corpus prepared by an older version)."""
    d = shard_dir(data, split)
    files = sorted(str(f) for f in d.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no tokenized shards under {d} (run `deepomni data prepare` first)")
    missing = [c for c in columns if c not in pads.dataset(files[0], format="parquet").schema.names]
    if missing:
        raise ValueError(f"{d} lacks the columns {missing}: it was prepared by an older version; run "
                         f"`deepomni data prepare` again")
    return files


def iter_rows(data: str | Path, split: str, max_items: int | None = None,
              columns: Sequence[str] | None = None) -> Iterator[dict]:
    """Accepted rows of one split as dicts, in file order, streamed batch by batch."""
    files = shard_files(data, split, columns or ())
    n = 0
    for batch in pads.dataset(files, format="parquet").to_batches(columns=columns and list(columns),
                                                                  batch_size=64):
        for row in batch.to_pylist():
            if max_items is not None and n >= max_items:
                return
            n += 1
            yield row


def read_rows(data: str | Path, split: str, max_items: int | None = None,
              columns: Sequence[str] | None = None) -> list[dict]:
    """:func:`iter_rows` as a list."""
    return list(iter_rows(data, split, max_items, columns))


def read_dataset(data: str | Path, split: str, columns: Sequence[str], where=None,
                 max_items: int | None = None):
    """Accepted rows of one split as a Ray Dataset of ``columns``, filtered by the pyarrow expression
    ``where``, the first ``max_items`` if set. Small corpora (:data:`DRIVER_READ_BYTES`) are read here and
    handed over as one table; larger ones through ``ray.data.read_parquet``."""
    import ray.data

    files = shard_files(data, split, columns)
    if sum(Path(f).stat().st_size for f in files) <= DRIVER_READ_BYTES:
        table = pads.dataset(files, format="parquet").to_table(columns=list(columns), filter=where)
        return ray.data.from_arrow(table if max_items is None else table.slice(0, max_items))
    ds = ray.data.read_parquet(files, columns=list(columns), filter=where)
    return ds if max_items is None else ds.limit(max_items)


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
