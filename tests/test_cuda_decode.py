"""CUDA tests of decoding at DeepSeek-V2-Lite width: a ``check_layers``-layer model at full width and full
vocabulary (random weights, bf16; its fp32 twin holds the same values), on the GPU:

* ``test_incremental_*_matches_full_forward``: the logits of decoding steps against the full forward, through
  ``KVCache`` (every row the same length) and ``SlotKVCache`` (rows of different lengths, as the serving
  engine); bf16 against the fp32 full forward (baseline: the bf16 full forward), and the same in fp32.
* ``test_absorbed_matches_expanded_*``: one MLA layer's output for 1 and 4 new queries over a cache,
  ``kv_b_proj`` absorbed (what decoding uses) against expanded, bf16 against fp32 expanded (baseline: bf16
  expanded), and fp32 absorbed against fp32 expanded; again with inputs x4 (``1_query_sharp``: larger scores,
  attention far from uniform, as in a trained model; the absorbed form rounds its scores to bf16 before the
  softmax, SDPA keeps them in fp32). ``test_decode_uses_absorbed_attention``: decoding picks the absorbed form.
  (Both forms' time at the decode shape is a figure of the GPU run's ``serving`` section.)

Tolerances (normwise relative error ``||a - ref|| / ||ref||``, which a rare routing flip between two roundings
moves by far less than its own size, unlike a max-abs error): a bf16 path passes when its error is at most
``max(3 x baseline, 4 x 2^-8)``: a correct path differs from exact arithmetic by rounding alone, so it may round
differently from the reference path but not by much more (3x) than the reference path's own bf16 error; the
floor is four bf16 units of rounding (2^-8 each), for when the baseline is itself tiny. A wrong path
(mis-masked, mis-scaled, a stale cache row) errs by O(1). fp32 paths pass below 1e-3 (logits: a routing flip
between the two fp32 orders of summation moves one token) or 1e-4 (one attention layer: no routing).

Marked ``cuda``: skipped where CUDA is not available, unless ``DEEPOMNI_CUDA_CHECKS_DEVICE=cpu``, which runs
them on the CPU at the tiny preset's sizes (validation without a GPU)::

    DEEPOMNI_CUDA_CHECKS_DEVICE=cpu python -m pytest -W ignore -q -m cuda tests/test_cuda_*.py

(``DEEPOMNI_CUDA_CHECKS_PRESET`` / ``_SEED`` pick other sizes / seed; ``benchmarks/gpu/common.py``.) On the device
machine ``python -m benchmarks.gpu_check`` runs them first and records each test's outcome and figures
(``record_property``); without pytest there, ``benchmarks/gpu/checks.py`` calls these functions directly, so
this module must import without pytest, Ray or DeepSpeed. The models are built once per target and dropped in
``teardown_module``, so the GPU run's timed sections get the memory back.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from benchmarks.gpu.common import (FP32_TOL_LAYER, FP32_TOL_LOGITS, CheckTarget, all_passed, check_target,
                                   exact_fp32, judge_bf16, judge_fp32, load_cfg, max_abs, random_tokens, rel_err)
from benchmarks.gpu.common import cuda_checks_enabled, cuda_marks  # noqa: F401 (the skipif condition, read at setup)

pytestmark = cuda_marks()

_CACHE: dict[tuple, Any] = {}  # (device, preset, seed) -> models and the full forward's logits


def teardown_module() -> None:
    _CACHE.clear()


def _models(t: CheckTarget):
    """``(model16, model32)``: the check model in bf16 and the same values in fp32 (built once per target)."""
    key = (str(t.device), t.preset, t.seed)
    if key not in _CACHE:
        from deepomni.model.model import DeepOmniModel

        _CACHE.clear()
        cfg = load_cfg(t.preset)
        layers = t.size.check_layers
        cfg = cfg.replace(num_hidden_layers=layers, first_k_dense_replace=min(cfg.first_k_dense_replace, layers - 1))
        model16 = DeepOmniModel.random(cfg, device=t.device, dtype=torch.bfloat16, seed=t.seed,
                                       with_speech_input=False).eval()
        _CACHE[key] = {"models": (model16, copy.deepcopy(model16).float())}
    return _CACHE[key]["models"]


def _cat_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(logits, dim=-1)  # [B, L, sum of channel vocabularies]


@torch.no_grad()
def _full_forward(t: CheckTarget) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokens of the incremental checks and the full forward's logits, fp32 and bf16 (once per target)."""
    model16, model32 = _models(t)
    entry = _CACHE[(str(t.device), t.preset, t.seed)]
    if "full" not in entry:
        tok = random_tokens(model16.cfg, model16.layout, 2, t.size.check_len,
                            torch.Generator().manual_seed(t.seed + 2)).to(t.device)
        entry["full"] = tok, _cat_logits(model32(tok).logits), _cat_logits(model16(tok).logits)
    return entry["full"]


