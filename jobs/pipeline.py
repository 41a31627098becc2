"""The whole recipe, in order, on one Ray session:

    synth corpus -> prepare -> text_pretrain (base) -> profile modality load (expert assignment)
    -> s1_align -> s2_speech_experts -> s2_text_experts -> s3_joint -> evaluate (vs base)
    and the full_finetune baseline from the same base, evaluated the same way.

    python -m jobs.pipeline [--out runs/pipeline] [--config tiny] [--steps-scale 1.0] [--n-speech 25%]

Ends with a table: base, DeepTalk recipe, full fine-tune: text QA (exact match, and teacher-forced token
accuracy: the text ability a tiny model measurably has), the relative text drop vs base, spoken QA, ASR,
codec accuracy (definitions: deepomni/train/evaluate.py).
Steps already done (their output exists) are skipped, so a re-run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RECIPE = ("s1_align", "s2_speech_experts", "s2_text_experts", "s3_joint")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/pipeline")
    ap.add_argument("--config", default="tiny", help="training preset or TrainConfig JSON")
    ap.add_argument("--train-items", type=int, default=400)
    ap.add_argument("--eval-items", type=int, default=30, help="held-out items per task")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps")
    ap.add_argument("--n-speech", default="25%", help="speech experts per layer (count or percent)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from deepomni.config import DataConfig
    from deepomni.data.pipeline import prepare
    from deepomni.data.synth import SynthConfig, synthesize
    from deepomni.ray_env import init_ray
    from deepomni.train import evaluate, profile
    from deepomni.train.config import TrainConfig
    from deepomni.train.loop import fit

    out = Path(args.out).resolve()
    data, runs = out / "data", out / "runs"
    t_start = time.perf_counter()
    times: dict[str, float] = {}

    def step(name: str, done: bool, fn) -> None:
        if done:
            print(f"[pipeline] {name}: done before, skipped", flush=True)
            return
        t0 = time.perf_counter()
        print(f"[pipeline] {name} ...", flush=True)
        fn()
        times[name] = time.perf_counter() - t0
        print(f"[pipeline] {name}: {times[name]:.0f} s", flush=True)

    init_ray()
    step("synth", (data / "summary.json").exists(), lambda: synthesize(
        # the test split holds ~eval_items items of each of asr / text_qa / spoken_qa (tts is 1/10 of items)
        SynthConfig(seed=args.seed, sizes={"train": args.train_items, "validation": args.eval_items // 2,
                                           "test": args.eval_items * 10 // 3}), data, progress=False))
    step("prepare", (data / "prepare_summary.json").exists(),
         lambda: prepare(data / "raw", data, DataConfig(seed=args.seed, codec_fit_items=100)))

    def train(stage: str, run: str, init: Path | None, assignment: Path | None) -> Path:
        final = runs / run / "final"

        def go():
            cfg = TrainConfig.load(args.config, {"stage": stage, "run_name": run, "storage_path": str(runs),
                                                 "data": str(data), "seed": args.seed,
                                                 "init": str(init) if init else None,
                                                 "assignment": str(assignment) if assignment else None})
            cfg.max_steps = max(1, round(cfg.max_steps * args.steps_scale))
            result = fit(cfg)
            if result.error is not None:
                raise RuntimeError(f"stage {stage} failed: {result.error}")

        step(f"train {stage}", (final / "model.safetensors").exists(), go)
        return final

    base = train("text_pretrain", "base", None, None)
    experts = out / "profile" / "experts.json"
    step("profile load", experts.exists(), lambda: profile.run(base, data, out / "profile", n_speech=args.n_speech))
    ckpt = base
    for stage in RECIPE:
        ckpt = train(stage, stage, ckpt, experts)
    ff = train("full_finetune", "full_finetune", base, None)

    results = {}
    for name, model_dir in (("base", base), ("deeptalk", ckpt), ("full_finetune", ff)):
        ev_dir = out / "eval" / name
        step(f"evaluate {name}", (ev_dir / "eval.json").exists(),
             lambda: evaluate.run(model_dir, data, ev_dir, base=None if model_dir == base else base,
                                  cfg=evaluate.EvalConfig(max_items=args.eval_items)))
        results[name] = json.loads((ev_dir / "eval.json").read_text())

    wall = time.perf_counter() - t_start
    cols = [("text QA exact", "text_qa_accuracy"), ("text QA token acc", "text_qa_token_accuracy"),
            ("relative text drop (token acc)", "text_token_drop"), ("spoken QA exact", "spoken_qa_accuracy"),
            ("spoken QA token acc", "spoken_qa_token_accuracy"), ("ASR WER", "asr_wer"),
            ("codec acc", "codec_accuracy")]
    lines = ["| model | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        m = r.get("metrics", r)
        lines.append(f"| {name} | " + " | ".join("-" if m.get(k) is None else f"{m[k]:.3f}" for _, k in cols) + " |")
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + f"\n\nwall time {wall:.0f} s; steps: {json.dumps(times)}\n")
    print(table)
    print(f"[pipeline] wall time {wall:.0f} s ({wall / 60:.1f} min); summary in {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
