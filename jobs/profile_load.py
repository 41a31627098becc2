"""Measure modality load and choose the speech experts (PAPER.md "Adaptive modality expert assignment").

    python -m jobs.profile_load --checkpoint ckpt/s1 --data data --out ckpt/s1-experts [--n-speech 20%]
    python -m jobs.profile_load ... --random --seed 0      # the random-assignment ablation

Writes ``experts.json`` (copy it into the checkpoint directory for the next stages), ``load.json``,
``load.csv`` and ``load.png`` (heatmap). See ``deepomni/train/profile.py`` for the definitions.
"""

from __future__ import annotations

import argparse
import json
import sys

from deepomni.train.profile import run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.profile_load", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="model checkpoint directory (deepomni.checkpoint)")
    p.add_argument("--data", required=True, help="dataset directory holding tokenized/ (deepomni data prepare)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-speech", default="20%", help="speech experts per layer: a count or a percentage of the routed experts")
    p.add_argument("--split", default="train")
    p.add_argument("--max-items", type=int, default=None, help="profile only the first N rows of the split")
    p.add_argument("--random", action="store_true", help="draw the speech experts at random (ablation)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random")
    a = p.parse_args(argv)
    summary = run(a.checkpoint, a.data, a.out, a.n_speech, a.split, a.max_items, a.random, a.seed)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
