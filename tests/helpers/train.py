"""Training test material: what a run wrote (its per-step sample log, the checkpoints Ray Train registered), and
a tiny tokenized corpus written in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from deepomni.data.sequences import INSTRUCTIONS, build_sequence
from deepomni.data.tokenized import TOKENIZED_SCHEMA
from deepomni.model.channels import VocabLayout
from deepomni.model.speech import num_audio_positions
from deepomni.text import load_tokenizer


# ------------------------------------------------------------------------------------------ a run's files
def parse_train(argv: list[str]):
    """The TrainConfig that ``deepomni train <argv>`` would run (its flags parsed as the command parses them)."""
    import argparse

    from deepomni.train.cli import add_train_args, train_config

    p = argparse.ArgumentParser(prog="deepomni train")
    add_train_args(p)
    return train_config(p.parse_args(argv))


def sample_log(run_dir: Path, rank: int = 0) -> list[dict]:
    """Every record of a rank's sample log, in write order."""
    return [json.loads(line) for line in (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines()]


def last_per_step(records: list[dict]) -> dict[int, dict]:
    """What each step counted: the last record of it (a resume re-runs the steps after its checkpoint)."""
    return {r["step"]: r for r in records}


def registered_steps(run_dir: Path) -> set[int]:
    """Steps of the checkpoints Ray Train's controller has registered (what a restart can resume from)."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return set()
    return {c["metrics"]["step"] for c in snap["checkpoint_results"]}


# ------------------------------------------------------------------------------------------ a tiny corpus
# (task, input modality, question, answer): a tiny corpus covering every task and both input modalities
ITEMS = [
    ("text_qa", "text", "What is two plus two?", "four"),
    ("text_qa", "text", "What comes after Monday?", "Tuesday"),
    ("spoken_qa", "speech", "Spell cat for me.", "c a t"),
    ("spoken_qa", "text", "What is the opposite of hot?", "cold"),
    ("asr", "speech", "tobi moved to munby", "tobi moved to munby"),
    ("tts", "text", "Read this.", "Read this."),
]
MEL_FRAMES, ANSWER_FRAMES = 40, 5


def write_tiny_corpus(root: Path, cfg, split: str = "test", seed: int = 0) -> Path:
    """Tokenized shards as ``deepomni data prepare`` writes them, built in-process (random mel and codes)."""
    layout, tok = VocabLayout.from_config(cfg), load_tokenizer("bytes")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, (task, modality, q, a) in enumerate(ITEMS):
        speech_in, speech_out = modality == "speech", task in ("tts", "spoken_qa")
        positions = num_audio_positions(MEL_FRAMES, cfg.speech_encoder.downsample) if speech_in else None
        codes = torch.randint(0, cfg.codebook_size, (cfg.num_codec_channels, ANSWER_FRAMES), generator=gen) if speech_out else None
        seq = build_sequence(layout, task, tok.encode(a), tok.encode(INSTRUCTIONS[task]),
                             question_ids=None if speech_in else tok.encode(q), audio_positions=positions,
                             answer_codes_KF=codes)
        mel = torch.randn(cfg.speech_encoder.num_mel_bins, MEL_FRAMES, generator=gen) if speech_in else None
        rows.append({
            "id": f"t-{i}", "split": split, "task": task, "input_modality": modality, "question_text": q,
            "answer_text": a, "length": seq.tokens_LC.shape[0], "num_channels": layout.num_channels,
            "tokens": seq.tokens_LC.reshape(-1).tolist(), "labels": seq.labels_LC.reshape(-1).tolist(),
            "audio_positions": positions or 0,
            "mel": [] if mel is None else mel.reshape(-1).numpy().astype(np.float16).tolist(),
            "mel_bins": cfg.speech_encoder.num_mel_bins if speech_in else 0, "mel_frames": MEL_FRAMES if speech_in else 0,
            "answer_frames": ANSWER_FRAMES if speech_out else 0, "error": None,
        })
    d = root / "tokenized" / f"split={split}" / "status=ok"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA), d / "part-0.parquet")
    return root
