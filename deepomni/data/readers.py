"""Readers for real corpora: each yields raw-item rows (:mod:`deepomni.data.schema`), audio bytes copied
as they are (decoding happens once, in preprocessing). Errors name the file and line at fault.

- LibriSpeech layout: ``<root>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` with lines
  ``<utt-id> TRANSCRIPT`` and audio ``<utt-id>.flac`` beside it -> ``asr`` rows, transcript lower-cased.
- JSONL manifest, one object a line: ``audio`` is always the speech *of* ``text``; ``task`` says which
  side it is on:

    asr        needs audio, text               speech question -> its transcript ``text``
    tts        needs audio, text               text question ``text`` -> its speech ``audio``
    spoken_qa  needs text, answer_text         speech question if ``audio`` is given, else text; the answer
               (audio, answer_audio optional)  text, plus the spoken answer if ``answer_audio`` is given
    text_qa    needs text, answer_text         text only; no audio allowed

  Optional everywhere: ``id`` (default ``<manifest stem>-<line>``), ``split`` (default the reader's
  ``split``), ``meta`` (an object merged into the row's meta). Paths are relative to the manifest's
  directory unless absolute.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..audio import AudioError, audio_info
from .schema import ASR, SPEECH, SPLITS, SPOKEN_QA, TASKS, TEXT, TEXT_QA, TTS


def _audio(path: Path, where: str) -> tuple[bytes, float]:
    """The file's bytes and duration; ``where`` (file:line) is named in the error."""
    if not path.is_file():
        raise FileNotFoundError(f"{where}: audio file {path} does not exist")
    data = path.read_bytes()
    try:
        seconds = audio_info(data).duration_s  # the header only: the audio is decoded when it is prepared
    except AudioError as e:
        raise ValueError(f"{where}: cannot read audio file {path}: {e}") from e
    return data, float(seconds)


def _row(**kw: Any) -> dict[str, Any]:
    row = {"question_audio": None, "question_seconds": None, "answer_audio": None, "answer_seconds": None}
    row.update(kw)
    row["meta"] = json.dumps(row.get("meta") or {}, sort_keys=True)
    return row


# ------------------------------------------------------------------------------------- LibriSpeech

def read_librispeech(root: str | Path, split_name: str = "train") -> Iterator[dict[str, Any]]:
    """``asr`` rows for every utterance under a LibriSpeech-style tree, in sorted order. Fails on a
    transcript line without its ``.flac``, on a ``.flac`` no transcript mentions, and on a malformed line."""
    if split_name not in SPLITS:
        raise ValueError(f"unknown split {split_name!r}; expected one of {list(SPLITS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LibriSpeech root {root} is not a directory")
    trans_files = sorted(root.glob("*/*/*.trans.txt"))
    if not trans_files:
        raise FileNotFoundError(f"no <speaker>/<chapter>/*.trans.txt transcripts under {root} "
                                "(point at one subset, e.g. LibriSpeech/train-clean-100)")
    for trans in trans_files:
        chapter_dir = trans.parent
        seen: set[str] = set()
        for line_no, line in enumerate(trans.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{trans}:{line_no}"
            parts = line.strip().split(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{where}: expected '<utt-id> TRANSCRIPT', got {line.strip()!r}")
            utt, text = parts
            audio, seconds = _audio(chapter_dir / f"{utt}.flac", where)
            seen.add(utt)
            speaker, chapter = (utt.split("-") + ["", ""])[:2]
            text = text.lower()
            yield _row(id=f"librispeech-{utt}", split=split_name, task=ASR, input_modality=SPEECH, question_text=text,
                       question_audio=audio, question_seconds=seconds, answer_text=text,
                       meta={"source": "librispeech", "speaker": speaker, "chapter": chapter,
                             "audio_path": str((chapter_dir / f"{utt}.flac").relative_to(root))})
        orphans = sorted(p.name for p in chapter_dir.glob("*.flac") if p.stem not in seen)
        if orphans:
            raise ValueError(f"{trans}: no transcript line for audio file(s) {orphans[:5]}"
                             + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else ""))


# ---------------------------------------------------------------------------------- JSONL manifest

_REQUIRED = {ASR: ("audio", "text"), TTS: ("audio", "text"), SPOKEN_QA: ("text", "answer_text"),
             TEXT_QA: ("text", "answer_text")}


def _manifest_row(obj: dict[str, Any], where: str, base: Path, default_id: str, split: str) -> dict[str, Any]:
    task = obj.get("task")
    if task is None:
        raise ValueError(f"{where}: missing required field 'task'")
    if task not in TASKS:
        raise ValueError(f"{where}: unknown task {task!r}; expected one of {list(TASKS)}")
    missing = [k for k in _REQUIRED[task] if obj.get(k) in (None, "")]
    if missing:
        raise ValueError(f"{where}: task {task!r} needs field(s) {missing}")
    if task == TEXT_QA and (obj.get("audio") or obj.get("answer_audio")):
        raise ValueError(f"{where}: text_qa items carry no audio; use task 'spoken_qa' for audio")
    split = obj.get("split", split)
    if split not in SPLITS:
        raise ValueError(f"{where}: unknown split {split!r}; expected one of {list(SPLITS)}")
    extra = obj.get("meta") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"{where}: 'meta' must be a JSON object")

    def load(key: str) -> tuple[bytes, float] | tuple[None, None]:
        if not obj.get(key):
            return None, None
        return _audio(base / obj[key], where)  # an absolute path replaces base

    text = str(obj["text"])
    audio, seconds = load("audio")
    row: dict[str, Any] = {"id": str(obj.get("id") or default_id), "split": split, "task": task, "question_text": text,
                           "meta": {**extra, "source": "manifest", "audio_path": obj.get("audio")}}
    if task == ASR:
        row.update(input_modality=SPEECH, question_audio=audio, question_seconds=seconds,
                   answer_text=str(obj.get("answer_text") or text))
    elif task == TTS:
        row.update(input_modality=TEXT, answer_text=text, answer_audio=audio, answer_seconds=seconds)
    else:
        answer_audio, answer_seconds = load("answer_audio")
        row.update(input_modality=SPEECH if audio is not None else TEXT, question_audio=audio,
                   question_seconds=seconds, answer_text=str(obj["answer_text"]), answer_audio=answer_audio,
                   answer_seconds=answer_seconds)
    return _row(**row)


def read_jsonl_manifest(path: str | Path, split: str = "train") -> Iterator[dict[str, Any]]:
    """Rows for every non-blank line of a JSONL manifest (fields in the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield _manifest_row(obj, where, path.parent, f"{path.stem}-{line_no}", split)
