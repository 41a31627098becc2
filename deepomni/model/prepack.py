"""Prepacked oneDNN weights for decoding on CPU.

A decoding step multiplies one or a few rows by every weight it uses, so on a CPU it is bound by reading
cold weights from memory. MKL's matrix-vector products read a plain row-major weight at about 10 GB/s on
a 2-core EPYC whatever its size; the same weight reordered once into oneDNN's blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, what inductor's CPU ``freezing`` uses) reads faster: a
whole decoding step is 8% (1 row) to 20% (16 rows) shorter (``benchmarks/decode.py``).

:class:`Prepacked` holds the packed copies, made on first use of each weight and made again when the
weight changed in place (its version counter moved); it keeps the source tensors alive, so a cached
address never points at another tensor. While :func:`prepacked` is active in a thread, :func:`linear`
(and :class:`Linear`, an ``nn.Linear`` whose parameters and state-dict names are unchanged) runs packed
where that pays: a CPU float32 input of 1 to ``MAX_ROWS`` rows (a decoding step, not a prefill), no
gradient being recorded. Anything else, or a build without oneDNN, runs ``F.linear`` as always. The
packed copies cost as much memory as the weights they mirror. The serving engine uses them when asked
(``BatchEngine(prepack=True)``, the app's ``prepack_weights``): alone in its process a step is shorter,
but beside other threads doing torch work (the in-process pipeline of ``benchmarks/serve_latency.py``:
encoder, engine and vocoder threads) 16 sessions arriving together waited twice as long.

Results equal ``F.linear``'s up to float rounding (a different summation order: about 1e-6 relative).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

PACK_FOR_ROWS = 16  # the row count oneDNN packs for; 1-64 rows all read the packed weight faster than MKL
# products of more rows (a prefill) stay with MKL: they are not bound by reading the weight, and packing
# was measured for decoding steps only
MAX_ROWS = 64
_active = threading.local()


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Prepacked:
    """Packed copies of 2-D float32 weights (or views of them), keyed by address, shape and strides."""

    def __init__(self):
        self._packed: dict[tuple, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._packed)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()))
        hit = self._packed.get(key)
        if hit is not None and hit[0] == w._version:
            return hit[1]
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), PACK_FOR_ROWS)
        self._packed[key] = (w._version, packed, w)  # w kept alive: its address stays its own
        return packed


@contextmanager
def prepacked(cache: Prepacked | None):
    """Run :func:`linear` with ``cache``'s packed weights in this thread (``None``: a no-op)."""
    previous = getattr(_active, "cache", None)
    _active.cache = cache
    try:
        yield cache
    finally:
        _active.cache = previous


def prepacking(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`linear` runs ``x`` times ``w`` packed: :func:`prepacked` is active in this thread,
    no gradient is being recorded, both are float32 on the CPU, and ``x`` has 1 to ``MAX_ROWS`` rows."""
    return (getattr(_active, "cache", None) is not None and not torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and 0 < x.numel() <= MAX_ROWS * x.shape[-1])


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` (no bias), through a packed copy of ``w`` where :func:`prepacking` says so."""
    if not prepacking(x, w):
        return F.linear(x, w)
    return torch.ops.mkldnn._linear_pointwise(x, _active.cache.weight(w), None, "none", [None], "")


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose forward goes through :func:`linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
