"""The raw-item table: one row per example, before any tokenization (docs/data.md has the column table).

Every source of data (the built-in espeak corpus, LibriSpeech, a JSONL manifest) ends here, as Parquet
shards ``<dir>/raw/<split>/part-NNNNN.parquet``; the preprocessing pipeline reads nothing else. Audio is
kept *encoded* (FLAC, WAV, ... whatever soundfile reads) so shards stay small and importing a corpus does
not decode it; decoding and resampling to 16 kHz happen once, in preprocessing.

The column ``question_text`` is always the words of the question, also for speech input (there it is the
transcript of ``question_audio``): it is what text-input variants and evaluation need.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
import typing
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# ------------------------------------------------------------------------------------ vocabularies

# the one definition of the tasks and the modalities (types for configs, tuples for checks)
Task = Literal["asr", "tts", "spoken_qa", "text_qa"]
TASKS: tuple[str, ...] = typing.get_args(Task)
ASR, TTS, SPOKEN_QA, TEXT_QA = TASKS
Modality = Literal["speech", "text"]
MODALITIES: tuple[str, ...] = typing.get_args(Modality)
SPEECH, TEXT = MODALITIES
SPLITS = ("train", "validation", "test")

# What each task reads and writes; validate_table enforces it.
#   asr        speech question (question_audio)    -> answer_text = transcript
#   tts        text question (the text to read)    -> answer_text = same text, answer_audio = its speech
#   spoken_qa  speech or text question             -> answer_text and answer_audio (the spoken answer)
#   text_qa    text question                       -> answer_text; no audio anywhere
TASK_INPUTS = {ASR: (SPEECH,), TTS: (TEXT,), SPOKEN_QA: (SPEECH, TEXT), TEXT_QA: (TEXT,)}
SPEECH_OUT_TASKS = (TTS, SPOKEN_QA)  # the tasks whose answer is speech too (answer_audio, codec channels)
SPEECH_TASKS = (ASR, TTS, SPOKEN_QA)  # tasks with speech in the question or the answer

RAW_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),  # train | validation | test
    pa.field("task", pa.string(), nullable=False),  # one of TASKS
    pa.field("input_modality", pa.string(), nullable=False),  # speech | text
    pa.field("question_text", pa.string(), nullable=False),  # the question's words (transcript for speech)
    pa.field("question_audio", pa.binary()),  # encoded audio; set iff input_modality == speech
    pa.field("question_seconds", pa.float32()),
    pa.field("answer_text", pa.string(), nullable=False),
    pa.field("answer_audio", pa.binary()),  # encoded spoken answer (tts, spoken_qa; optional for imports)
    pa.field("answer_seconds", pa.float32()),
    pa.field("meta", pa.string(), nullable=False),  # JSON object: source, voice, template, entities, ...
])
COLUMNS = tuple(RAW_SCHEMA.names)


# -------------------------------------------------------------------------------------- validation

def _first_bad(table: pa.Table, mask: pa.ChunkedArray) -> str:
    """``row 3 (id 'x')`` for the first true entry of ``mask``: errors name the offending row."""
    i = pc.index(mask, True).as_py()
    return f"row {i} (id {table.column('id')[i].as_py()!r})"


def validate_table(table: pa.Table) -> None:
    """Raise ``ValueError`` naming the first problem: a missing column or wrong type, an unknown split,
    task or modality, a speech question without audio, a text question with audio, a speech-out task
    without its spoken answer (synthetic ``tts``), empty ids or texts, duplicate ids, meta not JSON."""
    missing = [n for n in COLUMNS if n not in table.column_names]
    if missing:
        raise ValueError(f"raw table is missing column(s) {missing}; expected {list(COLUMNS)}")
    for field in RAW_SCHEMA:
        got = table.schema.field(field.name).type
        if got != field.type:
            raise ValueError(f"raw column {field.name!r} has type {got}, expected {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            at = _first_bad(table, pc.is_null(table[field.name]))
            raise ValueError(f"raw column {field.name!r} has nulls at {at}")
    for name, allowed in (("split", SPLITS), ("task", TASKS), ("input_modality", MODALITIES)):
        bad = pc.invert(pc.is_in(table[name], pa.array(allowed)))
        if pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            raise ValueError(f"{_first_bad(table, bad)}: unknown {name} {table[name][i].as_py()!r}; "
                             f"expected one of {list(allowed)}")
    for name in ("id", "question_text", "answer_text"):
        empty = pc.equal(pc.utf8_length(table[name]), 0)
        if pc.any(empty).as_py():
            raise ValueError(f"{_first_bad(table, empty)}: empty {name}")
    task, modality = table["task"], table["input_modality"]
    speech_in = pc.equal(modality, SPEECH)
    checks = [
        (pc.and_(speech_in, pc.is_null(table["question_audio"])), "speech input without question_audio"),
        (pc.and_(pc.invert(speech_in), pc.is_valid(table["question_audio"])), "text input with question_audio"),
        (pc.and_(pc.is_valid(table["question_audio"]), pc.is_null(table["question_seconds"])),
         "question_audio without question_seconds"),
        (pc.and_(pc.is_valid(table["answer_audio"]), pc.is_null(table["answer_seconds"])),
         "answer_audio without answer_seconds"),
        (pc.and_(pc.equal(task, TTS), pc.is_null(table["answer_audio"])), "tts item without answer_audio"),
        (pc.and_(pc.equal(task, TEXT_QA), pc.is_valid(table["answer_audio"])), "text_qa item with answer_audio"),
        (pc.and_(pc.equal(task, ASR), pc.is_valid(table["answer_audio"])), "asr item with answer_audio"),
    ]
    for t, allowed in TASK_INPUTS.items():
        bad_in = pc.and_(pc.equal(task, t), pc.invert(pc.is_in(modality, pa.array(allowed))))
        checks.append((bad_in, f"{t} item with an input modality other than {'/'.join(allowed)}"))
    for bad, what in checks:
        if pc.any(bad).as_py():
            raise ValueError(f"{_first_bad(table, bad)}: {what}")
    if pc.count_distinct(table["id"]).as_py() != table.num_rows:
        dup = next(d["values"] for d in pc.value_counts(table["id"]).to_pylist() if d["counts"] > 1)
        raise ValueError(f"duplicate id {dup!r} in raw table")
    for i, m in enumerate(table["meta"].to_pylist()):
        try:
            ok = isinstance(json.loads(m), dict)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise ValueError(f"row {i} (id {table['id'][i].as_py()!r}): meta is not a JSON object: {m[:80]!r}")


# ----------------------------------------------------------------------------------- rows and shards

Row = Mapping[str, Any]


def rows_to_table(rows: Iterable[Row]) -> pa.Table:
    """Python dicts (all schema columns; ``meta`` may be a dict) -> a table in ``RAW_SCHEMA``."""
    cols: dict[str, list] = {n: [] for n in COLUMNS}
    for r in rows:
        for n in COLUMNS:
            v = r.get(n)
            if n == "meta" and not isinstance(v, str):
                v = json.dumps(v if v is not None else {}, sort_keys=True)
            cols[n].append(v)
    return pa.Table.from_pydict(cols, schema=RAW_SCHEMA)


class ShardWriter:
    """Buffer rows and write them as ``part-NNNNN.parquet`` shards of ``rows_per_shard`` rows into one
    directory, validating each shard first. Refuses a directory that already holds shards unless
    ``overwrite`` (then those are deleted first), so a rerun never mixes old and new parts."""

    def __init__(self, out_dir: str | Path, rows_per_shard: int = 1000, overwrite: bool = False) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.out_dir = Path(out_dir)
        self.rows_per_shard = rows_per_shard
        self.out_dir.mkdir(parents=True, exist_ok=True)
        old = sorted(self.out_dir.glob("part-*.parquet"))
        if old and not overwrite:
            raise ValueError(f"{self.out_dir} already holds {len(old)} shard(s); "
                             "pass overwrite (--overwrite) to replace them")
        for p in old:
            p.unlink()
        self.paths: list[Path] = []
        self.rows = 0
        self._buffer: list[Row] = []

    def add(self, row: Row) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        table = rows_to_table(self._buffer)
        validate_table(table)
        path = self.out_dir / f"part-{len(self.paths):05d}.parquet"
        pq.write_table(table, path, compression="zstd")
        self.paths.append(path)
        self.rows += table.num_rows
        self._buffer = []

    def close(self) -> list[Path]:
        self.flush()
        return self.paths

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def write_shards(rows: Iterable[Row], out_dir: str | Path, rows_per_shard: int = 1000,
                 overwrite: bool = False) -> list[Path]:
    """Write ``rows`` (dicts with the schema's columns) as validated Parquet shards; returns their paths."""
    with ShardWriter(out_dir, rows_per_shard, overwrite) as w:
        for r in rows:
            w.add(r)
    return w.paths


def shard_paths(path: str | Path) -> list[Path]:
    """A shard file, or every ``*.parquet`` under a directory (sorted, so reads are deterministic); a
    dataset directory with a ``raw/`` folder means that folder (other outputs may sit beside it)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if (p / "raw").is_dir():
        p = p / "raw"
    if not p.is_dir():
        raise FileNotFoundError(f"no raw data at {p}")
    paths = sorted(p.rglob("*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no *.parquet shards under {p}")
    return paths


def read_raw(path: str | Path, validate: bool = True) -> pa.Table:
    """One shard, a split directory, or a whole dataset directory (``<dir>/raw/<split>/...``) -> one table."""
    tables = [pq.read_table(s, schema=RAW_SCHEMA) for s in shard_paths(path)]
    table = pa.concat_tables(tables)
    if validate:
        validate_table(table)
    return table
