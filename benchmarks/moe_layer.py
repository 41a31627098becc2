"""Forward+backward speed of one DeepSeek-V2 MoE layer: ours vs transformers' ``DeepseekV2Moe``.

Every implementation gets identical weights (ours loads transformers' state dict 1:1) and identical inputs;
the outputs and input gradients of ours must match transformers' within 1e-4 or the script fails. Timed:
forward + backward (``out.backward(grad_out)`` with a fixed random ``grad_out``, so weight and input
gradients), parameter grads reset before each step, warmup then the median over ``--repeats``. The
implementations run interleaved (one step of each per round) so that load from other processes on the
machine spreads evenly over them.

Rows:
    ours grouped_mm   deepomni.model.moe.MoE, torch._grouped_mm path (the default on CPU / Hopper)
    ours loop         the same layer with the per-expert loop (for information)
    hf eager          transformers DeepseekV2Moe, experts_implementation="eager" (its per-expert loop)
    hf grouped_mm     transformers DeepseekV2Moe, experts_implementation="grouped_mm"
    dense matmul      plain torch.mm calls with the expert MLPs' shapes and FLOPs, no routing: all N = T*k
                      routed rows through one [2F, D] / [D, F] expert, the T rows through the shared MLP;
                      forward and backward (input and weight grads) matmuls, nothing else

Expert FLOPs (what GFLOP/s is computed from): a SwiGLU MLP of width W over R rows costs 3 matmuls of
2*R*D*W in the forward and twice that in the backward; routed R = T*k, W = F; shared R = T,
W = n_shared*F. The router (2*T*D*E per matmul) and the elementwise work are not counted.

    python -m benchmarks.moe_layer                 # 4096 tokens (4 x 1024), fp32, CPU
    python -m benchmarks.moe_layer --device cuda
    python -m benchmarks.moe_layer --quick         # smoke test

The layer's shape is a parameter of every function (:class:`MoEShape`; default ``DEFAULT_SHAPE``: hidden 512,
64 experts of width 256, top-6, 2 shared experts): ``benchmarks/gpu/moe_layer.py`` times the same models at
DeepSeek-V2-Lite's shape with ``MoEShape.from_config(cfg)``.

The last printed line is ``speedup_vs_transformers=<hf eager time / ours time>``. Figures go to
``benchmarks/results/moe_layer.json``.
"""

from __future__ import annotations

import datetime as dt
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

from benchmarks.harness import RESULTS as RESULTS_DIR
from benchmarks.harness import parser, save_result
from deepomni.config import load_preset
from deepomni.model.moe import MoE

TOLERANCE = 1e-4  # abs max, outputs and input grads of ours vs transformers
RESULTS = RESULTS_DIR / "moe_layer.json"


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer's shape: hidden size D, routed experts E of width F, top-k, shared experts."""

    hidden: int = 512
    experts: int = 64
    expert_ffn: int = 256
    top_k: int = 6
    shared: int = 2

    @classmethod
    def from_config(cls, cfg) -> MoEShape:
        """The shape of a :class:`deepomni.config.ModelConfig`'s MoE layers."""
        return cls(hidden=cfg.hidden_size, experts=cfg.n_routed_experts, expert_ffn=cfg.moe_intermediate_size,
                   top_k=cfg.num_experts_per_tok, shared=cfg.n_shared_experts)

    def as_dict(self) -> dict[str, int]:
        return {"hidden": self.hidden, "experts": self.experts, "expert_ffn": self.expert_ffn,
                "top_k": self.top_k, "shared": self.shared}


DEFAULT_SHAPE = MoEShape()


