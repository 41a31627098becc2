"""The Ray Data preprocessing pipeline on a small built-in corpus (espeak-ng), bad rows included."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from deepomni.config import DataConfig, load_preset
from deepomni.data.schema import RAW_SCHEMA
from deepomni.data.tokenized import row_tensors
from deepomni.model.channels import IGNORE
from deepomni.model.speech import num_audio_positions

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_local):
    from deepomni.data.pipeline import prepare
    from deepomni.data.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("data")
    synthesize(SynthConfig(seed=1, sizes={"train": 16, "validation": 4, "test": 4}, workers=2), out, progress=False)
    good = pq.read_table(next((out / "raw" / "train").glob("*.parquet")))
    bad = good.slice(0, 2).to_pylist()
    bad[0].update(id="bad-question", input_modality="speech", task="asr", question_audio=b"RIFF not really audio",
                  question_seconds=1.0)
    bad[1].update(id="bad-answer", task="tts", input_modality="text", question_audio=None,
                  answer_audio=b"\x00" * 10, answer_seconds=1.0)
    pq.write_table(pa.Table.from_pylist(bad, schema=RAW_SCHEMA), out / "raw" / "train" / "part-bad.parquet")
    summary = prepare(out / "raw", out, DataConfig(batch_size=8, codec_fit_items=40))
    table = pads.dataset(str(out / "tokenized"), format="parquet", partitioning="hive").to_table()
    return out, summary, table


def test_every_item_is_written_ok_or_rejected_with_its_reason(prepared):
    out, summary, table = prepared
    rows = {r["id"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == 24 + 2 == summary.items  # nothing lost
    assert summary.rejected == 2
    assert rows["bad-question"]["status"] == "rejected" and "question_audio" in rows["bad-question"]["error"]
    assert rows["bad-answer"]["status"] == "rejected" and "answer_audio" in rows["bad-answer"]["error"]
    assert all(r["status"] == "ok" and r["error"] is None for i, r in rows.items() if not i.startswith("bad"))
    saved = json.loads((out / "prepare_summary.json").read_text())
    assert saved["items"] == 26 and saved["audio_seconds_per_second"] > 0
    codec = json.loads((out / "codec" / "config.json").read_text())
    assert codec["mel_frames_per_code"] * 10 == DataConfig().codec_frame_ms  # the codec is fitted at the data's frame


def test_rows_are_written_in_the_order_they_were_read(prepared):
    """The same corpus prepared twice is the same shards row for row (training then draws the same batches):
    each split's rows come in the raw shards' order (sorted files, rows in file order), the bad ones apart."""
    from deepomni.data.tokenized import read_rows, shard_files

    out, _, _ = prepared
    for split in ("train", "validation", "test"):
        raw = sorted((out / "raw" / split).glob("*.parquet"))
        want = [i for f in raw for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()
                if not i.startswith("bad")]
        assert [r["id"] for r in read_rows(out, split, columns=["id"])] == want, split
        assert [f.rsplit("/", 1)[1] for f in shard_files(out, split)] == ["part-00000.parquet"]


def test_sequences_match_their_task(prepared):
    _, _, table = prepared
    cfg = load_preset("tiny")
    C = cfg.num_codec_channels + 1
    seen = set()
    for r in table.to_pylist():
        if r["status"] != "ok":
            continue
        tokens, labels, mel = row_tensors(r)
        assert tokens.shape == labels.shape == (r["length"], C)
        seen.add((r["task"], r["input_modality"]))
        codec_targets = (labels[:, 1:] != IGNORE).sum().item()
        if r["task"] in ("tts", "spoken_qa"):
            assert r["answer_frames"] > 0 and codec_targets == (cfg.num_codec_channels) * (r["answer_frames"] + 1)
        else:
            assert codec_targets == 0 and r["answer_frames"] == 0
        if r["input_modality"] == "speech":
            assert mel.shape == (80, r["mel_frames"]) and torch.isfinite(mel).all()
            assert r["audio_positions"] == num_audio_positions(r["mel_frames"], cfg.speech_encoder.downsample)
        else:
            assert mel is None and r["audio_positions"] == 0
        assert (labels[:, 0] != IGNORE).sum() >= 2  # answer text + EOT
    assert {"asr", "tts", "spoken_qa", "text_qa"} <= {t for t, _ in seen}


def test_a_prepared_batch_trains_the_model(prepared):
    """The rows are what the model consumes: speech features through the encoder into the placeholders."""
    from deepomni.model.model import DeepOmniModel

    _, _, table = prepared
    row = next(r for r in table.to_pylist() if r["status"] == "ok" and r["input_modality"] == "speech"
               and r["task"] == "spoken_qa")
    tokens, labels, mel = row_tensors(row)
    model = DeepOmniModel(load_preset("tiny")).init_weights(0).train()
    audio = model.encode_speech(mel.unsqueeze(0), [mel.shape[1]])
    out = model(tokens.unsqueeze(0), audio=audio, labels_BLC=labels.unsqueeze(0))
    assert torch.isfinite(out.loss) and not torch.isnan(out.channel_losses).any()


def test_codec_that_does_not_fit_the_model_is_refused(tmp_path, prepared, ray_local):
    from deepomni.codec.builtin import fit_builtin_codec
    from deepomni.data.pipeline import prepare

    out, _, _ = prepared
    wav = np.sin(np.arange(16000 * 2) * 0.05).astype(np.float32)
    fit_builtin_codec([wav], num_channels=3, codebook_size=64, seed=0, progress=False).save(tmp_path / "c3")
    with pytest.raises(ValueError, match="the model expects 4 x 256"):
        prepare(out / "raw", tmp_path / "o", DataConfig(codec=f"builtin:{tmp_path / 'c3'}"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(tmp_path / "missing", tmp_path / "o", DataConfig())
