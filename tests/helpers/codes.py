"""The inverse of the delay pattern, to check :func:`deepomni.model.channels.delay_codes` against."""

from __future__ import annotations

import torch


def undo_delay(delayed_KT: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`~deepomni.model.channels.delay_codes`: ``[K, F + K + 1] -> [K, F]`` (the frames every row has)."""
    *lead, K, T = delayed_KT.shape
    Fr = T - K - 1
    if Fr < 0:
        raise ValueError(f"a delayed sequence of {T} steps cannot hold {K} delayed channels")
    return torch.stack([delayed_KT[..., i, i + 1 : i + 1 + Fr] for i in range(K)], dim=-2)
