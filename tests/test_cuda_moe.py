"""CUDA tests of the MoE layer at DeepSeek-V2-Lite width (hidden 2048, 64 experts of width 1408, top-6, 2 shared
experts), forward and backward in bf16 on the GPU, against fp32 references of the same (bf16) weights:

* ``test_moe_grouped_mm_matches_loop``: ``moe_impl="grouped_mm"`` in bf16 against the per-expert loop in fp32
  (output, input grad, expert, router and shared-expert weight grads); the loop in bf16 is the baseline. On a
  GPU the fp32 loop is also compared with the same on the CPU (tokens whose routing agrees; the weight grads
  too when every token's routing agrees), within 1e-4.
* ``test_moe_layer_matches_transformers_eager``: ours (grouped_mm, bf16) at ``benchmarks/moe_layer.py``'s
  models (transformers' ``DeepseekV2Moe`` weights loaded into ours) against transformers' eager layer in fp32
  (output and input grad); transformers' grouped_mm in bf16 is the baseline.

Tolerances (normwise relative error ``||a - ref|| / ||ref||``, which a rare routing flip between two roundings
moves by far less than its own size, unlike a max-abs error): a bf16 path passes when its error is at most
``max(3 x baseline, 4 x 2^-8)``: a correct path differs from exact arithmetic by rounding alone, so it may round
differently from the reference path but not by much more (3x) than the reference path's own bf16 error; the
floor is four bf16 units of rounding (2^-8 each), for when the baseline is itself tiny. A wrong path
(mis-routed, mis-scaled) errs by O(1). fp32 against fp32 (one layer, same routing): 1e-4.

Marked ``cuda`` and run as ``tests/test_cuda_decode.py``'s docstring says (skipped without CUDA unless
``DEEPOMNI_CUDA_CHECKS_DEVICE=cpu``; on the device machine through ``python -m benchmarks.gpu_check``, with or
without pytest: this module imports without pytest, Ray or DeepSpeed).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from benchmarks.gpu.common import (FP32_TOL_LAYER, all_passed, check_target, exact_fp32, judge_bf16, judge_fp32,
                                   load_cfg, max_abs, rel_err)
from benchmarks.gpu.common import cuda_checks_enabled, cuda_marks  # noqa: F401 (the skipif condition, read at setup)

pytestmark = cuda_marks()


def _init_moe(cfg, seed: int, device: torch.device):
    """A MoE layer (loop impl) on ``device`` with N(0, initializer_range) weights, router included."""
    from deepomni.model.moe import MoE

    with torch.device(device):
        moe = MoE(cfg.replace(moe_impl="loop"))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=device) * cfg.initializer_range)
    return moe.eval()


def _moe_fwd_bwd(moe, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    moe.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out, _ = moe(x)
    out.backward(grad)
    res = {"out": out.detach(), "grad_x": x.grad, "grad_experts_gate_up": moe.experts.gate_up_proj.grad,
           "grad_experts_down": moe.experts.down_proj.grad, "grad_router": moe.gate.weight.grad}
    if moe.shared_experts is not None:
        res["grad_shared_gate"] = moe.shared_experts.gate_proj.weight.grad
    return res


def _device_fp32_vs_cpu(cfg, loop32, x32: torch.Tensor, g32: torch.Tensor, ref: dict) -> dict:
    """The device's fp32 loop against the CPU's, on the tokens whose routing agrees."""
    cpu32 = copy.deepcopy(loop32).cpu()
    ref_cpu = _moe_fwd_bwd(cpu32, x32.cpu(), g32.cpu())
    D = cfg.hidden_size
    with torch.no_grad():
        e_dev = loop32.gate(x32.reshape(-1, D)).experts_TK.sort(-1).values.cpu()
        e_cpu = cpu32.gate(x32.cpu().reshape(-1, D)).experts_TK.sort(-1).values
    same_T = (e_dev == e_cpu).all(-1)
    cross: dict[str, Any] = {"routing_agreement": float(same_T.float().mean())}
    for k in ("out", "grad_x"):
        a, b = ref[k].reshape(-1, D).cpu()[same_T], ref_cpu[k].reshape(-1, D)[same_T]
        cross[k] = judge_fp32(rel_err(a, b), FP32_TOL_LAYER)
    if bool(same_T.all()):
        for k in ref:
            if k.startswith("grad_") and k != "grad_x":
                cross[k] = judge_fp32(rel_err(ref[k].cpu(), ref_cpu[k]), FP32_TOL_LAYER)
    return cross


def test_moe_grouped_mm_matches_loop(record_property):
    t = check_target()
    cfg, dev, B = load_cfg(t.preset), t.device, 2
    L = t.size.check_moe_tokens // B
    with exact_fp32():
        moe16 = _init_moe(cfg, t.seed, dev).to(torch.bfloat16)
        loop32 = copy.deepcopy(moe16).float()  # the same (bf16) values, fp32 arithmetic
        grouped16 = copy.deepcopy(moe16)
        grouped16.experts.impl = "grouped_mm"
        gen = torch.Generator().manual_seed(t.seed + 1)
        x16 = torch.randn(B, L, cfg.hidden_size, generator=gen).to(dev, torch.bfloat16)
        g16 = torch.randn(B, L, cfg.hidden_size, generator=gen).to(dev, torch.bfloat16)
        ref = _moe_fwd_bwd(loop32, x16.float(), g16.float())
        loop = _moe_fwd_bwd(moe16, x16, g16)
        grouped = _moe_fwd_bwd(grouped16, x16, g16)
        res: dict[str, Any] = {"device": str(dev), "preset": t.preset, "tokens": B * L,
                               "impl_under_test": "grouped_mm bf16", "reference": "loop fp32",
                               "baseline": "loop bf16", "tensors": {}}
        for k in ref:
            r = judge_bf16(rel_err(grouped[k], ref[k]), rel_err(loop[k], ref[k]))
            r["max_abs_err"] = max_abs(grouped[k], ref[k])
            res["tensors"][k] = r
        if dev.type != "cpu":
            res["device_fp32_vs_cpu_fp32"] = _device_fp32_vs_cpu(cfg, loop32, x16.float(), g16.float(), ref)
    record_property("figures", res)
    assert {"out", "grad_x", "grad_experts_gate_up", "grad_experts_down", "grad_router"} <= set(res["tensors"])
    bad = {k: v for k, v in res["tensors"].items() if not v["passed"]}
    assert not bad, f"grouped_mm bf16 vs loop fp32 beyond tolerance: {bad}"
    assert all(v["baseline_rel_err"] > 0 for v in res["tensors"].values()), "bf16 equal to fp32: vacuous check"
    assert all_passed(res.get("device_fp32_vs_cpu_fp32", {})), res["device_fp32_vs_cpu_fp32"]


def test_moe_layer_matches_transformers_eager(record_property):
    from benchmarks.moe_layer import MoEShape, build_models, fwd_bwd

    t = check_target()
    cfg, dev = load_cfg(t.preset), t.device
    T, B = t.size.moe_tokens, t.size.moe_batch
    shape = MoEShape.from_config(cfg)
    with exact_fp32():
        models = build_models(dev, t.seed, shape)  # fp32, identical weights (ours loads transformers' state dict)
        ref32 = models.pop("hf eager")
        ours16, hf16 = models["ours grouped_mm"].to(torch.bfloat16), models["hf grouped_mm"].to(torch.bfloat16)
        del models
        gen = torch.Generator().manual_seed(t.seed + 1)
        x = torch.randn(B, T // B, cfg.hidden_size, generator=gen).to(dev, torch.bfloat16)
        grad = torch.randn(x.shape, generator=gen).to(dev, torch.bfloat16)
        ref_out, ref_gx = fwd_bwd(ref32, x.float(), grad.float())
        del ref32
        ours_out, ours_gx = fwd_bwd(ours16, x, grad)
        hf_out, hf_gx = fwd_bwd(hf16, x, grad)
        res = {"device": str(dev), "preset": t.preset, "shape": {**shape.as_dict(), "tokens": T, "batch": B},
               "impl_under_test": "ours grouped_mm bf16", "reference": "transformers eager fp32",
               "baseline": "transformers grouped_mm bf16",
               "out": judge_bf16(rel_err(ours_out, ref_out), rel_err(hf_out, ref_out)),
               "grad_x": judge_bf16(rel_err(ours_gx, ref_gx), rel_err(hf_gx, ref_gx))}
    record_property("figures", res)
    assert res["out"]["passed"] and res["grad_x"]["passed"], res
    assert res["out"]["baseline_rel_err"] > 0 and res["grad_x"]["baseline_rel_err"] > 0, res
