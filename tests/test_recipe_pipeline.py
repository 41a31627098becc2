"""`python -m jobs.pipeline` end to end on a very small corpus (a few steps per stage): every step's output
exists, the recipe's checkpoints carry the expert assignment, the table compares base / recipe / baseline,
and a re-run skips what is done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pipeline(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "jobs.pipeline", "--out", str(out), "--train-items", "24",
                           "--eval-items", "6", "--steps-scale", "0.01"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def test_pipeline_end_to_end_and_rerun(tmp_path):
    out = tmp_path / "pipe"
    r = _pipeline(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = out / "runs"
    for run in ("base", "s1_align", "s2_speech_experts", "s2_text_experts", "s3_joint", "full_finetune"):
        assert (runs / run / "final" / "model.safetensors").exists(), run
    assignment = json.loads((out / "profile" / "experts.json").read_text())
    assert (runs / "s3_joint" / "final" / "experts.json").exists()
    assert not (runs / "full_finetune" / "final" / "experts.json").exists()
    assert (out / "profile" / "load.png").read_bytes()[:4] == b"\x89PNG"
    assert all(len(v["speech"]) == 4 for v in assignment["layers"].values())  # 25% of 16 experts per layer
    evals = {n: json.loads((out / "eval" / n / "eval.json").read_text())["metrics"]
             for n in ("base", "deeptalk", "full_finetune")}
    assert "text_drop" in evals["deeptalk"] and "text_drop" in evals["full_finetune"]
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert [line.split("|")[1].strip() for line in table[2:]] == ["base", "deeptalk", "full_finetune"]
    summary = (out / "summary.md").read_text()
    assert "deeptalk" in summary and "wall time" in summary

    again = _pipeline(out)  # everything is done: every step is skipped, the same table is printed
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before, skipped") >= 11
    assert [line for line in again.stdout.splitlines() if line.startswith("|")] == table
