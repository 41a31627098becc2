"""What the GPU run's sections and the CUDA tests (``tests/test_cuda_*.py``) share: the sizes of each preset,
the run's context, timing, and the error metric with its tolerances.

Tolerances (normwise relative error ``||a - ref|| / ||ref||``, which a rare routing flip between two roundings
moves by far less than its own size, unlike a max-abs error): a bf16 path passes when its error is at most
``max(3 x baseline, 4 x 2^-8)``: a correct path differs from exact arithmetic by rounding alone, so it may round
differently from the reference path but not by much more (3x) than the reference path's own bf16 error; the
floor is four bf16 units of rounding (2^-8 each), for when the baseline is itself tiny. A wrong path
(mis-routed, mis-masked, mis-scaled) errs by O(1). fp32 paths pass below 1e-3 (logits: a routing flip between
two fp32 orders of summation moves one token) or 1e-4 (one layer: no routing).

Where the CUDA tests run (read when they run, so a caller may set them first):

    DEEPOMNI_CUDA_CHECKS_DEVICE   cuda (default; the tests skip without CUDA) | cpu (run on the CPU) | cuda:N
    DEEPOMNI_CUDA_CHECKS_PRESET   sizes and model preset (default: deepseek-v2-lite on cuda, tiny on cpu)
    DEEPOMNI_CUDA_CHECKS_SEED     default 0
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORBIDDEN = ("ray", "deepspeed")  # not in the device image: nothing the GPU run imports may need them

BF16_UNIT = 2.0**-8  # bf16 unit roundoff (8 significant bits)
BF16_FACTOR = 3.0  # a bf16 path may err up to this many times the reference path's own bf16 error
BF16_FLOOR = 4 * BF16_UNIT
FP32_TOL_LOGITS = 1e-3
FP32_TOL_LAYER = 1e-4

ENV_DEVICE = "DEEPOMNI_CUDA_CHECKS_DEVICE"
ENV_PRESET = "DEEPOMNI_CUDA_CHECKS_PRESET"
ENV_SEED = "DEEPOMNI_CUDA_CHECKS_SEED"


@dataclass(frozen=True)
class Sizes:
    # 1. checks (the CUDA tests)
    check_layers: int  # layers of the model of the logits checks (full width and vocabulary)
    check_moe_tokens: int  # tokens (2 sequences) of the grouped-vs-loop check
    check_len: int  # positions (2 sequences) of the incremental check ...
    check_steps: int  # ... of which the last ones are decoded one at a time
    attn_batch: int  # absorbed vs expanded: rows ...
    attn_cache: int  # ... and cached positions
    attn_iters: int  # timed decode-shape attention calls (serving section)
    # 2. moe layer (also the tokens of its check against transformers)
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


# ------------------------------------------------------------------------------- where the CUDA tests run
@dataclass(frozen=True)
class CheckTarget:
    device: torch.device
    preset: str
    size: Sizes
    seed: int


def check_target() -> CheckTarget:
    """The CUDA tests' device, preset, sizes and seed, from ``DEEPOMNI_CUDA_CHECKS_*`` (module docstring)."""
    device = torch.device(os.environ.get(ENV_DEVICE) or "cuda")
    preset = os.environ.get(ENV_PRESET) or ("tiny" if device.type == "cpu" else "deepseek-v2-lite")
    return CheckTarget(device, preset, SIZES[preset], int(os.environ.get(ENV_SEED) or 0))


def cuda_checks_enabled() -> bool:
    """Whether the CUDA tests run here: on the CPU when asked to, else only where CUDA is available."""
    return (os.environ.get(ENV_DEVICE) or "cuda").startswith("cpu") or torch.cuda.is_available()


def cuda_marks() -> list:
    """The marks of a module of CUDA checks: ``cuda``, and skipped unless :func:`cuda_checks_enabled` (a string
    condition, read when each test starts: the module must import ``cuda_checks_enabled``); none where pytest
    is missing (the device image: ``benchmarks.gpu.checks`` calls the tests itself)."""
    try:
        import pytest
    except ImportError:
        return []
    return [pytest.mark.cuda, pytest.mark.skipif("not cuda_checks_enabled()", reason=f"no CUDA ({ENV_DEVICE}=cpu "
                                                                                     "runs them on the CPU)")]


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set for the block, restored after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 references are fp32: no TF32 in matmuls or cuDNN inside the block."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------------------------------------ timing
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


# ----------------------------------------------------------------------------------------- error metric
def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise relative error ``||a - ref||_F / ||ref||_F`` (difference in fp32, sums in fp64)."""
    a, ref = a.detach().float(), ref.detach().to(a.device).float()
    num = (a - ref).pow_(2).sum(dtype=torch.float64)
    den = ref.pow(2).sum(dtype=torch.float64)
    return float((num / den.clamp_min(1e-300)).sqrt())


def max_abs(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().float() - ref.detach().to(a.device).float()).abs().max())


def judge_bf16(err: float, baseline: float) -> dict:
    """A bf16 path's error against the fp32 reference, passing at ``max(3 x baseline, 4 x 2^-8)``."""
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


# ----------------------------------------------------------------------------------------------- memory
def free_memory(device: torch.device) -> None:
    """Give the last section's GPU memory back (tensors held in reference cycles too)."""
    gc.collect()
    if device.type == "cuda":
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


# ------------------------------------------------------------------------------------------------ models
def load_cfg(preset: str):
    from deepomni.config import load_preset

    return load_preset(preset)


def random_tokens(cfg, layout, B: int, L: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, L, 1 + codec channels]`` random ids: text, then each codec channel."""
    text = torch.randint(0, cfg.text_vocab_size, (B, L, 1), generator=gen)
    codec = torch.randint(0, cfg.codebook_size, (B, L, layout.num_codec_channels), generator=gen)
    return torch.cat([text, codec], dim=-1)
