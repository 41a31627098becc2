"""Step 3 of the MoE layer (:mod:`deepomni.model.moe`): every expert's SwiGLU over its contiguous block of the
dispatched rows, from the stacked weights ``gate_up_E2FD`` [E, 2F, D] / ``down_EDF`` [E, D, F].

    expert_ffn(x_ND, counts_E, gate_up_E2FD, down_EDF, impl, weights_N)   # impl: auto | grouped_mm | loop

``grouped_mm``: torch's grouped matmul, one kernel per projection for all experts (CPU, and CUDA sm90+); on
CPU over chunks of consecutive experts (:data:`CPU_CHUNK_ROWS`). ``loop``: one plain matmul pair per expert.
``auto``: grouped where supported, and on CPU inference each expert's prepacked weights
(:mod:`deepomni.model.prepack`). Each row's router weight ``weights_N`` is folded into the activation before
the down projection (:class:`_SwiGLU`). Shape legend: ``deepomni/model/moe.py``.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .prepack import linear, prepacking


def grouped_mm_supported(device: torch.device) -> bool:
    """torch's grouped matmul runs on CPU and on CUDA sm90+ (Hopper); elsewhere use the segment loop."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return False


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up * w`` over the concatenated [gate | up] projection ``h_N2F``, ``w`` the router weight
    of each row (optional). Scaling the down projection's input by ``w`` equals scaling its output,
    ``(w a) W = w (a W)``, and the [N, F] activation is narrower than the [N, D] output.

    Written out rather than left to autograd because the layer is bound by memory traffic outside the
    matmuls: the forward multiplies in place, and the backward writes the gate and up gradients straight
    into one [N, 2F] tensor (no ``cat`` of the two halves), with fewer temporaries.
    """

    @staticmethod
    def forward(ctx, h_N2F: torch.Tensor, weights_N: torch.Tensor | None) -> torch.Tensor:
        gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
        silu_NF = F.silu(gate_NF)
        a_NF = silu_NF * up_NF
        if weights_N is not None:
            a_NF.mul_(weights_N.to(a_NF.dtype).unsqueeze(-1))
        ctx.save_for_backward(h_N2F, silu_NF, weights_N)
        return a_NF

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_NF: torch.Tensor):
        h_N2F, silu_NF, weights_N = ctx.saved_tensors
        gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
        grad_h_N2F = torch.empty_like(h_N2F)
        grad_gate_NF, grad_up_NF = grad_h_N2F.chunk(2, dim=-1)
        grad_silu_NF = grad_NF * up_NF  # times w below
        torch.mul(grad_NF, silu_NF, out=grad_up_NF)
        grad_w_N = None
        if weights_N is not None:
            w_N1 = weights_N.to(grad_NF.dtype).unsqueeze(-1)
            if ctx.needs_input_grad[1]:
                grad_w_N = (grad_silu_NF * silu_NF).sum(dim=-1).to(weights_N.dtype)
            grad_silu_NF.mul_(w_N1)
            grad_up_NF.mul_(w_N1)
        torch.ops.aten.silu_backward.grad_input(grad_silu_NF, gate_NF, grad_input=grad_gate_NF)
        return grad_h_N2F, grad_w_N


def swiglu(h_N2F: torch.Tensor, weights_N: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of ``h_N2F = [gate | up]``, each row times ``weights_N`` when given."""
    return _SwiGLU.apply(h_N2F, weights_N)


# On CPU the grouped matmul runs over chunks of consecutive experts of about this many rows. Outside the
# matmuls the layer is memory bound, and intermediates sized for the whole batch ([N, 2F] floats) both miss
# the caches and, above glibc's 32 MiB mmap threshold, come back from the OS as fresh pages to fault in and
# zero on every call. Chunks keep them small: 30-60% fewer page faults at 4096 tokens x top-6, and up to
# ~15% faster forward+backward depending on the allocator's state (benchmarks/moe_layer.py). GPUs (caching
# allocator, launch-bound) run all experts as one grouped matmul.
CPU_CHUNK_ROWS = 4096


def _expert_chunks(counts_E: list[int], min_rows: int) -> list[int]:
    """Sizes (in experts) of consecutive expert chunks with at least ``min_rows`` rows each (bar the last)."""
    sizes, start, rows = [], 0, 0
    for e, count in enumerate(counts_E):
        rows += count
        if rows >= min_rows:
            sizes.append(e + 1 - start)
            start, rows = e + 1, 0
    if start < len(counts_E):
        sizes.append(len(counts_E) - start)
    return sizes


