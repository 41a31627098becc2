"""The whole recipe and its baselines, in order, on one Ray session (the steps are data:
``deepomni.train.stages.RECIPE`` and ``BASELINES``):

    synth corpus -> prepare -> pretrain the speech encoder (CTC; only when the preset has no Whisper dir)
    -> base (text_pretrain) -> s1_align -> profile the aligned model -> s2_speech_experts
    -> s2_text_experts ("deeptalk_before_s3") -> s3_joint ("deeptalk")
    baselines: random assignment (same stages), full fine-tune (all tasks) and speech fine-tune (speech
    tasks), both compute-matched to the recipe's steps after the base
    -> evaluate every model (held-out split, speech output judged by pocketsphinx) -> one table

    python -m jobs.pipeline [--out runs/pipeline] [--config tiny] [--steps-scale 1.0] [--n-speech 25%]
                            [--baselines random_assignment,full_finetune,speech_finetune] [--seed 0]

Steps already done (their output exists) are skipped, so a re-run continues where it stopped. The table's
columns are defined in deepomni/train/evaluate.py; docs/train.md says what each measures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from deepomni.train.stages import BASELINES, MODELS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/pipeline")
    ap.add_argument("--config", default="tiny", help="training preset or TrainConfig JSON")
    ap.add_argument("--train-items", type=int, default=1500, help="items in the train split of the corpus")
    ap.add_argument("--eval-items", type=int, default=40, help="held-out items per task")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps")
    ap.add_argument("--encoder-steps", type=int, default=None, help="CTC pretraining steps of the speech encoder")
    ap.add_argument("--n-speech", default="25%", help="speech experts per layer (count or percent)")
    ap.add_argument("--baselines", default=",".join(BASELINES), help="comma-separated, of " + ", ".join(BASELINES))
    ap.add_argument("--seed", type=int, default=0, help="seeds the corpus, the models and the random assignment")
    args = ap.parse_args(argv)
    baselines = tuple(b for b in args.baselines.split(",") if b)

    from deepomni.ray_env import init_ray
    from deepomni.train.recipe import Pipeline

    init_ray()
    pipe = Pipeline(Path(args.out).resolve(), config=args.config, seed=args.seed, steps_scale=args.steps_scale,
                    n_speech=args.n_speech, train_items=args.train_items, eval_items=args.eval_items,
                    encoder_steps=args.encoder_steps)
    t_start = time.perf_counter()
    pipe.prepare_data()
    pipe.train_all(baselines)
    results = pipe.evaluate_all([m for m, run in MODELS.items() if run in pipe.runs(baselines)])
    wall = time.perf_counter() - t_start
    table = pipe.table(results)
    seeds = (f"One seed ({args.seed}), {args.eval_items} held-out items a task: differences between rows can be "
             "noise. The table over seeds with mean and spread, every baseline at full steps: "
             "benchmarks/results/recipe_table.md (made by `python benchmarks/recipe_table.py`).")
    (pipe.out / "summary.md").write_text(f"{table}\n\n{seeds}\n\nwall time {wall:.0f} s; steps: "
                                         f"{json.dumps(pipe.times)}\n")
    print(table)
    print(seeds)
    print(f"[pipeline] wall time {wall:.0f} s ({wall / 60:.1f} min); summary in {pipe.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