# ------------------------------------------------------------------------------------------- models
def build_models(device: torch.device, seed: int, shape: MoEShape = DEFAULT_SHAPE) -> dict[str, torch.nn.Module]:
    """transformers' layer with seeded random weights, and ours loading its state dict."""

    def hf(impl: str) -> DeepseekV2Moe:
        hf_cfg = DeepseekV2Config(
            hidden_size=shape.hidden, n_routed_experts=shape.experts, moe_intermediate_size=shape.expert_ffn,
            num_experts_per_tok=shape.top_k, n_shared_experts=shape.shared, topk_method="greedy",
            routed_scaling_factor=1.0, norm_topk_prob=False, experts_implementation=impl,
        )
        assert hf_cfg._experts_implementation == impl
        return DeepseekV2Moe(hf_cfg)

    hf_eager = hf("eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf_eager.parameters():  # experts and shared experts at initializer_range, router too
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    state = hf_eager.state_dict()
    hf_grouped = hf("grouped_mm")
    hf_grouped.load_state_dict(state, strict=True)

    cfg = load_preset("tiny").replace(
        hidden_size=shape.hidden, n_routed_experts=shape.experts, moe_intermediate_size=shape.expert_ffn,
        num_experts_per_tok=shape.top_k, n_shared_experts=shape.shared, norm_topk_prob=False,
        routed_scaling_factor=1.0,
    )
    ours = {}
    for impl in ("grouped_mm", "loop"):
        m = MoE(cfg.replace(moe_impl=impl))
        m.load_state_dict(state, strict=True)  # same attribute names as transformers: maps 1:1
        ours[impl] = m
    models = {
        "ours grouped_mm": ours["grouped_mm"],
        "ours loop": ours["loop"],
        "hf eager": hf_eager,
        "hf grouped_mm": hf_grouped,
    }
    # eval: ours skips the balance loss (transformers' layer has none); nothing else depends on the mode
    return {name: m.to(device).eval() for name, m in models.items()}


def fwd_bwd(model: torch.nn.Module, x_BLD: torch.Tensor, grad_BLD: torch.Tensor):
    """One training step's worth of layer work; returns (output, input grad) for the checks."""
    model.zero_grad(set_to_none=True)
    x = x_BLD.detach().requires_grad_()
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad_BLD)
    return out.detach(), x.grad


def dense_reference(tokens: int, device: torch.device, seed: int,
                    shape: MoEShape = DEFAULT_SHAPE) -> Callable[[], None]:
    """Plain matmuls with the expert MLPs' shapes and FLOPs (see module doc), forward and backward."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    D, F = shape.hidden, shape.expert_ffn
    mlps = []
    for rows, width in ((tokens * shape.top_k, F), (tokens, shape.shared * F)):
        mlps.append((rand(rows, D), rand(2 * width, D), rand(D, width), rand(rows, D), rand(rows, 2 * width), width))

    def step() -> None:
        for x, w_gu, w_down, grad_y, grad_h, width in mlps:
            h = x @ w_gu.t()  # forward: [R, 2W]
            a = h[:, :width]
            a @ w_down.t()  # [R, D]
            grad_y @ w_down  # backward: grad of a
            grad_y.t() @ a  # grad of w_down
            grad_h @ w_gu  # grad of x
            grad_h.t() @ x  # grad of w_gu

    return step


def expert_flops(tokens: int, shape: MoEShape = DEFAULT_SHAPE) -> int:
    """Forward + backward FLOPs of the routed and shared expert MLPs (3 x forward)."""
    routed = 3 * 2 * tokens * shape.top_k * shape.hidden * shape.expert_ffn
    shared = 3 * 2 * tokens * shape.hidden * shape.shared * shape.expert_ffn
    return 3 * (routed + shared)


# ------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minor_faults() -> int:
    """Page faults of this process so far (fresh pages from the OS, which the kernel zero-fills); -1 where
    unavailable. On CPU a large share of the non-matmul time of these layers."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return -1


