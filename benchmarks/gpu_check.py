"""The GPU check (issue 15, point 3): CUDA paths against their references, the MoE layer, serving and a
training step at DeepSeek-V2-Lite size, in one prepared run that writes its figures as JSON.

On the device machine (one H100, its own image: PyTorch 2.11, transformers 5.17; no Ray, no DeepSpeed, no
pydantic, no network), call the device tool's ``run`` with exactly:

    command:   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 && timeout 480 python3 benchmarks/gpu_check.py --device cuda
    carry:     [".whl"]
    timeout_s: 540

``.whl/`` (ignored by ``.git/info/exclude``) holds the wheels the image lacks, cp312 manylinux x86_64:
pydantic, pydantic_core, annotated_types, typing_inspection and typing_extensions (pydantic 2.14 needs
typing-extensions >= 4.16: newer than the image's is harmless) for ``deepomni.config``, and snac (pure
Python; its needs torch, numpy, einops, huggingface-hub are in the image). The figures come back as
``$OUT/gpu_check.json`` (and the log ``$OUT/gpu_check.log``); save them under
``benchmarks/results/gpu_check/``. The script is budgeted to well under 8 minutes on an H100; a section
that would start after ``--budget-s`` (default 420 s) is skipped, and the JSON is rewritten after every
section, so an outside ``timeout`` still leaves the finished sections' figures.

    python benchmarks/gpu_check.py --device cpu --preset tiny --threads 1   # every section, tiny (~15 s, 2 cores)
    python benchmarks/gpu_check.py --sections checks,moe_layer               # a subset

Sections (each in its own try/except, with its wall time; ``--device cuda`` uses ``SIZES['deepseek-v2-lite']``,
``--preset tiny`` ``SIZES['tiny']``). Everything runs in bf16, fp32 where a reference needs it.

1. ``checks``: the CUDA paths against their references.
   * ``moe_grouped_vs_loop``: one MoE layer (preset width), forward and backward (output, input grad, expert,
     router and shared-expert weight grads), ``moe_impl="grouped_mm"`` in bf16 against the loop in fp32 on
     the same bf16 values; the loop in bf16 is the baseline. On a GPU the fp32 loop is also compared with
     the same on the CPU (tokens whose routing agrees).
   * ``incremental_vs_full``: logits of decoding steps against the full forward, through ``KVCache``
     (every row the same length) and ``SlotKVCache`` (rows of different lengths, as the serving engine),
     on a ``check_layers``-layer model at full width and full vocabulary; bf16 against the fp32 full
     forward (baseline: the bf16 full forward), and the same in fp32.
   * ``absorbed_vs_expanded``: one MLA layer's output for 1 and 4 new queries over a cache, ``kv_b_proj``
     absorbed (what decoding uses) against expanded, bf16 against fp32 expanded (baseline: bf16
     expanded), and fp32 absorbed against fp32 expanded; again with inputs x4 (``queries_1_sharp``: larger
     scores, attention far from uniform, as in a trained model; the absorbed form rounds its scores to bf16
     before the softmax, SDPA keeps them in fp32); plus both forms' time at the decode shape.
   Tolerances (normwise relative error ``||a - ref|| / ||ref||``, which a rare routing flip between two
   roundings moves by far less than its own size, unlike a max-abs error): a bf16 path passes when its
   error is at most ``max(3 x baseline, 4 x 2^-8)``: a correct path differs from exact arithmetic by
   rounding alone, so it may round differently from the reference path but not by much more (3x) than
   the reference path's own bf16 error; the floor is four bf16 units of rounding (2^-8 each), for when
   the baseline is itself tiny. A wrong path (mis-routed, mis-masked, mis-scaled) errs by O(1). fp32
   paths pass below 1e-3 (logits: a routing flip between the two fp32 orders of summation moves one
   token) or 1e-4 (one attention layer: no routing).
2. ``moe_layer``: one MoE layer at the preset's shape (DeepSeek-V2-Lite: hidden 2048, 64 experts of width
   1408, top-6, 2 shared) on ``moe_tokens`` tokens, forward + backward in bf16, timed with
   ``benchmarks/moe_layer.py``'s own models, steps and interleaved timer (its shape constants set to the
   preset's): ours (grouped_mm, loop), transformers' ``DeepseekV2Moe`` (grouped_mm, eager) and the dense
   matmuls of the same FLOPs. Goals: ours >= 1.0x transformers' grouped_mm, >= 50% of the dense rate.
   Outputs and input grads of ours and transformers' grouped_mm (bf16) are checked against transformers'
   eager in fp32 as above.
3. ``serving``: the preset's model (random weights, bf16; the tiny preset with 7 codec channels) with
   SNAC's architecture as the vocoder (random weights; tiny: a narrow SNAC), in-process as
   ``benchmarks/serve_latency.py`` measures it (its ``InProcess`` and ``measure``: the code that serves, the
   Backbone deployment's answer loop ``deepomni.serve.answer_loop.AnswerLoop`` and the Vocoder deployment's
   ``deepomni.serve.vocoder.CodecVocoder``; the spoken question is random log-mel features of ``mel_frames``
   frames through the speech encoder, so neither espeak nor an audio library is needed): time to first
   audio p50 / p99 for 1 and ``serve_sessions`` concurrent sessions, the concurrency gain; then the decode
   step time at 1, 16 and 64 rows (``BatchEngine.step`` with text-only sessions, one row each; with speech
   sessions, two rows each; and the model's forward alone over a ``SlotKVCache``). Goal: first audio under
   250 ms for one session.
4. ``training``: a ``train_layers``-layer slice of the preset at full width and vocabulary in bf16 with
   fp32 master weights and torch AdamW (no DeepSpeed): step time, tokens/s, peak memory; and the memory
   plan of the whole model on 8 GPUs with ZeRO-2 and expert parallelism 8, from the meta-device model
   (formula in the JSON).

Timing on a GPU: ``torch.cuda.synchronize`` before and after each timed call, warmup calls first, medians.
The JSON records torch / transformers versions, the device, dtype, sizes and each section's wall time;
``forbidden_modules_loaded`` lists ray / deepspeed if anything this run imported pulled them in.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check"
SECTIONS = ("checks", "moe_layer", "serving", "training")
FORBIDDEN = ("ray", "deepspeed")  # not in the device image: nothing this script imports may need them

BF16_UNIT = 2.0**-8  # bf16 unit roundoff (8 significant bits)
BF16_FACTOR = 3.0  # a bf16 path may err up to this many times the reference path's own bf16 error
BF16_FLOOR = 4 * BF16_UNIT
FP32_TOL_LOGITS = 1e-3
FP32_TOL_LAYER = 1e-4
TTFA_GOAL_MS = 250.0


@dataclass(frozen=True)
class Sizes:
    # 1. checks
    check_layers: int  # layers of the model of the logits checks (full width and vocabulary)
    check_moe_tokens: int  # tokens (2 sequences) of the grouped-vs-loop check
    check_len: int  # positions (2 sequences) of the incremental check ...
    check_steps: int  # ... of which the last ones are decoded one at a time
    attn_batch: int  # absorbed vs expanded: rows ...
    attn_cache: int  # ... and cached positions
    attn_iters: int
    # 2. moe layer
    moe_tokens: int
    moe_batch: int
    moe_repeats: int
    moe_warmup: int
    # 3. serving
    serve_sessions: int
    answer_steps: int
    serve_repeats: int  # 1-session rounds behind the 1-session TTFA
    mel_frames: int  # the spoken question: log-mel frames (100 per second)
    step_rows: tuple[int, ...]
    step_iters: int
    step_warmup: int
    serve_timeout_s: float
    snac: dict | None  # None: snac_24khz's published config
    tiny_codec_channels: bool  # the tiny preset has 4 codec channels; SNAC needs 7
    encoder_positions: int | None  # speech encoder window (None: the preset's; mel is padded to twice this)
    # 4. training
    train_layers: int
    train_batch: int
    train_seq: int
    train_steps: int
    train_warmup: int


SIZES: dict[str, Sizes] = {
    "deepseek-v2-lite": Sizes(
        check_layers=4, check_moe_tokens=4096, check_len=64, check_steps=8, attn_batch=16, attn_cache=1024,
        attn_iters=20,
        moe_tokens=8192, moe_batch=4, moe_repeats=20, moe_warmup=3,
        serve_sessions=16, answer_steps=40, serve_repeats=5, mel_frames=200, step_rows=(1, 16, 64), step_iters=20,
        step_warmup=3, serve_timeout_s=240.0, snac=None, tiny_codec_channels=False, encoder_positions=None,
        train_layers=3, train_batch=4, train_seq=2048, train_steps=5, train_warmup=2,
    ),
    "tiny": Sizes(
        check_layers=4, check_moe_tokens=256, check_len=24, check_steps=4, attn_batch=4, attn_cache=48,
        attn_iters=2,
        moe_tokens=256, moe_batch=2, moe_repeats=2, moe_warmup=1,
        serve_sessions=2, answer_steps=11, serve_repeats=1, mel_frames=40, step_rows=(1, 16, 64), step_iters=2,
        step_warmup=1, serve_timeout_s=90.0, snac={"encoder_dim": 8, "decoder_dim": 64}, tiny_codec_channels=True,
        encoder_positions=64,
        train_layers=2, train_batch=2, train_seq=32, train_steps=2, train_warmup=1,
    ),
}


# ------------------------------------------------------------------------------------------ helpers
@dataclass
class Context:
    device: torch.device
    preset: str
    size: Sizes
    seed: int
    out_dir: Path
    log_lines: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        self.log_lines.append(msg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> list[float]:
    """Wall milliseconds of each of ``iters`` calls after ``warmup`` calls, synchronised before and after."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise relative error ``||a - ref||_F / ||ref||_F`` (difference in fp32, sums in fp64)."""
    a, ref = a.detach().float(), ref.detach().to(a.device).float()
    num = (a - ref).pow_(2).sum(dtype=torch.float64)
    den = ref.pow(2).sum(dtype=torch.float64)
    return float((num / den.clamp_min(1e-300)).sqrt())


