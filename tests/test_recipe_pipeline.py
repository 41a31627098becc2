"""`python -m jobs.pipeline` end to end on a very small corpus (a few steps per stage): the recipe starts from
the shipped foundations (base LLM and frozen speech encoder), every step of the recipe and its baselines
writes its output in the recipe's order (profiling on the aligned model), the table compares every model,
and a re-run skips what is done. The baselines run are those with a stage or step of their own kind (MoExtend's
added experts, LoRA's merged adapters, DPO's pairs and stage); the others are the recipe's stages under another
assignment or trainable set, or plain stages of the same loop: their plan in tests/test_train.py, the random and
score-ranked profiling in tests/test_profile.py, and `make demo` runs full_finetune. (Random assignment's three
stages took ~50 s here, a fifth of the test, and tested nothing the recipe's stages do not.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepomni.foundations import DEFAULT, base_dir, encoder_dir
from deepomni.train.stages import MODELS, all_steps

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("moextend", "lora", "dpo")
STEPS = all_steps(BASELINES)
RUNS = {s.run for s in STEPS}
TABLE = [m for m, run in MODELS.items() if run in RUNS]  # the models the run evaluates, in the table's order


def _pipeline(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "jobs.pipeline", "--out", str(out), "--train-items", "40",
                           "--eval-items", "4", "--steps-scale", "0.01", "--encoder-steps", "3",
                           "--baselines", ",".join(BASELINES)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


@pytest.mark.timeout(1600)  # the whole chain twice: ~6 min alone, more when CI runs other tests beside it
def test_pipeline_end_to_end_and_rerun(tmp_path):
    out = tmp_path / "pipe"
    r = _pipeline(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the base is the shipped foundation base, reading speech with the shipped encoder (nothing pretrained here)
    assert not (out / "encoder").exists() and "base: the pretrained base LLM of" in r.stdout
    base_cfg = json.loads((out / "runs" / "base" / "final" / "config.json").read_text())
    assert base_cfg["speech_encoder"]["path"] == str(encoder_dir(DEFAULT))
    shipped = load_file(str(base_dir(DEFAULT) / "model.safetensors"))
    installed = load_file(str(out / "runs" / "base" / "final" / "model.safetensors"))
    assert all(torch.equal(installed[k], v.float()) for k, v in shipped.items())
    # speech at the text's rate (positions "ctc"): each spoken question fills one position per CTC segment the
    # frozen encoder heard, stored with the row; S1 started its projector from the base's text embedding
    from deepomni.data.tokenized import read_rows

    spoken = [r for r in read_rows(out / "data", "train") if r["input_modality"] == "speech"]
    assert spoken and all(2 * r["audio_positions"] == len(r["audio_segments"]) > 0 for r in spoken)
    s1 = load_file(str(out / "runs" / "s1_align" / "final" / "model.safetensors"))
    assert "speech.projector.char_table" in s1 and s1["speech.projector.char_table"][1:].abs().sum() > 0
    for s in STEPS:
        if s.is_profile:
            assert (out / "profile" / s.run / "experts.json").exists(), s.run
        elif s.pairs:
            assert (out / "pairs" / s.run / "pairs.parquet").exists(), s.run
        else:
            assert (out / "runs" / s.run / "final" / "model.safetensors").exists(), s.run
    # the order the log shows: profiling after S1, before S2
    log = r.stdout
    assert log.index("train s1_align") < log.index("profile profile (load)") < log.index("train s2_speech_experts")
    assignment = json.loads((out / "profile" / "profile" / "experts.json").read_text())
    assert all(len(v["speech"]) == 4 for v in assignment["layers"].values())  # 25% of 16 experts per layer
    assert json.loads((out / "runs" / "s3_joint" / "final" / "experts.json").read_text()) == assignment
    assert not (out / "runs" / "lora" / "final" / "experts.json").exists()
    # MoExtend: 4 experts added to every MoE layer of the aligned model, which stay as they were; LoRA: a
    # merged checkpoint with the aligned model's tensor names
    s1_names = set(s1)
    moextend = load_file(str(out / "runs" / "moextend" / "final" / "model.safetensors"))
    extended = json.loads((out / "runs" / "moextend" / "final" / "experts.json").read_text())
    assert all(v["speech"] == [16, 17, 18, 19] for v in extended["layers"].values())
    for k in s1:
        if ".mlp.experts." in k or ".mlp.gate." in k:
            assert moextend[k].shape[0] == 20 and torch.equal(moextend[k][:16], s1[k]), k
            if ".mlp.experts." in k:  # the added experts, copies of experts 3, 7, 11, 15, trained
                assert not torch.equal(moextend[k][16:], s1[k][[3, 7, 11, 15]]), k
        elif k != "embed.weight":  # attention, shared experts, dense layer, norms, speech input: as they were
            assert torch.equal(moextend[k], s1[k]), k
    assert set(load_file(str(out / "runs" / "lora" / "final" / "model.safetensors"))) == s1_names
    assert (out / "profile" / "profile" / "load.png").read_bytes()[:4] == b"\x89PNG"
    evals = {n: json.loads((out / "eval" / n / "eval.json").read_text())["metrics"] for n in TABLE}
    for name in TABLE:
        if name != "base":
            assert "text_drop" in evals[name] and evals[name]["base_text_qa_accuracy"] == evals["base"]["text_qa_accuracy"]
    assert evals["deeptalk"]["speech_answers"] > 0  # speech answers were decoded and judged
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert [line.split("|")[1].strip() for line in table[2:]] == TABLE
    summary = (out / "summary.md").read_text()
    assert "deeptalk" in summary and "wall time" in summary

    again = _pipeline(out)  # everything is done: every step is skipped, the same table is printed
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before, skipped") >= 2 + len(STEPS) + len(TABLE)
    assert [line for line in again.stdout.splitlines() if line.startswith("|")] == table