def time_interleaved(
    steps: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Milliseconds (and minor page faults) per call of every step, run round-robin so that background
    load hits all of them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    faults: dict[str, list[int]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync(device)
            f0, t0 = minor_faults(), time.perf_counter()
            step()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
            faults[name].append(minor_faults() - f0)
    return times, faults


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check(models: dict[str, torch.nn.Module], x: torch.Tensor, grad: torch.Tensor) -> dict[str, dict]:
    """Outputs and input grads vs transformers eager (abs max <= TOLERANCE, else exit); weight grads are
    reported relative to their largest entry."""
    ref_out, ref_gx = fwd_bwd(models["hf eager"], x, grad)
    ref_w = {n: p.grad.clone() for n, p in models["hf eager"].named_parameters()}
    report, failures = {}, []
    for name, model in models.items():
        if name == "hf eager":
            continue
        out, gx = fwd_bwd(model, x, grad)
        r = {"out_abs_max": max_abs(out, ref_out), "input_grad_abs_max": max_abs(gx, ref_gx)}
        r["weight_grad_rel_max"] = max(
            max_abs(p.grad, ref_w[n]) / ref_w[n].abs().max().item() for n, p in model.named_parameters()
        )
        report[name] = r
        if r["out_abs_max"] > TOLERANCE or r["input_grad_abs_max"] > TOLERANCE or r["weight_grad_rel_max"] > 1e-4:
            failures.append(f"{name}: {r}")
    if failures:
        raise SystemExit("MISMATCH vs transformers eager (tolerance 1e-4):\n  " + "\n  ".join(failures))
    return report


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None, shape: MoEShape = DEFAULT_SHAPE) -> None:
    ap = parser("moe_layer", __doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch x seq)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (seq = tokens / batch)")
    ap.add_argument("--repeats", type=int, default=9, help="timed steps per implementation (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke test: 512 tokens, 2 repeats, 1 warmup")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON results file (default {RESULTS.relative_to(RESULTS.parents[2])}; --quick writes none)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.batch, args.repeats, args.warmup = 512, 2, 2, 1
    if args.tokens % args.batch:
        ap.error("--tokens must be divisible by --batch")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")

    models = build_models(device, args.seed, shape)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.tokens // args.batch, shape.hidden, generator=gen).to(device)
    grad = torch.randn(x.shape, generator=gen).to(device)
    checks = check(models, x, grad)

    steps: dict[str, Callable[[], object]] = {name: (lambda m=m: fwd_bwd(m, x, grad)) for name, m in models.items()}
    steps["dense matmul"] = dense_reference(args.tokens, device, args.seed, shape)
    times, faults = time_interleaved(steps, device, args.warmup, args.repeats)

    flops = expert_flops(args.tokens, shape)
    med = {name: statistics.median(t) for name, t in times.items()}
    rate = {name: flops / (ms * 1e-3) / 1e9 for name, ms in med.items()}
    ours = "ours grouped_mm"
    rows = {
        name: {
            "median_ms": med[name],
            "min_ms": min(times[name]),
            "times_ms": times[name],
            "minor_page_faults_median": int(statistics.median(faults[name])),
            "gflops": rate[name],
            "speedup_vs_hf_eager": med["hf eager"] / med[name],
            "speedup_vs_hf_grouped_mm": med["hf grouped_mm"] / med[name],
            "pct_of_dense_rate": 100 * rate[name] / rate["dense matmul"],
        }
        for name in times
    }

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"MoE layer fwd+bwd: T={args.tokens} ({args.batch}x{args.tokens // args.batch}) D={shape.hidden} "
          f"E={shape.experts} F={shape.expert_ffn} top-{shape.top_k} shared={shape.shared} fp32 | {device_name} "
          f"| torch {torch.__version__} threads={torch.get_num_threads()} | {args.repeats} repeats, median")
    print(f"expert FLOPs per fwd+bwd: {flops / 1e9:.2f} GFLOP")
    print(f"{'implementation':<18}{'ms':>9}{'min ms':>9}{'GFLOP/s':>9}{'vs eager':>10}{'vs hf gmm':>11}{'% dense':>9}"
          f"{'faults':>9}")
    for name, r in rows.items():
        print(f"{name:<18}{r['median_ms']:9.1f}{r['min_ms']:9.1f}{r['gflops']:9.1f}"
              f"{r['speedup_vs_hf_eager']:9.2f}x{r['speedup_vs_hf_grouped_mm']:10.2f}x{r['pct_of_dense_rate']:8.1f}%"
              f"{r['minor_page_faults_median']:9d}")
    for name, c in checks.items():
        print(f"check {name:<16} vs hf eager: out {c['out_abs_max']:.1e}  input grad {c['input_grad_abs_max']:.1e}"
              f"  weight grad (rel) {c['weight_grad_rel_max']:.1e}")
    goals = {
        "3x_faster_than_hf_eager": rows[ours]["speedup_vs_hf_eager"] >= 3.0,
        "not_slower_than_hf_grouped_mm": rows[ours]["speedup_vs_hf_grouped_mm"] >= 1.0,
        "60pct_of_dense_rate": rows[ours]["pct_of_dense_rate"] >= 60.0,
    }
    print("goals: " + "  ".join(f"{g}={'met' if ok else 'MISSED'}" for g, ok in goals.items()))

    out_path = args.out or (None if args.quick else RESULTS)
    if out_path is None:
        print(f"speedup_vs_transformers={rows[ours]['speedup_vs_hf_eager']:.2f}")
        return
    save_result(out_path, {
        "benchmark": "moe_layer",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "shape": {"tokens": args.tokens, "batch": args.batch, **shape.as_dict(), "dtype": "float32"},
        "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
        "expert_gflop_fwd_bwd": flops / 1e9,
        "results": rows, "checks_vs_hf_eager": checks, "goals": goals,
    })
    print(f"speedup_vs_transformers={rows[ours]['speedup_vs_hf_eager']:.2f}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


if __name__ == "__main__":
    main()
