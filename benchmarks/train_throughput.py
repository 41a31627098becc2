"""Training throughput per worker at expert-parallel size 1 and 2 (Ray Train, CPU/gloo or GPU/nccl).

    python -m benchmarks.train_throughput [--data DIR] [--steps 40] [--stage s3_joint] [--gpu]

On one prepared corpus (built here if ``--data`` is not given: 120 training items), runs the same stage
twice from the same init: ep=1 (1 worker, DeepSpeed ZeRO-2) and ep=2 (2 workers, experts sharded, all-to-all
dispatch). Each worker measures tokens/s over collate + forward + backward + optimizer step (not the data
wait), from its own (re)start; the figure per run is rank 0's ``tokens_per_s_run`` at the last step. Prints
both and their ratio, saves ``benchmarks/results/train_throughput.json``; last line
``tokens_per_s_per_worker_ep2=<figure>``.

Note: on a 2-core machine, ep=2 runs two workers on two cores, so per-worker figures include the cores'
contention and the all-to-all over gloo; what the figure shows is the cost of expert parallelism per
worker, not a speedup (which needs workers with their own accelerators).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.harness import command, machine, parser, save_result



def main() -> None:
    ap = parser("train_throughput", __doc__)
    ap.add_argument("--data", help="prepared corpus (deepomni data prepare); default: build one")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--stage", default="s3_joint")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import torch

    from deepomni.checkpoint import save_model
    from deepomni.config import DataConfig, load_preset
    from deepomni.data.pipeline import prepare
    from deepomni.data.synth import SynthConfig, synthesize
    from deepomni.model.modality import moe_layers
    from deepomni.model.model import DeepOmniModel
    from deepomni.ray_env import init_ray
    from deepomni.train.config import TrainConfig
    from deepomni.train.loop import fit
    from deepomni.train.profile import random_assignment

    work = Path(tempfile.mkdtemp(prefix="deepomni-train-bench-"))
    init_ray()
    data = Path(args.data) if args.data else work / "data"
    if not args.data:
        synthesize(SynthConfig(seed=0, sizes={"train": 120, "validation": 4, "test": 4}), data, progress=False)
        prepare(data / "raw", data, DataConfig(seed=0, codec_fit_items=60))
    cfg_m = load_preset("tiny")
    model = DeepOmniModel(cfg_m).init_weights(seed=0)
    assignment = random_assignment(sorted(moe_layers(model)), cfg_m.n_routed_experts, 4, seed=0)
    init = save_model(model, work / "init", assignment)

    figures = {}
    for ep in (1, 2):
        cfg = TrainConfig.from_dict(dict(stage=args.stage, run_name=f"ep{ep}", storage_path=str(work / "runs"),
                                         data=str(data), init=str(init), max_steps=args.steps, lr=1e-3,
                                         num_workers=ep, ep_size=ep, batch_size=args.batch_size,
                                         cpus_per_worker=1.0, use_gpu=args.gpu, log_every=args.steps))
        t0 = time.perf_counter()
        result = fit(cfg, progress=False)
        if result.error is not None:
            raise SystemExit(f"ep={ep} failed: {result.error}")
        m = result.metrics
        figures[f"ep{ep}"] = {"tokens_per_s_per_worker": m["tokens_per_s_run"], "workers": ep,
                              "steps": m["step"], "wall_s": time.perf_counter() - t0}
        print(f"ep={ep}: {m['tokens_per_s_run']:.0f} tokens/s per worker ({ep} worker(s), {m['step']} steps, "
              f"wall {figures[f'ep{ep}']['wall_s']:.0f} s incl. Ray Train start)", flush=True)
    ratio = figures["ep2"]["tokens_per_s_per_worker"] / figures["ep1"]["tokens_per_s_per_worker"]
    out = {"command": command("train_throughput"), "machine": machine(), "stage": args.stage,
           "batch_size": args.batch_size, "device": "gpu" if args.gpu else "cpu",
           "torch_threads": torch.get_num_threads(), **figures, "ep2_over_ep1_per_worker": ratio}
    print(f"ep2/ep1 per worker: {ratio:.2f}")
    save_result("train_throughput", out)
    print(f"tokens_per_s_per_worker_ep2={figures['ep2']['tokens_per_s_per_worker']:.0f}")


if __name__ == "__main__":
    main()
