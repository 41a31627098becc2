"""Readers for real corpora: a fake LibriSpeech tree and JSONL manifests built in tmp dirs, and every
error naming its file and line."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from deepomni.cli import main
from deepomni.data.readers import read_jsonl_manifest, read_librispeech
from deepomni.data.schema import read_raw, rows_to_table, validate_table


def _flac(path: Path, seconds: float = 0.5, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.3 * np.sin(2 * np.pi * 220 * t), sr, format="FLAC")
    return path


def _librispeech(root: Path) -> Path:
    chapters = (("19", "198", {"0001": "HELLO WORLD", "0002": "IT'S A FINE DAY"}), ("26", "495", {"0000": "YES"}))
    for spk, ch, utts in chapters:
        d = root / spk / ch
        for u in utts:
            _flac(d / f"{spk}-{ch}-{u}.flac", seconds=0.25 * (1 + len(utts[u]) // 5))
        (d / f"{spk}-{ch}.trans.txt").write_text("".join(f"{spk}-{ch}-{u} {t}\n" for u, t in utts.items()))
    return root


def test_librispeech_rows(tmp_path):
    root = _librispeech(tmp_path / "ls")
    rows = list(read_librispeech(root, "validation"))
    validate_table(rows_to_table(rows))
    assert [r["id"] for r in rows] == ["librispeech-19-198-0001", "librispeech-19-198-0002", "librispeech-26-495-0000"]
    r = rows[1]
    assert r["task"] == "asr" and r["split"] == "validation" and r["input_modality"] == "speech"
    assert r["question_text"] == r["answer_text"] == "it's a fine day"
    assert r["question_audio"] == (root / "19/198/19-198-0002.flac").read_bytes()
    assert r["question_seconds"] == pytest.approx(1.0)
    assert json.loads(r["meta"]) == {"source": "librispeech", "speaker": "19", "chapter": "198",
                                     "audio_path": "19/198/19-198-0002.flac"}


def test_librispeech_errors(tmp_path):
    root = _librispeech(tmp_path / "ls")
    trans = root / "19/198/19-198.trans.txt"
    (root / "19/198/19-198-0002.flac").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{trans}:2: audio file .*19-198-0002.flac does not exist"):
        list(read_librispeech(root))
    _flac(root / "19/198/19-198-0002.flac")
    _flac(root / "19/198/19-198-0009.flac")
    with pytest.raises(ValueError, match=rf"{trans}: no transcript line for audio file\(s\) \['19-198-0009.flac'\]"):
        list(read_librispeech(root))
    trans.write_text("19-198-0001 HELLO\n19-198-0002\n")
    with pytest.raises(ValueError, match=rf"{trans}:2: expected '<utt-id> TRANSCRIPT'"):
        list(read_librispeech(root))
    with pytest.raises(FileNotFoundError, match="no <speaker>/<chapter>/\\*.trans.txt"):
        list(read_librispeech(tmp_path))


def _manifest(tmp_path: Path, lines: list) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_manifest_rows(tmp_path):
    _flac(tmp_path / "a/q.flac", 1.0)
    absolute = _flac(tmp_path / "elsewhere/t.wav", 0.5)
    _flac(tmp_path / "a/ans.flac", 0.75)
    path = _manifest(tmp_path, [
        {"audio": "a/q.flac", "text": "Hello there", "task": "asr"},
        {"audio": str(absolute), "text": "read me", "task": "tts", "id": "t1", "split": "test"},
        "",
        {"audio": "a/q.flac", "text": "what is two plus two", "task": "spoken_qa", "answer_text": "four",
         "answer_audio": "a/ans.flac", "meta": {"origin": "x"}},
        {"text": "what is two plus two", "task": "spoken_qa", "answer_text": "four"},
        {"text": "capital of France?", "task": "text_qa", "answer_text": "Paris"},
    ])
    rows = list(read_jsonl_manifest(path, split="validation"))
    validate_table(rows_to_table(rows))
    assert [r["id"] for r in rows] == ["m-1", "t1", "m-4", "m-5", "m-6"]
    asr, tts, sqa, sqa_text, tqa = rows
    assert asr["input_modality"] == "speech" and asr["answer_text"] == "Hello there" and asr["split"] == "validation"
    assert asr["question_audio"] == (tmp_path / "a/q.flac").read_bytes()
    assert asr["question_seconds"] == pytest.approx(1.0)
    assert tts["input_modality"] == "text" and tts["question_audio"] is None and tts["split"] == "test"
    assert tts["answer_audio"] == absolute.read_bytes() and tts["answer_seconds"] == pytest.approx(0.5)
    assert sqa["input_modality"] == "speech" and sqa["answer_seconds"] == pytest.approx(0.75)
    assert json.loads(sqa["meta"])["origin"] == "x"
    assert sqa_text["input_modality"] == "text" and sqa_text["answer_audio"] is None
    assert tqa["task"] == "text_qa" and tqa["answer_text"] == "Paris"


@pytest.mark.parametrize("line, error, message", [
    ('{"text": "hi", "task": "asr"', ValueError, r"m.jsonl:2: malformed JSON"),
    ('["a"]', ValueError, r"m.jsonl:2: expected a JSON object"),
    ({"text": "hi", "task": "chat"}, ValueError, r"m.jsonl:2: unknown task 'chat'"),
    ({"text": "hi"}, ValueError, r"m.jsonl:2: missing required field 'task'"),
    ({"text": "hi", "task": "asr"}, ValueError, r"m.jsonl:2: task 'asr' needs field\(s\) \['audio'\]"),
    ({"text": "hi", "task": "text_qa"}, ValueError, r"m.jsonl:2: task 'text_qa' needs field\(s\) \['answer_text'\]"),
    ({"audio": "nope.flac", "text": "hi", "task": "asr"}, FileNotFoundError,
     r"m.jsonl:2: audio file .*nope.flac does not exist"),
    ({"audio": "bad.flac", "text": "hi", "task": "asr"}, ValueError, r"m.jsonl:2: cannot read audio file .*bad.flac"),
    ({"audio": "ok.flac", "text": "q", "task": "text_qa", "answer_text": "a"}, ValueError,
     r"m.jsonl:2: text_qa items carry no audio"),
    ({"text": "q", "task": "text_qa", "answer_text": "a", "split": "dev"}, ValueError,
     r"m.jsonl:2: unknown split 'dev'"),
])
def test_manifest_errors_name_file_and_line(tmp_path, line, error, message):
    _flac(tmp_path / "ok.flac")
    (tmp_path / "bad.flac").write_bytes(b"not audio at all")
    path = _manifest(tmp_path, [{"text": "fine", "task": "text_qa", "answer_text": "ok"}, line])
    with pytest.raises(error, match=message):
        list(read_jsonl_manifest(path))


def test_cli_import(tmp_path, capsys):
    root = _librispeech(tmp_path / "ls")
    assert main(["data", "import", "--librispeech", str(root), "--out", str(tmp_path / "out1"), "--split", "test"]) == 0
    table = read_raw(tmp_path / "out1")
    assert table.num_rows == 3 and set(table["split"].to_pylist()) == {"test"}
    assert (tmp_path / "out1/raw/test/part-00000.parquet").exists()
    _flac(tmp_path / "q.flac")
    path = _manifest(tmp_path, [{"audio": "q.flac", "text": "hi", "task": "asr"},
                                {"text": "q", "task": "text_qa", "answer_text": "a", "split": "validation"}])
    args = ["data", "import", "--manifest", str(path), "--out", str(tmp_path / "out2"), "--rows-per-shard", "1"]
    assert main(args) == 0
    assert read_raw(tmp_path / "out2/raw/validation").num_rows == 1 and read_raw(tmp_path / "out2").num_rows == 2
    assert "2 items" in capsys.readouterr().out
    assert main(["data", "import", "--manifest", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
