"""Memory of the serving replicas and of checkpoint loading, at a size where the backbone dwarfs the encoder.

    python -m benchmarks.serve_memory                       # ~3 min on 2 cores, ~8 GB of disk under --work
    python -m benchmarks.serve_memory --tree /tmp/before    # the same measurements on another checkout (before/after)

The model is ``small`` widened to a mid size that fits a laptop (:data:`MID`: a 621M-parameter MoE backbone,
a Whisper-base-sized 22M encoder + projector: 28x, as DeepSeek-V2-Lite's 15.7B is 25x Whisper-large's
encoder), random weights saved once under ``--work`` as an fp32 checkpoint (one file, what training writes)
and a bf16 one (in 512 MiB shards + index). Each measurement runs in a fresh process and reports its peak
resident memory (``VmHWM``) above the resident memory it had after importing everything it uses (so
the figure is what the measured call added), against the bytes of the weights it holds:

* ``encoder_replica`` / ``backbone_replica`` / ``vocoder_replica``: the app's deployment classes constructed
  as Serve constructs them (``SpeechEncoder``, ``Backbone`` without a vocoder, ``Vocoder``; warm-up
  included) on the fp32 checkpoint, on the CPU;
* ``load_bf16``: :func:`deepomni.checkpoint.load_model` of the bf16 checkpoint in bf16 (the goal: no full
  fp32 copy, peak within 1.3x of the weights).

``--tree DIR`` runs the measuring processes on the code of another checkout (``git worktree add DIR <commit>``)
with this script's driver, so one run compares before and after; a measurement the other code cannot do
(e.g. sharded checkpoints before they existed) is reported as its error. Saves
``benchmarks/results/serve_memory.json``; the last line is ``encoder_replica_peak_over_weights=<ratio>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Nothing from benchmarks.harness at the top: the measuring children run this file on another checkout's code
# (--tree), which may have no harness (it came with issue 27); only the parent imports it, in main().
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_memory.json"
MEASURES = ("encoder_replica", "backbone_replica", "vocoder_replica", "load_bf16")
# small's layout, widened: backbone 621M parameters (584M of them routed experts), speech input 22M
MID = dict(hidden_size=1024, num_hidden_layers=12, intermediate_size=2816, moe_intermediate_size=512,
           n_routed_experts=32, num_attention_heads=8, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
           v_head_dim=64)
MID_ENCODER = dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                   max_source_positions=1500)


def mid_config():
    from deepomni.config import load_preset

    cfg = load_preset("small")
    return cfg.replace(**MID, speech_encoder=dataclasses.replace(cfg.speech_encoder, **MID_ENCODER))


def status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, in MiB. Not ``ru_maxrss``: that one
    survives ``exec`` and would report the driver's peak, which had the model in memory when it forked."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def weight_mib(module) -> float:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20


def touch(module) -> None:
    """Read one element of every page of every weight: a checkpoint's tensors may be memory-mapped from the
    file and resident only once used; a replica uses them all (every expert, sooner or later)."""
    import torch

    for t in module.state_dict().values():
        if t.numel():
            t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].to(torch.float32).sum()


# ------------------------------------------------------------------------------ one measurement (child)
def measure(kind: str, ckpt: str) -> dict:
    """Runs in its own process: import everything, note RSS, do ``kind``, report the peak above that."""
    import torch  # noqa: F401  (imported before the baseline, as everything below)
    import transformers.models.whisper.modeling_whisper  # noqa: F401

    import deepomni.audio  # noqa: F401
    import deepomni.checkpoint as ck
    import deepomni.serve.engine  # noqa: F401
    from deepomni.serve.config import AppConfig
    from serve_apps.backbone import Backbone
    from serve_apps.encoder import SpeechEncoder
    from serve_apps.vocoder import Vocoder

    os.environ.setdefault("DEEPOMNI_CACHE", str(Path(ckpt).parent / "cache"))
    cfg = AppConfig(checkpoint=ckpt, device="cpu", max_rows=4, kept_contexts=4)
    if kind == "vocoder_replica":
        Vocoder.func_or_class(cfg)  # fit the cached default codec before the baseline: a one-off, not a replica's
    baseline, t = status_mib("VmRSS"), time.perf_counter()
    if kind == "encoder_replica":
        held = SpeechEncoder.func_or_class(cfg).encoding.speech
    elif kind == "backbone_replica":
        held = Backbone.func_or_class(cfg, None).model
    elif kind == "vocoder_replica":
        Vocoder.func_or_class(cfg)
        held = None  # the codec: not a model part (its own directory, a few MB)
    elif kind == "load_bf16":
        held = ck.load_model(ckpt, dtype=torch.bfloat16)[0]
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - t
    if held is not None:
        touch(held)
    peak = status_mib("VmHWM")
    out = {"baseline_mib": round(baseline, 1), "peak_mib": round(peak, 1), "added_mib": round(peak - baseline, 1),
           "seconds": round(seconds, 2)}
    if held is not None and hasattr(held, "state_dict"):
        names = [n for n, _ in held.named_parameters()]
        out |= {"params": sum(p.numel() for p in held.parameters()), "weights_mib": round(weight_mib(held), 1),
                "has_speech_encoder": any(n.startswith(("encoder.", "speech.encoder.")) for n in names),
                "has_experts": any(".experts." in n for n in names)}
        out["peak_over_weights"] = round(out["added_mib"] / max(out["weights_mib"], 1e-9), 3)
    return out


# ------------------------------------------------------------------------------------------- driver
def checkpoints(work: Path) -> tuple[Path, Path]:
    """The fp32 (one file) and bf16 (512 MiB shards) checkpoints of :func:`mid_config`, made once."""
    import torch

    from deepomni.checkpoint import save_model
    from deepomni.model.model import DeepOmniModel

    fp32, bf16 = work / "mid-fp32", work / "mid-bf16"
    if not (bf16 / "config.json").is_file():
        print("building the mid-size checkpoints (random weights, seeded) ...", flush=True)
        torch.manual_seed(0)
        model = DeepOmniModel(mid_config()).init_weights(seed=0)
        save_model(model, fp32)
        save_model(model.to(torch.bfloat16), bf16, max_shard_bytes=512 * 2**20)
        del model
    return fp32, bf16


def run_child(kind: str, ckpt: Path, tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--ckpt", str(ckpt), "--tree", str(tree)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "serve_memory"), help="where the checkpoints go")
    ap.add_argument("--tree", action="append", default=None,
                    help="checkout whose code the measurements run (repeatable; default: this one)")
    ap.add_argument("--only", default=",".join(MEASURES), help=f"comma-separated subset of {MEASURES}")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.child:  # run_child put the tree first on PYTHONPATH: its code is what this process imports
        print(json.dumps(measure(args.child, args.ckpt)))
        return

    from benchmarks.harness import machine
    from deepomni.model.model import count_parameters

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    fp32, bf16 = checkpoints(work)
    counts = count_parameters(mid_config(), include_speech_encoder=True)
    trees = [Path(t).resolve() for t in (args.tree or [str(ROOT)])]
    result = {"model": {"config": {**MID, "speech_encoder": MID_ENCODER}, **counts},
              "machine": machine(), "trees": {}}
    for tree in trees:
        rows = {}
        for kind in args.only.split(","):
            r = run_child(kind, bf16 if kind == "load_bf16" else fp32, tree)
            rows[kind] = r
            print(f"{tree.name:>12} {kind:<17} " + "  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
        result["trees"][str(tree)] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    last = result["trees"][str(trees[-1])].get("encoder_replica", {})
    print(f"encoder_replica_peak_over_weights={last.get('peak_over_weights')}")


if __name__ == "__main__":
    main()
