"""Run one training stage on Ray Train (PAPER.md "Training stages"; stages in ``deepomni/train/stages.py``).

    python -m jobs.train --stage text_pretrain --config tiny --data data/synth --run-name base
    python -m jobs.train --stage s1_align --config tiny --init runs/base/final --run-name s1
    python -m jobs.train --stage s2_speech_experts --config tiny --init runs/s1/final --run-name s21 \
        --assignment ckpt/s1-experts/experts.json --num-workers 2 --ep-size 2

``--config`` is a JSON file or a preset name under ``deepomni/presets/train``; every TrainConfig field is
also a flag (``--max-steps 20 --lr 1e-3``). Re-running the same ``--run-name`` resumes from its latest
checkpoint. The finished model lands in ``<storage-path>/<run-name>/final``. Runs on the Ray cluster named
by ``RAY_ADDRESS``, else on an embedded local Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from deepomni.config import flag_type
from deepomni.train.config import TrainConfig


def parse(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="TrainConfig JSON file or preset name (e.g. tiny)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name != "stages":
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=flag_type(hints[f.name]),
                           default=None)
    a = vars(p.parse_args(argv))
    config = a.pop("config")
    return TrainConfig.load(config, a)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    from deepomni.ray_env import init_ray
    from deepomni.train.loop import fit

    init_ray()
    print(f"[train] stage={cfg.stage} run={cfg.run_name} workers={cfg.num_workers} ep={cfg.ep_size} "
          f"zero={cfg.zero_stage} batch={cfg.batch_size} lr={cfg.lr} steps={cfg.max_steps}", flush=True)
    result = fit(cfg)
    if result.error is not None:
        print(f"[train] failed: {result.error}", file=sys.stderr)
        return 1
    m = result.metrics or {}
    print(f"[train] done: step {m.get('step')} (resumed from {m.get('start_step')}), loss {m.get('loss', float('nan')):.4f}, "
          f"{m.get('tokens_per_s', 0):.0f} tokens/s per worker, checkpoint {result.checkpoint.path if result.checkpoint else None}")
    print(f"[train] final model: {cfg.storage_path}/{cfg.run_name}/final")
    return 0


if __name__ == "__main__":
    sys.exit(main())
