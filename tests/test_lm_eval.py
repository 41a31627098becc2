"""lm-evaluation-harness on an export, offline, scores what ``deepomni evaluate`` scores (docs/hf.md).

The shipped foundation base (``deepomni/foundations/small/base``, a trained text LLM) is exported with
``deepomni export-hf --lm-eval-data``, which writes our held-out text QA items as a local task; ``lm_eval``
(its ``hf`` model, ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) runs that task on the export, and its exact
match must equal ``deepomni evaluate``'s ``text_qa_accuracy`` on the same items within one item. The data:
a corpus of mostly text QA items (a few TTS items give the built-in codec its spoken answers to fit),
prepared for the base's config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepomni.foundations import locate

EXE = Path(sys.executable).parent
TEST_ITEMS = 30


def _run(*cmd: str, env: dict | None = None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled",
                                                                 **(env or {})}, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def text_qa_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lm_eval_data")
    base = locate("small") / "base"
    _run(str(EXE / "deepomni"), "data", "synth", "--out", str(d), "--train", "8", "--validation", "0", "--test",
         str(TEST_ITEMS), "--task-mix", '{"text_qa": 0.8, "tts": 0.2}', "--quiet")
    _run(str(EXE / "deepomni"), "data", "prepare", "--out", str(d), "--preset", str(base / "config.json"),
         "--codec-fit-items", "8")
    return d


def test_lm_eval_scores_what_deepomni_evaluate_scores(text_qa_data, tmp_path):
    pytest.importorskip("lm_eval")  # a dev dependency (pyproject's dev extra)
    base = locate("small") / "base"
    _run(str(EXE / "deepomni"), "evaluate", "--checkpoint", str(base), "--data", str(text_qa_data),
         "--out", str(tmp_path / "eval"), "--tasks", "text_qa", "--speech", "false")
    ours = json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    n = ours["items"]["text_qa_accuracy"]

    hf = tmp_path / "hf"
    _run(str(EXE / "deepomni"), "export-hf", "--checkpoint", str(base), "--out", str(hf),
         "--lm-eval-data", str(text_qa_data))
    tasks = hf / "lm_eval_tasks"
    assert sum(1 for _ in (tasks / "deepomni_text_qa.jsonl").open()) == n  # the same items
    _run(str(EXE / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32",
         "--include_path", str(tasks), "--tasks", "deepomni_text_qa", "--device", "cpu", "--batch_size", "1",
         "--output_path", str(tmp_path / "lm_eval"),
         env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    results = json.loads(next((tmp_path / "lm_eval").rglob("results_*.json")).read_text())["results"]
    theirs = results["deepomni_text_qa"]["exact_match,none"]

    assert n >= 20, n  # enough items for one item to be a small difference
    assert abs(theirs - ours["text_qa_accuracy"]) * n <= 1 + 1e-9, (theirs, ours["text_qa_accuracy"], n)
    assert ours["text_qa_accuracy"] > 0.5  # a trained model: agreement on answers, not on zeros
