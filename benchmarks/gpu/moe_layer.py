"""The GPU run's ``moe_layer`` section: one MoE layer at the preset's shape (DeepSeek-V2-Lite: hidden 2048, 64
experts of width 1408, top-6, 2 shared) on ``moe_tokens`` tokens, forward + backward in bf16, timed with
``benchmarks.moe_layer``'s own models, steps and interleaved timer, the shape passed as a parameter
(``MoEShape.from_config``): ours (grouped_mm, loop), transformers' ``DeepseekV2Moe`` (grouped_mm, eager) and the
dense matmuls of the same FLOPs. Goals: ours >= 1.0x transformers' grouped_mm, >= 50% of the dense rate. (The
output / input-grad check of ours against transformers' eager in fp32 is the CUDA test
``tests/test_cuda_moe.py::test_moe_layer_matches_transformers_eager``, run by the ``checks`` section.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks import moe_layer as ml
from benchmarks.gpu.common import Context, default_dtype, load_cfg, med, peak_memory


def section_moe_layer(ctx: Context) -> dict:
    cfg, size, dev = load_cfg(ctx.preset), ctx.size, ctx.device
    T, B = size.moe_tokens, size.moe_batch
    shape = ml.MoEShape.from_config(cfg)
    models = ml.build_models(dev, ctx.seed, shape)  # identical weights (ours loads transformers' state dict)
    models = {name: m.to(torch.bfloat16) for name, m in models.items()}
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    x = torch.randn(B, T // B, cfg.hidden_size, generator=gen).to(dev, torch.bfloat16)
    grad = torch.randn(x.shape, generator=gen).to(dev, torch.bfloat16)
    steps: dict[str, Callable[[], object]] = {name: (lambda m=m: ml.fwd_bwd(m, x, grad)) for name, m in models.items()}
    dense_dtype = torch.bfloat16
    try:
        with default_dtype(torch.bfloat16):  # its operands drawn in bf16
            steps["dense matmul"] = ml.dense_reference(T, dev, ctx.seed, shape)
    except (TypeError, RuntimeError):  # a torch that refuses a bf16 default dtype: fp32 operands
        dense_dtype = torch.float32
        steps["dense matmul"] = ml.dense_reference(T, dev, ctx.seed, shape)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    times, _faults = ml.time_interleaved(steps, dev, size.moe_warmup, size.moe_repeats)
    flops = ml.expert_flops(T, shape)
    ms = {name: med(t) for name, t in times.items()}
    rows = {name: {"median_ms": ms[name], "min_ms": min(t), "tflops": flops / (ms[name] * 1e-3) / 1e12}
            for name, t in times.items()}
    ours = "ours grouped_mm"
    ratios = {"ours_vs_hf_grouped_mm": ms["hf grouped_mm"] / ms[ours],
              "ours_vs_hf_eager": ms["hf eager"] / ms[ours],
              "ours_pct_of_dense_rate": 100 * rows[ours]["tflops"] / rows["dense matmul"]["tflops"]}
    goals = {"at_least_1x_transformers_grouped_mm": bool(ratios["ours_vs_hf_grouped_mm"] >= 1.0),
             "at_least_50pct_of_dense_rate": bool(ratios["ours_pct_of_dense_rate"] >= 50.0)}
    del models, steps, x, grad
    ctx.log(f"  moe_layer: ours {ms[ours]:.2f} ms, {ratios['ours_vs_hf_grouped_mm']:.2f}x transformers' grouped_mm, "
            f"{ratios['ours_pct_of_dense_rate']:.0f}% of the dense rate")
    return {"shape": {**shape.as_dict(), "tokens": T, "batch": B, "dtype": "bfloat16",
                      "dense_dtype": str(dense_dtype).removeprefix("torch.")},
            "expert_tflop_fwd_bwd": flops / 1e12, "repeats": size.moe_repeats, "warmup": size.moe_warmup,
            "rows": rows, "ratios": ratios, "goals": goals,
            "check": "tests/test_cuda_moe.py::test_moe_layer_matches_transformers_eager (checks section)",
            **peak_memory(dev)}