def max_abs(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().float() - ref.detach().to(a.device).float()).abs().max())


def judge_bf16(err: float, baseline: float) -> dict:
    tol = max(BF16_FACTOR * baseline, BF16_FLOOR)
    return {"rel_err": err, "baseline_rel_err": baseline, "tolerance": tol, "passed": bool(err <= tol)}


def judge_fp32(err: float, tol: float) -> dict:
    return {"rel_err": err, "tolerance": tol, "passed": bool(err <= tol)}


def all_passed(obj: Any) -> bool:
    """Every ``passed`` flag in a nested result."""
    if isinstance(obj, dict):
        return all(v for k, v in obj.items() if k == "passed") and all(
            all_passed(v) for k, v in obj.items() if k != "passed")
    if isinstance(obj, list):
        return all(all_passed(v) for v in obj)
    return True


def free_memory(device: torch.device) -> None:
    """Give the last section's GPU memory back (tensors held in reference cycles too)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_gib": gib(torch.cuda.max_memory_allocated(device)),
                "peak_memory_source": "torch.cuda.max_memory_allocated"}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except (ImportError, OSError):
        rss = float("nan")
    return {"peak_memory_gib": gib(rss), "peak_memory_source": "process max RSS (CPU; whole process)"}


def load_cfg(preset: str):
    from deepomni.config import load_preset

    return load_preset(preset)


# ------------------------------------------------------------------------------- 1. correctness
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


def check_moe(ctx: Context, cfg) -> dict:
    dev, B = ctx.device, 2
    L = ctx.size.check_moe_tokens // B
    moe16 = _init_moe(cfg, ctx.seed, dev).to(torch.bfloat16)
    loop32 = copy.deepcopy(moe16).float()  # the same (bf16) values, fp32 arithmetic
    grouped16 = copy.deepcopy(moe16)
    grouped16.experts.impl = "grouped_mm"
    gen = torch.Generator().manual_seed(ctx.seed + 1)
    x16 = torch.randn(B, L, cfg.hidden_size, generator=gen).to(dev, torch.bfloat16)
    g16 = torch.randn(B, L, cfg.hidden_size, generator=gen).to(dev, torch.bfloat16)
    ref = _moe_fwd_bwd(loop32, x16.float(), g16.float())
    loop = _moe_fwd_bwd(moe16, x16, g16)
    grouped = _moe_fwd_bwd(grouped16, x16, g16)
    res: dict[str, Any] = {"tokens": B * L, "impl_under_test": "grouped_mm bf16", "reference": "loop fp32",
                           "baseline": "loop bf16", "tensors": {}}
    for k in ref:
        r = judge_bf16(rel_err(grouped[k], ref[k]), rel_err(loop[k], ref[k]))
        r["max_abs_err"] = max_abs(grouped[k], ref[k])
        res["tensors"][k] = r
    if dev.type != "cpu":  # the device's fp32 reference against the CPU's
        cpu32 = copy.deepcopy(loop32).cpu()
        ref_cpu = _moe_fwd_bwd(cpu32, x16.float().cpu(), g16.float().cpu())
        with torch.no_grad():
            e_dev = loop32.gate(x16.float().reshape(-1, cfg.hidden_size)).experts_TK.sort(-1).values.cpu()
            e_cpu = cpu32.gate(x16.float().cpu().reshape(-1, cfg.hidden_size)).experts_TK.sort(-1).values
        same_T = (e_dev == e_cpu).all(-1)
        D = cfg.hidden_size
        cross = {"routing_agreement": float(same_T.float().mean())}
        for k in ("out", "grad_x"):
            a, b = ref[k].reshape(-1, D).cpu()[same_T], ref_cpu[k].reshape(-1, D)[same_T]
            cross[k] = judge_fp32(rel_err(a, b), FP32_TOL_LAYER)
        if bool(same_T.all()):
            for k in ref:
                if k.startswith("grad_") and k != "grad_x":
                    cross[k] = judge_fp32(rel_err(ref[k].cpu(), ref_cpu[k]), FP32_TOL_LAYER)
        res["device_fp32_vs_cpu_fp32"] = cross
    res["passed"] = all_passed(res["tensors"]) and all_passed(res.get("device_fp32_vs_cpu_fp32", {}))
    return res


def _cat_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(logits, dim=-1)  # [B, L, sum of channel vocabularies]


def _random_tokens(cfg, layout, B: int, L: int, gen: torch.Generator) -> torch.Tensor:
    text = torch.randint(0, cfg.text_vocab_size, (B, L, 1), generator=gen)
    codec = torch.randint(0, cfg.codebook_size, (B, L, layout.num_codec_channels), generator=gen)
    return torch.cat([text, codec], dim=-1)


@torch.no_grad()
def check_incremental(ctx: Context, model16, model32) -> dict:
    from deepomni.model.attention import KVCache, SlotKVCache

    cfg, lay, dev = model16.cfg, model16.layout, ctx.device
    B, L, n = 2, ctx.size.check_len, ctx.size.check_steps
    tok = _random_tokens(cfg, lay, B, L, torch.Generator().manual_seed(ctx.seed + 2)).to(dev)
    full32 = _cat_logits(model32(tok).logits)
    full16 = _cat_logits(model16(tok).logits)

    def kv_steps(model) -> torch.Tensor:  # every row the same length: prefill, then one position per step
        cache = KVCache(len(model.layers))
        model(tok[:, : L - n], cache=cache)
        return torch.cat([_cat_logits(model(tok[:, i : i + 1], cache=cache).logits) for i in range(L - n, L)], 1)

    starts = [L - n - 3 * b for b in range(B)]  # SlotKVCache: row b continues from its own length

    def slot_steps(model) -> torch.Tensor:
        slot = SlotKVCache.for_model(model, rows=B, max_len=L)
        for b in range(B):
            pre = KVCache(len(model.layers))
            model(tok[b : b + 1, : starts[b]], cache=pre)
            slot.append(pre)
        steps = []
        for j in range(n):
            step_tok = torch.stack([tok[b, starts[b] + j] for b in range(B)])[:, None]
            steps.append(_cat_logits(model(step_tok, cache=slot).logits))
        return torch.cat(steps, 1)

    def at(full: torch.Tensor, first: list[int]) -> torch.Tensor:
        return torch.stack([full[b, first[b] : first[b] + n] for b in range(B)])

    text_v = lay.channel_size(0)

    def agree(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a[..., :text_v].argmax(-1) == b[..., :text_v].argmax(-1)).float().mean())

    res: dict[str, Any] = {"layers": cfg.num_hidden_layers, "rows": B, "positions": L, "decode_steps": n}
    for name, run, first in (("kv_cache", kv_steps, [L - n] * B), ("slot_cache", slot_steps, starts)):
        ref32, ref16 = at(full32, first), at(full16, first)
        inc16, inc32 = run(model16), run(model32)
        r = {"bf16": judge_bf16(rel_err(inc16, ref32), rel_err(ref16, ref32)),
             "fp32": judge_fp32(rel_err(inc32, ref32), FP32_TOL_LOGITS),
             "bf16_incremental_vs_bf16_full_rel_err": rel_err(inc16, ref16),
             "bf16_max_abs_err": max_abs(inc16, ref32),
             "text_argmax_agreement_bf16_vs_fp32_full": agree(inc16, ref32),
             "text_argmax_agreement_baseline": agree(ref16, ref32)}
        res[name] = r
    res["passed"] = all_passed(res)
    return res


@torch.no_grad()
def check_absorbed(ctx: Context, model16, model32) -> dict:
    from deepomni.model.attention import KVCache

    dev, cfg = ctx.device, model16.cfg
    B, S = ctx.size.attn_batch, ctx.size.attn_cache
    attn16, attn32 = model16.layers[0].self_attn, model32.layers[0].self_attn
    rot, scale = model16.rotary, model16.rotary.softmax_scale
    gen = torch.Generator().manual_seed(ctx.seed + 3)
    x_pre = torch.randn(B, S, cfg.hidden_size, generator=gen).to(dev)

    def attend(attn, dtype, absorb: bool, x_new: torch.Tensor, cache=None, x_scale: float = 1.0) -> torch.Tensor:
        if cache is None:
            cache = KVCache(1)  # layer 0
            attn((x_pre * x_scale).to(dtype), rot(torch.arange(S, device=dev).expand(B, S)), scale, cache)
        Lq, past = x_new.shape[1], cache.length
        attn.absorb = lambda L_, S_: absorb  # force one form (instance attribute over the method)
        try:
            return attn(x_new.to(dtype), rot(torch.arange(past, past + Lq, device=dev).expand(B, Lq)), scale, cache)
        finally:
            del attn.absorb

    res: dict[str, Any] = {"rows": B, "cached_positions": S,
                           "decode_uses_absorbed": bool(attn16.absorb(1, S + 1)) and bool(attn16.absorb(4, S + 4))}
    # "sharp": inputs x4, so the scores are ~4x (nope part, its latent is normed) to ~16x (rope part) larger
    # and the attention far from uniform, as a trained model's (random weights give near-uniform attention)
    for name, Lq, x_scale in (("queries_1", 1, 1.0), ("queries_4", 4, 1.0), ("queries_1_sharp", 1, 4.0)):
        x_new = torch.randn(B, Lq, cfg.hidden_size, generator=gen).to(dev) * x_scale
        exp32 = attend(attn32, torch.float32, False, x_new, x_scale=x_scale)
        exp16 = attend(attn16, torch.bfloat16, False, x_new, x_scale=x_scale)
        abs16 = attend(attn16, torch.bfloat16, True, x_new, x_scale=x_scale)
        abs32 = attend(attn32, torch.float32, True, x_new, x_scale=x_scale)
        res[name] = {"bf16": judge_bf16(rel_err(abs16, exp32), rel_err(exp16, exp32)),
                     "fp32": judge_fp32(rel_err(abs32, exp32), FP32_TOL_LAYER),
                     "bf16_max_abs_err": max_abs(abs16, exp32)}
    # both forms at the decode shape (one new query per row), bf16; the cache grows by one per call
    times = {}
    for name, absorb in (("absorbed", True), ("expanded", False)):
        cache = KVCache(1)
        attn16(x_pre.to(torch.bfloat16), rot(torch.arange(S, device=dev).expand(B, S)), scale, cache)
        x1 = torch.randn(B, 1, cfg.hidden_size, generator=gen).to(dev, torch.bfloat16)
        times[name] = med(timed_ms(lambda: attend(attn16, torch.bfloat16, absorb, x1, cache), dev,
                                   ctx.size.attn_iters, 2))
    res["decode_attention_ms"] = times
    res["passed"] = all_passed(res)
    return res


def section_checks(ctx: Context) -> dict:
    from deepomni.model.model import DeepOmniModel

    cfg = load_cfg(ctx.preset)
    cfg = cfg.replace(num_hidden_layers=ctx.size.check_layers,
                      first_k_dense_replace=min(cfg.first_k_dense_replace, ctx.size.check_layers - 1))
    out: dict[str, Any] = {}

    def sub(name: str, fn: Callable[[], dict]) -> None:
        t0 = time.perf_counter()
        try:
            out[name] = fn()
        except Exception as e:  # one check failing leaves the others' figures
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(), "passed": False}
        out[name]["wall_s"] = time.perf_counter() - t0
        ctx.log(f"  checks/{name}: {'passed' if out[name].get('passed') else 'FAILED'} "
                f"({out[name]['wall_s']:.1f} s)")

    sub("moe_grouped_vs_loop", lambda: check_moe(ctx, cfg))
    model16 = DeepOmniModel.random(cfg, device=ctx.device, dtype=torch.bfloat16, seed=ctx.seed,
                                   with_speech_input=False).eval()
    model32 = copy.deepcopy(model16).float()  # the bf16 weights' values in fp32
    sub("incremental_vs_full", lambda: check_incremental(ctx, model16, model32))
    sub("absorbed_vs_expanded", lambda: check_absorbed(ctx, model16, model32))
    out["passed"] = all(out[k].get("passed", False) for k in ("moe_grouped_vs_loop", "incremental_vs_full",
                                                             "absorbed_vs_expanded"))
    return out


# ----------------------------------------------------------------------------------- 2. MoE layer
@contextlib.contextmanager
def moe_layer_shape(ml: types.ModuleType, cfg):
    """``benchmarks/moe_layer.py`` reads its layer shape from module constants: set them to ``cfg``'s."""
    shape = {"HIDDEN": cfg.hidden_size, "EXPERTS": cfg.n_routed_experts, "EXPERT_FFN": cfg.moe_intermediate_size,
             "TOP_K": cfg.num_experts_per_tok, "SHARED": cfg.n_shared_experts}
    old = {k: getattr(ml, k) for k in shape}
    for k, v in shape.items():
        setattr(ml, k, v)
    try:
        yield shape
    finally:
        for k, v in old.items():
            setattr(ml, k, v)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def section_moe_layer(ctx: Context) -> dict:
    from benchmarks import moe_layer as ml

    cfg, size, dev = load_cfg(ctx.preset), ctx.size, ctx.device
    T, B = size.moe_tokens, size.moe_batch
    with moe_layer_shape(ml, cfg) as shape:
        models = ml.build_models(dev, ctx.seed)  # fp32, identical weights (ours loads transformers' state dict)
        ref32 = copy.deepcopy(models["hf eager"])
        models = {name: m.to(torch.bfloat16) for name, m in models.items()}
        gen = torch.Generator().manual_seed(ctx.seed + 1)
        x = torch.randn(B, T // B, cfg.hidden_size, generator=gen).to(dev, torch.bfloat16)
        grad = torch.randn(x.shape, generator=gen).to(dev, torch.bfloat16)
        # correctness: ours and transformers' grouped_mm (bf16) against transformers' eager in fp32
        ref_out, ref_gx = ml.fwd_bwd(ref32, x.float(), grad.float())
        del ref32
        ours_out, ours_gx = ml.fwd_bwd(models["ours grouped_mm"], x, grad)
        hf_out, hf_gx = ml.fwd_bwd(models["hf grouped_mm"], x, grad)
        check = {"reference": "transformers eager fp32", "baseline": "transformers grouped_mm bf16",
                 "out": judge_bf16(rel_err(ours_out, ref_out), rel_err(hf_out, ref_out)),
                 "grad_x": judge_bf16(rel_err(ours_gx, ref_gx), rel_err(hf_gx, ref_gx))}
        check["passed"] = all_passed(check)
        del ref_out, ref_gx, ours_out, ours_gx, hf_out, hf_gx
        steps: dict[str, Callable[[], object]] = {name: (lambda m=m: ml.fwd_bwd(m, x, grad))
                                                  for name, m in models.items()}
        dense_dtype = torch.bfloat16
        try:
            with default_dtype(torch.bfloat16):  # its operands drawn in bf16
                steps["dense matmul"] = ml.dense_reference(T, dev, ctx.seed)
        except (TypeError, RuntimeError):  # a torch that refuses a bf16 default dtype: fp32 operands
            dense_dtype = torch.float32
            steps["dense matmul"] = ml.dense_reference(T, dev, ctx.seed)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        times, _faults = ml.time_interleaved(steps, dev, size.moe_warmup, size.moe_repeats)
        flops = ml.expert_flops(T)
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
    return {"shape": {**{k.lower(): v for k, v in shape.items()}, "tokens": T, "batch": B, "dtype": "bfloat16",
                      "dense_dtype": str(dense_dtype).removeprefix("torch.")},
            "expert_tflop_fwd_bwd": flops / 1e12, "repeats": size.moe_repeats, "warmup": size.moe_warmup,
            "rows": rows, "ratios": ratios, "goals": goals, "check": check, "passed": check["passed"],
            **peak_memory(dev)}


# ------------------------------------------------------------------------------------- 3. serving
def random_speech_encoder(model, mel_frames: int) -> Callable[[list[bytes]], list[torch.Tensor]]:
    """The spoken questions of one batch as ``mel_frames`` frames of random log-mel features (seeded) through
    the model's speech encoder + projector: no audio to decode, so neither espeak nor an audio library."""
    enc, device, dtype = model.cfg.speech_encoder, model.embed.weight.device, model.embed.weight.dtype

    @torch.no_grad()
    def encode_many(wavs_bytes: list[bytes]) -> list[torch.Tensor]:
        n = len(wavs_bytes)
        mel = torch.randn(n, enc.num_mel_bins, mel_frames, generator=torch.Generator().manual_seed(0))
        return model.speech(mel.to(device, dtype), [mel_frames] * n)

    return encode_many


def random_speech_pipeline(model, codec, answer_steps: int, max_rows: int, mel_frames: int):
    """``benchmarks/serve_latency.py``'s in-process pipeline (its ``InProcess``: batched speech encoding -> the
    Backbone deployment's answer loop, :class:`deepomni.serve.answer_loop.AnswerLoop` -> the Vocoder
    deployment's batched codec decoding, in this process; TTFA per answer), each spoken question being
    :func:`random_speech_encoder`'s random log-mel features instead of a decoded WAV."""
    from benchmarks import serve_latency as sl

    return sl.InProcess(model, codec, answer_steps, max_rows, encode_many=random_speech_encoder(model, mel_frames))


def _engine_ladder(ctx: Context, engine, prompt, audio_ND, counts: tuple[int, ...], speech: bool) -> dict:
    """``BatchEngine.step`` with ``counts[0]``, then ``counts[1]``, ... live sessions (each rung adds the
    missing ones, admitted by a first untimed step), the median of the timed steps at each; then all leave."""
    from deepomni.model.generate import GenerationConfig
    from deepomni.serve.engine import Request

    size = ctx.size
    gen = GenerationConfig(max_steps=engine.max_len, speech=speech, seed=0)
    sids: list[int] = []
    out = {}
    for n in counts:
        new = [engine.submit(Request(prompt, audio_ND, gen)) for _ in range(n - len(sids))]
        sids += new
        waiting = set(new)
        for _ in range(64):  # untimed: until every new session is prefilled (one step, or a few if chunked)
            waiting -= {sid for sid, ev in engine.step() if ev.kind == "prefill"}
            if not waiting:
                break
        rows: list[int] = []

        def step():
            engine.step()
            rows.append(engine.cache.n)

        times = timed_ms(step, ctx.device, size.step_iters, size.step_warmup)
        ms, timed_rows = med(times), rows[size.step_warmup:]
        mean_rows = statistics.mean(timed_rows)
        out[str(n)] = {"sessions": n, "rows_mean": mean_rows, "step_ms": ms, "min_ms": min(times),
                       "tokens_per_s": mean_rows / ms * 1e3}
    for sid in sids:
        engine.cancel(sid)
    engine.step()  # drops them
    return out


@torch.no_grad()
def _forward_steps(ctx: Context, model, prompt, audio_ND, rows: int) -> dict:
    """The model's forward alone over ``rows`` rows of a ``SlotKVCache`` (one position per row per call)."""
    from deepomni.model.attention import KVCache, SlotKVCache

    size, dev = ctx.size, ctx.device
    pre = KVCache(len(model.layers))
    model(prompt[None].to(dev), audio=[audio_ND], cache=pre)
    slot = SlotKVCache.for_model(model, rows=rows, max_len=pre.length + size.step_iters + size.step_warmup + 2)
    for _ in range(rows):
        slot.append(pre)
    tok = prompt[-1:].to(dev).expand(rows, 1, -1).contiguous()  # [rows, 1, C]
    times = timed_ms(lambda: model(tok, cache=slot), dev, size.step_iters, size.step_warmup)
    ms = med(times)
    return {"rows": rows, "forward_ms": ms, "min_ms": min(times), "tokens_per_s": rows / ms * 1e3}


def section_serving(ctx: Context) -> dict:
    import asyncio

    from benchmarks import serve_latency as sl
    from deepomni.codec.snac import SNAC_24KHZ, SnacCodec
    from deepomni.model.model import DeepOmniModel
    from deepomni.model.prompt import user_turn
    from deepomni.serve.engine import BatchEngine

    size, dev = ctx.size, ctx.device
    cfg = load_cfg(ctx.preset)
    if size.tiny_codec_channels:
        cfg = cfg.replace(num_codec_channels=7)  # SNAC's 7 codes per frame
    if size.encoder_positions:
        cfg = cfg.replace(speech_encoder=dataclasses.replace(cfg.speech_encoder,
                                                             max_source_positions=size.encoder_positions))
    t0 = time.perf_counter()
    model = DeepOmniModel.random(cfg, device=dev, dtype=torch.bfloat16, seed=ctx.seed).eval()
    codec = SnacCodec.random(config=None if size.snac is None else {**SNAC_24KHZ, **size.snac}, device=dev)
    res: dict[str, Any] = {"preset": ctx.preset, "dtype": "bfloat16", "codec": "snac architecture, random weights",
                           "snac_config": size.snac or "snac_24khz", "build_s": time.perf_counter() - t0,
                           "question_mel_frames": size.mel_frames, "answer_steps": size.answer_steps}
    ctx.log(f"  serving: model and codec built in {res['build_s']:.1f} s")
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    t0 = time.perf_counter()
    target = random_speech_pipeline(model, codec, size.answer_steps, 32, size.mel_frames)  # 32: the app's rows
    audio_ND = target.encode_many([b""])[0]
    res["encoder_ms"] = med(timed_ms(lambda: target.encode_many([b""]), dev, 3, 1))
    res["audio_positions"] = int(audio_ND.shape[0])
    n = size.serve_sessions
    m = asyncio.run(asyncio.wait_for(sl.measure({"inprocess": target}, b"", n, size.serve_repeats),
                                     size.serve_timeout_s))["inprocess"]
    one, many, seq = m["1_session"], m[f"{n}_concurrent"], m[f"{n}_sequential"]
    res["ttfa"] = {
        "1_session": {"p50_ms": one["ttfa_p50_ms"], "p99_ms": one["ttfa_p99_ms"], "rounds": one["repeats"],
                      "rtf": one["rtf_mean"]},
        "concurrent": {"sessions": n, "p50_ms": many["ttfa_p50_ms"], "p99_ms": many["ttfa_p99_ms"],
                       "rtf": many["rtf_mean"], "throughput_audio_s_per_s": many["throughput_audio_s_per_s"]},
        "sequential": {"sessions": n, "p50_ms": seq["ttfa_p50_ms"], "p99_ms": seq["ttfa_p99_ms"],
                       "throughput_audio_s_per_s": seq["throughput_audio_s_per_s"]},
        "concurrency_gain": m["concurrency_gain"],
        "p99_of_concurrent_over_p50_of_one": many["ttfa_p99_ms"] / one["ttfa_p50_ms"],
    }
    res["goal_ttfa_1_session_under_250ms"] = bool(one["ttfa_p50_ms"] < TTFA_GOAL_MS)
    res["ttfa_wall_s"] = time.perf_counter() - t0
    ctx.log(f"  serving: TTFA 1 session p50 {one['ttfa_p50_ms']:.1f} ms; {n} concurrent p50 "
            f"{many['ttfa_p50_ms']:.1f} / p99 {many['ttfa_p99_ms']:.1f} ms")
    del target

    # the decode step at 1, 16, 64 rows
    t0 = time.perf_counter()
    prompt = user_turn(model.layout, audio_positions=audio_ND.shape[0])
    max_rows = max(size.step_rows)
    ladder_steps = len(size.step_rows) * (1 + size.step_iters + size.step_warmup)  # a session's steps (+ slack)
    engine = BatchEngine(model, max_rows=max_rows, max_len=prompt.shape[0] + ladder_steps + 32)
    rungs = tuple(size.step_rows)
    steps: dict[str, Any] = {
        # one row per text-only session; a speech session holds two (speech item + text item) while its text lives
        "text_rows": _engine_ladder(ctx, engine, prompt, audio_ND, rungs, speech=False),
        "speech_sessions": _engine_ladder(ctx, engine, prompt, audio_ND, tuple(max(1, r // 2) for r in rungs),
                                          speech=True),
        "forward_only": {str(r): _forward_steps(ctx, model, prompt, audio_ND, r) for r in rungs},
    }
    for r in rungs:
        ctx.log(f"  serving: {r} rows: engine step {steps['text_rows'][str(r)]['step_ms']:.1f} ms, "
                f"forward {steps['forward_only'][str(r)]['forward_ms']:.1f} ms")
    res["decode_step"] = steps
    res["decode_step_wall_s"] = time.perf_counter() - t0
    res.update(peak_memory(dev))
    del engine, model, codec
    return res


# ------------------------------------------------------------------------------------ 4. training
def memory_plan(cfg, world: int = 8, ep: int = 8, gpu_gib: float | None = None) -> dict:
    """Per-GPU memory of the model states for training the whole model, from the meta-device model."""
    from deepomni.model.model import DeepOmniModel
    from deepomni.model.moe import MoE, RoutedExperts

    with torch.device("meta"):
        model = DeepOmniModel(cfg, with_speech_input=True)
    cats = {"routed_experts": 0, "speech_encoder_frozen": 0, "embedding_and_head": 0, "attention": 0,
            "dense_mlp": 0, "shared_experts": 0, "routers": 0, "norms": 0, "speech_projector": 0}
    moe_names = {n for n, m in model.named_modules() if isinstance(m, MoE)}
    expert_ids = {id(p) for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters()}
    for name, p in model.named_parameters():
        n = p.numel()
        mod = name.rsplit(".", 2)[0]
        if id(p) in expert_ids:
            cats["routed_experts"] += n
        elif name.startswith("speech.encoder."):
            cats["speech_encoder_frozen"] += n
        elif name.startswith("speech."):
            cats["speech_projector"] += n
        elif name.startswith("embed."):
            cats["embedding_and_head"] += n
        elif ".self_attn." in name and "norm" not in name:
            cats["attention"] += n
        elif ".shared_experts." in name:
            cats["shared_experts"] += n
        elif name.endswith(".gate.weight") and mod in moe_names:
            cats["routers"] += n
        elif ".mlp." in name:
            cats["dense_mlp"] += n
        else:
            cats["norms"] += n
    experts, encoder = cats["routed_experts"], cats["speech_encoder_frozen"]
    replicated = sum(cats.values()) - experts - encoder
    dp, dp_exp = world, world // ep  # ZeRO's data-parallel group: all ranks; experts': ranks holding the same shard

    def plan(shard_rep: int, shard_exp: int) -> dict:
        local_exp = experts / ep
        w = 2 * (replicated + local_exp + encoder)
        g = 2 * (replicated / shard_rep + local_exp / shard_exp)
        o = 12 * (replicated / shard_rep + local_exp / shard_exp)
        out = {"bf16_weights_gib": gib(w), "bf16_grads_gib": gib(g), "fp32_master_and_adam_gib": gib(o),
               "total_states_gib": gib(w + g + o)}
        if gpu_gib:
            out["left_for_activations_and_buffers_gib"] = gpu_gib - out["total_states_gib"]
        return out

    return {
        "world": world, "expert_parallel": ep, "zero_stage": 2,
        "parameters": {**cats, "replicated_trainable": replicated, "total": sum(cats.values())},
        "formula": ("per GPU bytes = 2 (bf16 weights) x (R + X/EP + E_frozen) + (2 (bf16 grads) + 4 (fp32 master) + "
                    "4 + 4 (Adam m, v)) x (R/DP + (X/EP)/DP_x); R = replicated trainable parameters (everything "
                    "but the routed experts and the frozen speech encoder), X = routed experts (sharded EP ways), "
                    "E_frozen = speech encoder (bf16 weights only, no grads or optimizer state), DP = world = "
                    f"{dp} (ZeRO-2 shards grads and optimizer states of R over all ranks), DP_x = world / EP = "
                    f"{dp_exp} (ranks holding the same expert shard). Model states only: activations, "
                    "communication buckets (DeepSpeed default reduce/allgather buckets 5e8 elements) and the "
                    "allocator's fragmentation come on top."),
        "per_gpu": plan(dp, dp_exp),
        "per_gpu_without_zero": plan(1, 1),  # expert parallelism alone (deepomni.train.engine's EP engine today)
        "gpu_memory_gib": gpu_gib,
    }


def section_training(ctx: Context) -> dict:
    from deepomni.model.model import DeepOmniModel, count_parameters

    size, dev = ctx.size, ctx.device
    full = load_cfg(ctx.preset)
    cfg = full.replace(num_hidden_layers=size.train_layers,
                       first_k_dense_replace=min(full.first_k_dense_replace, size.train_layers - 1))
    gpu_gib = gib(torch.cuda.get_device_properties(dev).total_memory) if ctx.cuda else None
    res: dict[str, Any] = {"memory_plan": memory_plan(full, gpu_gib=gpu_gib)}

    model = DeepOmniModel.random(cfg, device=dev, dtype=torch.bfloat16, seed=ctx.seed,
                                 with_speech_input=False).train()
    params = [p for p in model.parameters() if p.requires_grad]
    master = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    opt = torch.optim.AdamW(master, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=ctx.cuda)
    B, L = size.train_batch, size.train_seq
    tok = _random_tokens(cfg, model.layout, B, L, torch.Generator().manual_seed(ctx.seed + 4)).to(dev)
    losses: list[float] = []

    def step() -> None:
        out = model(tok, labels_BLC=tok)
        out.loss.backward()
        for p, m in zip(params, master):
            m.grad = p.grad.float()
            p.grad = None
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in zip(params, master):
                p.copy_(m)
        losses.append(float(out.loss.detach()))

    for _ in range(size.train_warmup):
        step()
    if ctx.cuda:
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    times = timed_ms(step, dev, size.train_steps, 0)
    ms = med(times)
    n_params = sum(p.numel() for p in params)
    counts = count_parameters(cfg)
    attn_flops = 3 * 2 * B * cfg.num_attention_heads * L * L * (cfg.qk_head_dim + cfg.v_head_dim) / 2 \
        * cfg.num_hidden_layers  # causal: half the score matrix; fwd + bwd = 3x fwd
    flops = 6 * counts["active"] * B * L + attn_flops
    states = 16 * n_params  # bf16 weights + bf16 grads + fp32 master + Adam m, v
    res.update({
        "slice": {"layers": cfg.num_hidden_layers, "moe_layers": cfg.num_moe_layers, "hidden": cfg.hidden_size,
                  "vocab_rows": model.embed.weight.shape[0], "parameters": n_params,
                  "active_parameters": counts["active"], "batch": B, "seq": L, "tokens": B * L},
        "precision": "bf16 weights and activations, fp32 master weights, torch AdamW (fused on CUDA), grad clip 1.0",
        "step_ms": ms, "min_ms": min(times), "steps": size.train_steps, "warmup": size.train_warmup,
        "tokens_per_s": B * L / ms * 1e3,
        "model_tflops_per_s": flops / (ms * 1e-3) / 1e12,
        "model_flops_formula": "6 x active parameters x tokens + causal attention scores and values (fwd + bwd)",
        "losses": losses, "loss_finite": all(math.isfinite(x) for x in losses),
        "model_states_gib": gib(states),
        **peak_memory(dev),
    })
    if ctx.cuda:
        res["peak_minus_states_gib"] = res["peak_memory_gib"] - res["model_states_gib"]
    res["passed"] = res["loss_finite"]
    del opt, master, params, model
    return res


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
    with contextlib.suppress(Exception):
        import subprocess

        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=5).stdout.strip() or None
    return env


def summary(result: dict) -> dict:
    s = result["sections"]
    out: dict[str, Any] = {}
    c = s.get("checks", {})
    if c.get("status") == "ok":
        out["checks_passed"] = c["passed"]
    m = s.get("moe_layer", {})
    if m.get("status") == "ok":
        out.update({"moe_ours_vs_transformers_grouped_mm": m["ratios"]["ours_vs_hf_grouped_mm"],
                    "moe_ours_pct_of_dense_rate": m["ratios"]["ours_pct_of_dense_rate"],
                    "moe_ours_tflops": m["rows"]["ours grouped_mm"]["tflops"], "moe_check_passed": m["passed"],
                    **{f"goal_moe_{k}": v for k, v in m["goals"].items()}})
    v = s.get("serving", {})
    if v.get("status") == "ok":
        out.update({"ttfa_1_session_p50_ms": v["ttfa"]["1_session"]["p50_ms"],
                    "ttfa_1_session_p99_ms": v["ttfa"]["1_session"]["p99_ms"],
                    "ttfa_concurrent_sessions": v["ttfa"]["concurrent"]["sessions"],
                    "ttfa_concurrent_p50_ms": v["ttfa"]["concurrent"]["p50_ms"],
                    "ttfa_concurrent_p99_ms": v["ttfa"]["concurrent"]["p99_ms"],
                    "goal_ttfa_1_session_under_250ms": v["goal_ttfa_1_session_under_250ms"],
                    **{f"decode_step_ms_{r}_rows": x["step_ms"] for r, x in v["decode_step"]["text_rows"].items()}})
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--preset", default=None, choices=sorted(SIZES),
                    help="model preset and sizes (default: deepseek-v2-lite on cuda, tiny on cpu)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=None, help=f"output folder (default $OUT, else {DEFAULT_OUT})")
    ap.add_argument("--budget-s", type=float, default=420.0, help="no section starts after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
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
        "script": "benchmarks/gpu_check.py", "args": {k: str(v) for k, v in vars(args).items()},
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
    runners = {"checks": section_checks, "moe_layer": section_moe_layer, "serving": section_serving,
               "training": section_training}
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
