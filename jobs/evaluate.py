"""Evaluate a checkpoint on a held-out split (PAPER.md "Evaluation"): text QA, spoken QA, ASR, speech.

    python -m jobs.evaluate --checkpoint ckpt/s3 --data data --out eval/s3 [--base ckpt/base] [--split test]

Writes ``eval.json`` (metrics + config), ``eval.md`` (a Markdown table) and ``items.jsonl`` (per-item
predictions). Metric definitions: ``deepomni/train/evaluate.py``.
"""

from __future__ import annotations

import argparse
import sys

from deepomni.train.evaluate import EvalConfig, markdown, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="model checkpoint directory")
    p.add_argument("--base", default=None, help="base checkpoint: its text_qa accuracy gives the relative text drop")
    p.add_argument("--data", required=True, help="dataset directory holding tokenized/")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", default="test")
    p.add_argument("--max-items", type=int, default=None, help="at most N items per task")
    p.add_argument("--tokenizer", default="bytes", help="the tokenizer the data was prepared with")
    p.add_argument("--no-speech", action="store_true", help="skip decoding and judging speech answers")
    p.add_argument("--margin", type=int, default=8, help="decoding steps beyond 1.5 x the reference answer")
    p.add_argument("--seed", type=int, default=0, help="codec sampling seed")
    a = p.parse_args(argv)
    cfg = EvalConfig(tokenizer=a.tokenizer, max_items=a.max_items, margin=a.margin, speech=not a.no_speech, seed=a.seed)
    result = run(a.checkpoint, a.data, a.out, a.base, a.split, cfg)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