# every ``*_ffn`` below: (x_ND, counts_E, gate_up_E2FD, down_EDF, weights_N) -> out_ND, as expert_ffn's
Tensor = torch.Tensor


def _grouped_ffn(x_ND: Tensor, counts_E: Tensor, gate_up_E2FD: Tensor, down_EDF: Tensor,
                 weights_N: Tensor | None) -> Tensor:
    """All experts with two grouped matmuls (one per projection)."""
    offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    h_N2F = torch._grouped_mm(x_ND, gate_up_E2FD.transpose(-2, -1), offs=offs_E)
    return torch._grouped_mm(swiglu(h_N2F, weights_N), down_EDF.transpose(-2, -1), offs=offs_E)


def _linear_ffn(x_MD: Tensor, counts_1: Tensor, gate_up_12FD: Tensor, down_1DF: Tensor,
                weights_M: Tensor | None) -> Tensor:
    """One expert (the stacked weights sliced to it) with plain matmuls (on packed weights where
    :func:`~deepomni.model.prepack.prepacking` says so)."""
    return linear(swiglu(linear(x_MD, gate_up_12FD[0]), weights_M), down_1DF[0])


def _packed_ffn(x_ND: Tensor, counts_E: Tensor, gate_up_E2FD: Tensor, down_EDF: Tensor,
                weights_N: Tensor | None) -> Tensor:
    """:func:`_linear_ffn` over the experts that have rows, one after another (no gradient is recorded
    here, so plain slices do, not :func:`_ffn_over_chunks`' splits; a decoding step touches few experts)."""
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            rows = slice(start, start + n)
            w_M = None if weights_N is None else weights_N[rows]
            outs.append(_linear_ffn(x_ND[rows], counts_E[e : e + 1], gate_up_E2FD[e : e + 1], down_EDF[e : e + 1], w_M))
            start += n
    return torch.cat(outs) if outs else x_ND.new_zeros(0, down_EDF.shape[1])


def _ffn_over_chunks(
    ffn: Callable[..., torch.Tensor],
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    weights_N: torch.Tensor | None,
    experts_C: list[int],
) -> torch.Tensor:
    """``ffn`` over consecutive chunks of ``experts_C`` experts each, outputs concatenated. Rows and weights
    are ``split`` (not sliced or indexed one by one) and the outputs joined by one ``cat``, so the backward
    assembles each gradient in a single buffer; chunks without rows are skipped (their gradients are 0)."""
    counts = counts_E.tolist()
    bounds = list(itertools.accumulate(experts_C, initial=0))
    rows_C = [sum(counts[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
    w_chunks = weights_N.split(rows_C) if weights_N is not None else [None] * len(rows_C)
    chunks = zip(x_ND.split(rows_C), counts_E.split(experts_C), gate_up_E2FD.split(experts_C),
                 down_EDF.split(experts_C), w_chunks)
    outs = [ffn(*chunk) for chunk in chunks if chunk[0].shape[0]]
    return torch.cat(outs) if outs else x_ND.new_zeros(0, down_EDF.shape[1])


def expert_ffn(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
    impl: str,
    weights_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """SwiGLU of every expert over its contiguous block of ``x_ND`` (blocks sized by ``counts_E``).

    ``weights_N`` (optional, one router weight per row) scales each row's output; it is folded into the
    activation before the down projection (see :class:`_SwiGLU`).
    """
    args = (x_ND, counts_E, gate_up_E2FD, down_EDF, weights_N)
    if impl == "auto":
        impl = "grouped_mm" if grouped_mm_supported(x_ND.device) else "loop"
        if prepacking(x_ND, gate_up_E2FD):  # CPU inference: each expert's packed weights (deepomni.model.prepack)
            return _packed_ffn(*args)
    if impl == "grouped_mm":
        if x_ND.device.type == "cpu":
            experts_C = _expert_chunks(counts_E.tolist(), CPU_CHUNK_ROWS)
            if len(experts_C) > 1:
                return _ffn_over_chunks(_grouped_ffn, *args, experts_C)
        return _grouped_ffn(*args)
    if impl == "loop":
        return _ffn_over_chunks(_linear_ffn, *args, [1] * counts_E.numel())
    raise ValueError(f"unknown moe_impl {impl!r} (expected auto | grouped_mm | loop)")
