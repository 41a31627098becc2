"""Data: raw items (``schema``), the built-in spoken corpus (``synth``), readers for real corpora
(``readers``); docs/data.md describes the raw-item table and the corpus."""

from .schema import (
    ASR,
    MODALITIES,
    RAW_SCHEMA,
    SPLITS,
    SPOKEN_QA,
    TASKS,
    TEXT_QA,
    TTS,
    read_raw,
    validate_table,
    write_shards,
)

__all__ = ["ASR", "MODALITIES", "RAW_SCHEMA", "SPLITS", "SPOKEN_QA", "TASKS", "TEXT_QA", "TTS", "read_raw",
           "validate_table", "write_shards"]