@torch.no_grad()
def _incremental(cache_kind: str) -> dict:
    from deepomni.model.attention import KVCache, SlotKVCache

    t = check_target()
    with exact_fp32():
        model16, model32 = _models(t)
        tok, full32, full16 = _full_forward(t)
        B, L, n = tok.shape[0], t.size.check_len, t.size.check_steps
        starts = [L - n - 3 * b for b in range(B)]  # SlotKVCache: row b continues from its own length

        def kv_steps(model) -> torch.Tensor:  # every row the same length: prefill, then one position per step
            cache = KVCache(len(model.layers))
            model(tok[:, : L - n], cache=cache)
            return torch.cat([_cat_logits(model(tok[:, i : i + 1], cache=cache).logits) for i in range(L - n, L)], 1)

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

        run, first = (kv_steps, [L - n] * B) if cache_kind == "kv_cache" else (slot_steps, starts)

        def at(full: torch.Tensor) -> torch.Tensor:
            return torch.stack([full[b, first[b] : first[b] + n] for b in range(B)])

        text_v = model16.layout.channel_size(0)

        def agree(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a[..., :text_v].argmax(-1) == b[..., :text_v].argmax(-1)).float().mean())

        ref32, ref16 = at(full32), at(full16)
        inc16, inc32 = run(model16), run(model32)
        return {"device": str(t.device), "preset": t.preset, "cache": cache_kind,
                "layers": model16.cfg.num_hidden_layers, "rows": B, "positions": L, "decode_steps": n,
                "bf16": judge_bf16(rel_err(inc16, ref32), rel_err(ref16, ref32)),
                "fp32": judge_fp32(rel_err(inc32, ref32), FP32_TOL_LOGITS),
                "bf16_incremental_vs_bf16_full_rel_err": rel_err(inc16, ref16),
                "bf16_max_abs_err": max_abs(inc16, ref32),
                "text_argmax_agreement_bf16_vs_fp32_full": agree(inc16, ref32),
                "text_argmax_agreement_baseline": agree(ref16, ref32)}


def test_incremental_kv_cache_matches_full_forward(record_property):
    res = _incremental("kv_cache")
    record_property("figures", res)
    assert res["bf16"]["passed"] and res["fp32"]["passed"], res
    assert res["bf16"]["baseline_rel_err"] > 0, res  # bf16 really differs from fp32: not vacuous


def test_incremental_slot_cache_matches_full_forward(record_property):
    res = _incremental("slot_cache")
    record_property("figures", res)
    assert res["bf16"]["passed"] and res["fp32"]["passed"], res
    assert res["bf16"]["baseline_rel_err"] > 0, res


@torch.no_grad()
def _absorbed(case: str) -> dict:
    """One MLA layer (layer 0), absorbed against expanded, for the case's new queries over a cache of
    ``attn_cache`` positions."""
    from deepomni.model.attention import KVCache

    cases = {"queries_1": (1, 1.0), "queries_4": (4, 1.0), "queries_1_sharp": (1, 4.0)}
    t = check_target()
    dev, B, S = t.device, t.size.attn_batch, t.size.attn_cache
    with exact_fp32():
        model16, model32 = _models(t)
        cfg, rot, scale = model16.cfg, model16.rotary, model16.rotary.softmax_scale
        attn16, attn32 = model16.layers[0].self_attn, model32.layers[0].self_attn
        gen = torch.Generator().manual_seed(t.seed + 3)
        x_pre = torch.randn(B, S, cfg.hidden_size, generator=gen).to(dev)
        for name, (Lq, x_scale) in cases.items():  # the inputs of the cases before this one, then this one's
            x_new = torch.randn(B, Lq, cfg.hidden_size, generator=gen).to(dev) * x_scale
            if name == case:
                break

        def attend(attn, dtype, absorb: bool) -> torch.Tensor:
            cache = KVCache(1)  # layer 0
            attn((x_pre * x_scale).to(dtype), rot(torch.arange(S, device=dev).expand(B, S)), scale, cache)
            attn.absorb = lambda L_, S_: absorb  # force one form (instance attribute over the method)
            try:
                return attn(x_new.to(dtype), rot(torch.arange(S, S + Lq, device=dev).expand(B, Lq)), scale, cache)
            finally:
                del attn.absorb

        # "sharp": inputs x4, so the scores are ~4x (nope part, its latent is normed) to ~16x (rope part) larger
        # and the attention far from uniform, as a trained model's (random weights give near-uniform attention)
        exp32 = attend(attn32, torch.float32, False)
        exp16 = attend(attn16, torch.bfloat16, False)
        abs16 = attend(attn16, torch.bfloat16, True)
        abs32 = attend(attn32, torch.float32, True)
        return {"device": str(t.device), "preset": t.preset, "case": case, "rows": B, "cached_positions": S,
                "new_queries": Lq, "input_scale": x_scale,
                "bf16": judge_bf16(rel_err(abs16, exp32), rel_err(exp16, exp32)),
                "fp32": judge_fp32(rel_err(abs32, exp32), FP32_TOL_LAYER),
                "bf16_max_abs_err": max_abs(abs16, exp32)}


def test_decode_uses_absorbed_attention(record_property):
    t = check_target()
    attn = _models(t)[0].layers[0].self_attn
    S = t.size.attn_cache
    uses = {"queries_1": bool(attn.absorb(1, S + 1)), "queries_4": bool(attn.absorb(4, S + 4))}
    record_property("figures", uses)
    assert all(uses.values()), uses


def test_absorbed_matches_expanded_1_query(record_property):
    res = _absorbed("queries_1")
    record_property("figures", res)
    assert all_passed(res), res


def test_absorbed_matches_expanded_4_queries(record_property):
    res = _absorbed("queries_4")
    record_property("figures", res)
    assert all_passed(res), res


def test_absorbed_matches_expanded_1_query_sharp(record_property):
    res = _absorbed("queries_1_sharp")
    record_property("figures", res)
    assert all_passed(res), res
