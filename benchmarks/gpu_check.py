"""The GPU check (issue 15, point 3): the CUDA tests at DeepSeek-V2-Lite size, then the MoE layer, serving and
a training step timed at that size, in one prepared run that writes its figures as JSON.

On the device machine (one H100, its own image: PyTorch 2.11, transformers 5.17; no Ray, no DeepSpeed, no
pydantic, no network), call the device tool's ``run`` with exactly:

    command:   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 && timeout 480 python3 -m benchmarks.gpu_check --device cuda
    carry:     [".whl"]
    timeout_s: 540

``.whl/`` (ignored by ``.git/info/exclude``) holds the wheels the image lacks, cp312 manylinux x86_64 or pure
Python: pydantic, pydantic_core, annotated_types, typing_inspection and typing_extensions (pydantic 2.14 needs
typing-extensions >= 4.16: newer than the image's is harmless) for ``deepomni.config``; snac (pure Python; its
needs torch, numpy, einops, huggingface-hub are in the image); and pytest with pluggy, iniconfig and pygments
(pure Python; packaging comes with transformers) for the ``checks`` section. Without pytest the run still
checks: it calls the test functions itself, and says so (``sections.checks.runner``). The figures come back
as ``$OUT/gpu_check.json`` (and the log ``$OUT/gpu_check.log``); save them under
``benchmarks/results/gpu_check/``. The run is budgeted to well under 8 minutes on an H100; a section that
would start after ``--budget-s`` (default 420 s) is skipped, and the JSON is rewritten after every section,
so an outside ``timeout`` still leaves the finished sections' figures.

    python -m benchmarks.gpu_check --device cpu --preset tiny --threads 1   # every section, tiny (~25 s, 2 cores)
    python -m benchmarks.gpu_check --sections checks,moe_layer               # a subset

Run from the repository root (``benchmarks`` is imported as a package; nothing here touches ``sys.path``).
Sections (each in its own try/except, with its wall time; ``--device cuda`` uses ``SIZES['deepseek-v2-lite']``,
``--preset tiny`` ``SIZES['tiny']``; ``benchmarks/gpu/``, one file each). Everything runs in bf16, fp32 where a
reference needs it.

1. ``checks`` (``benchmarks/gpu/checks.py``): the correctness checks of the CUDA paths are pytest tests marked
   ``cuda``, ``tests/test_cuda_moe.py`` (grouped_mm MoE against the loop, forward and backward; ours against
   transformers' eager MoE layer) and ``tests/test_cuda_decode.py`` (incremental decoding through ``KVCache``
   and ``SlotKVCache`` against the full forward; MLA absorbed against expanded); their docstrings give the
   checks and the tolerances. This section runs them on the run's device, preset and seed (as
   ``DEEPOMNI_CUDA_CHECKS_DEVICE`` / ``_PRESET`` / ``_SEED``) with ``pytest.main([..., "-m", "cuda"])`` in this
   process, or, where pytest is not importable, a direct runner; it records each test's outcome, duration and
   figures. Elsewhere: ``DEEPOMNI_CUDA_CHECKS_DEVICE=cpu python -m pytest -m cuda tests/`` (tiny, CPU).
2. ``moe_layer`` (``benchmarks/gpu/moe_layer.py``): one MoE layer at the preset's shape (DeepSeek-V2-Lite:
   hidden 2048, 64 experts of width 1408, top-6, 2 shared) on ``moe_tokens`` tokens, forward + backward in
   bf16, timed with ``benchmarks.moe_layer``'s models, steps and interleaved timer (the shape passed to them):
   ours (grouped_mm, loop), transformers' ``DeepseekV2Moe`` (grouped_mm, eager) and the dense matmuls of the
   same FLOPs. Goals: ours >= 1.0x transformers' grouped_mm, >= 50% of the dense rate.
3. ``serving`` (``benchmarks/gpu/serving.py``): the preset's model (random weights, bf16; the tiny preset with
   7 codec channels) with SNAC's architecture as the vocoder (random weights; tiny: a narrow SNAC),
   in-process as ``benchmarks.serve_latency`` measures it (its ``InProcess`` and ``measure``; the spoken
   question is random log-mel features through the speech encoder): time to first audio p50 / p99 for 1 and
   ``serve_sessions`` concurrent sessions, the concurrency gain; the decode step time at 1, 16 and 64 rows
   (``BatchEngine.step``, text-only and speech sessions, and the model's forward alone over a
   ``SlotKVCache``); one MLA layer at the decode shape, absorbed and expanded. Goal: first audio under 250 ms
   for one session.
4. ``training`` (``benchmarks/gpu/training.py``): a ``train_layers``-layer slice of the preset at full width
   and vocabulary in bf16 with fp32 master weights and torch AdamW (no DeepSpeed): step time, tokens/s, peak
   memory; and the memory plan of the whole model on 8 GPUs with ZeRO-2 and expert parallelism 8, from the
   meta-device model (formula in the JSON).

Timing on a GPU: ``torch.cuda.synchronize`` before and after each timed call, warmup calls first, medians.
The JSON records torch / transformers versions, the device, dtype, sizes and each section's wall time;
``forbidden_modules_loaded`` lists ray / deepspeed if anything this run imported pulled them in.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.common import (BF16_FACTOR, BF16_FLOOR, FORBIDDEN, FP32_TOL_LAYER, FP32_TOL_LOGITS, SIZES,
                                   Context, free_memory, gib)
from benchmarks.harness import RESULTS, ROOT, parser

DEFAULT_OUT = RESULTS / "gpu_check"
SECTIONS = ("checks", "moe_layer", "serving", "training")
CHECK_RUNNERS = ("auto", "pytest", "direct")


def section_runners(checks_runner: str = "auto") -> dict[str, Callable[[Context], dict]]:
    """Each section's function, its module (``benchmarks/gpu/<section>.py``) imported when the section starts:
    an import that fails there fails that section alone, and ``--help`` stays light."""

    def section(name: str, **kwargs: Any) -> Callable[[Context], dict]:
        def run_section(ctx: Context) -> dict:
            module = importlib.import_module(f"benchmarks.gpu.{name}")
            return getattr(module, f"section_{name}")(ctx, **kwargs)

        return run_section

    return {"checks": section("checks", runner=checks_runner), "moe_layer": section("moe_layer"),
            "serving": section("serving"), "training": section("training")}


# ------------------------------------------------------------------------------------------- main
def environment(ctx: Context) -> dict:
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
           "numpy": version("numpy"), "snac": version("snac"), "pydantic": version("pydantic"),
           "device": str(ctx.device), "dtype": "bfloat16", "preset": ctx.preset, "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        env.update({"device_name": props.name, "capability": list(torch.cuda.get_device_capability(ctx.device)),
                    "gpu_memory_gib": gib(props.total_memory), "multiprocessors": props.multi_processor_count,
                    "cuda": torch.version.cuda})
    else:
        env["device_name"] = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")]
            env["device_name"] = names[0] if names else env["device_name"]
    with contextlib.suppress(Exception):  # not benchmarks.harness.machine(): it imports Ray where Ray is installed
        import subprocess

        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=5).stdout.strip() or None
    return env


def summary(result: dict) -> dict:
    s = result["sections"]
    out: dict[str, Any] = {}
    c = s.get("checks", {})
    if c.get("status") == "ok":
        out.update({"checks_passed": c["passed"], "checks_runner": c["runner"], "checks_counts": c["counts"],
                    "checks_not_passed": [k for k, t in c["tests"].items() if t["outcome"] != "passed"]})
        moe_check = [t for k, t in c["tests"].items() if k.endswith("::test_moe_layer_matches_transformers_eager")]
        if moe_check:
            out["moe_check_passed"] = moe_check[0]["outcome"] == "passed"
    m = s.get("moe_layer", {})
    if m.get("status") == "ok":
        out.update({"moe_ours_vs_transformers_grouped_mm": m["ratios"]["ours_vs_hf_grouped_mm"],
                    "moe_ours_pct_of_dense_rate": m["ratios"]["ours_pct_of_dense_rate"],
                    "moe_ours_tflops": m["rows"]["ours grouped_mm"]["tflops"],
                    **{f"goal_moe_{k}": v for k, v in m["goals"].items()}})
    v = s.get("serving", {})
    if v.get("status") == "ok":
        out.update({"ttfa_1_session_p50_ms": v["ttfa"]["1_session"]["p50_ms"],
                    "ttfa_1_session_p99_ms": v["ttfa"]["1_session"]["p99_ms"],
                    "ttfa_concurrent_sessions": v["ttfa"]["concurrent"]["sessions"],
                    "ttfa_concurrent_p50_ms": v["ttfa"]["concurrent"]["p50_ms"],
                    "ttfa_concurrent_p99_ms": v["ttfa"]["concurrent"]["p99_ms"],
                    "goal_ttfa_1_session_under_250ms": v["goal_ttfa_1_session_under_250ms"],
                    **{f"decode_step_ms_{r}_rows": x["step_ms"] for r, x in v["decode_step"]["text_rows"].items()},
                    "decode_attention_absorbed_ms": v["decode_attention"]["absorbed_ms"],
                    "decode_attention_expanded_ms": v["decode_attention"]["expanded_ms"]})
    t = s.get("training", {})
    if t.get("status") == "ok":
        out.update({"train_slice_tokens_per_s": t["tokens_per_s"], "train_slice_peak_memory_gib": t["peak_memory_gib"],
                    "plan_per_gpu_states_gib": t["memory_plan"]["per_gpu"]["total_states_gib"]})
    out["sections_ok"] = [k for k in SECTIONS if s.get(k, {}).get("status") == "ok"]
    out["sections_failed"] = [k for k in SECTIONS if s.get(k, {}).get("status") == "error"]
    out["sections_skipped"] = [k for k in SECTIONS if s.get(k, {}).get("status") == "skipped"]
    return out


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = parser("gpu_check", __doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--preset", default=None, choices=sorted(SIZES),
                    help="model preset and sizes (default: deepseek-v2-lite on cuda, tiny on cpu)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=None, help=f"output folder (default $OUT, else {DEFAULT_OUT})")
    ap.add_argument("--budget-s", type=float, default=420.0, help="no section starts after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--checks-runner", default="auto", choices=CHECK_RUNNERS,
                    help="the checks section's runner of the CUDA tests: pytest when importable (auto), else direct")
    args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = args.preset or ("deepseek-v2-lite" if args.device.startswith("cuda") else "tiny")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    loaded_before = set(sys.modules)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references are fp32
    torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(device, args.preset, SIZES[args.preset], args.seed, args.out)
    json_path, log_path = args.out / "gpu_check.json", args.out / "gpu_check.log"
    result: dict[str, Any] = {
        "script": "python -m benchmarks.gpu_check", "args": {k: str(v) for k, v in vars(args).items()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "env": environment(ctx), "sizes": dataclasses.asdict(ctx.size),
        "tolerances": {"metric": "normwise relative error ||a - ref||_F / ||ref||_F",
                       "bf16": f"pass if <= max({BF16_FACTOR} x baseline, {BF16_FLOOR:.4g}); baseline = the "
                               "reference path's own bf16 error against its fp32 result",
                       "fp32_logits": FP32_TOL_LOGITS, "fp32_one_layer": FP32_TOL_LAYER},
        "sections": {},
    }
    ctx.log(f"gpu_check: {args.preset} on {result['env']['device_name']} ({device}), torch {torch.__version__}, "
            f"transformers {result['env']['transformers']}; sections {','.join(args.sections)} -> {json_path}")
    runners = section_runners(args.checks_runner)
    for name in SECTIONS:
        if name not in args.sections:
            continue
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            result["sections"][name] = {"status": "skipped",
                                        "reason": f"budget: {elapsed:.0f} s > {args.budget_s:.0f} s"}
            ctx.log(f"[{name}] skipped (time budget)")
            continue
        ctx.log(f"[{name}] ...")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            sec = runners[name](ctx)
            sec = {"status": "ok", **sec}
        except Exception as e:  # one section failing leaves the others' figures
            sec = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            ctx.log(sec["traceback"])
        sec["wall_s"] = time.perf_counter() - t0
        result["sections"][name] = sec
        free_memory(device)
        ctx.log(f"[{name}] {sec['status']} in {sec['wall_s']:.1f} s")
        result["summary"] = summary(result)
        result["total_wall_s"] = time.perf_counter() - t_start
        write_json(json_path, result)
        log_path.write_text("\n".join(ctx.log_lines) + "\n")
    result["forbidden_modules_loaded"] = [m for m in FORBIDDEN if m in sys.modules and m not in loaded_before]
    result["summary"] = summary(result)
    result["total_wall_s"] = time.perf_counter() - t_start
    ctx.log("summary:")
    for k, v in result["summary"].items():
        ctx.log(f"  {k}: {v:.3g}" if isinstance(v, float) else f"  {k}: {v}")
    ctx.log(f"forbidden modules loaded: {result['forbidden_modules_loaded'] or 'none'}")
    ctx.log(f"total {result['total_wall_s']:.1f} s; wrote {json_path}")
    write_json(json_path, result)
    log_path.write_text("\n".join(ctx.log_lines) + "\n")
    failed = result["summary"]["sections_failed"] or not all(
        sec.get("passed", True) for sec in result["sections"].values() if sec.get("status") == "ok")
    return 1 if failed or result["forbidden_modules_loaded"] else 0


if __name__ == "__main__":
    sys.exit(main())
