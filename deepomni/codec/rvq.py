"""Residual vector quantisation with codebooks fitted by k-means.

Level 1 quantises the vector, level 2 what level 1 left over, and so on: the first channel alone gives a
coarse version and every further channel refines it, which is the structure the model's delay pattern
assumes (coarse codes first). Codebooks are plain k-means centroids (k-means++ seeding, Lloyd
iterations) from a seeded ``torch.Generator``, so a fit is reproducible.
"""

from __future__ import annotations

from typing import Callable

import torch


def nearest(x_ND: torch.Tensor, centroids_CD: torch.Tensor) -> torch.Tensor:
    """Index of the closest centroid (Euclidean) for every row."""
    return torch.cdist(x_ND, centroids_CD).argmin(dim=1)


def kmeans(x_ND: torch.Tensor, k: int, iters: int, generator: torch.Generator,
           on_iter: Callable[[], None] = lambda: None) -> torch.Tensor:
    """``k`` centroids ``[k, D]`` of the rows of ``x_ND``. With fewer distinct rows than ``k`` some
    centroids repeat, which is harmless (they are just never the unique nearest). ``on_iter`` is called
    after the seeding and after every Lloyd iteration (progress bars)."""
    n = x_ND.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one vector")
    # k-means++: each new seed is drawn with probability proportional to its squared distance
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    dist2_N = (x_ND - x_ND[chosen[0]]).square().sum(1)
    for _ in range(k - 1):
        total = dist2_N.sum()
        probs = dist2_N / total if total > 0 else torch.full((n,), 1.0 / n)
        chosen.append(int(torch.multinomial(probs, 1, generator=generator)))
        dist2_N = torch.minimum(dist2_N, (x_ND - x_ND[chosen[-1]]).square().sum(1))
    centroids_KD = x_ND[chosen].clone()
    on_iter()
    for _ in range(iters):
        assign_N = nearest(x_ND, centroids_KD)
        sums_KD = torch.zeros_like(centroids_KD).index_add_(0, assign_N, x_ND)
        counts_K = torch.bincount(assign_N, minlength=k)
        # an empty cluster keeps its centroid rather than becoming NaN
        centroids_KD = torch.where(counts_K[:, None] > 0, sums_KD / counts_K.clamp_min(1)[:, None], centroids_KD)
        on_iter()
    return centroids_KD


def fit_rvq(x_ND: torch.Tensor, levels: int, codebook_size: int, iters: int, generator: torch.Generator,
            on_iter: Callable[[], None] = lambda: None) -> torch.Tensor:
    """Codebooks ``[levels, codebook_size, D]``, each fitted on the residual the previous ones leave."""
    codebooks = []
    residual_ND = x_ND
    for _ in range(levels):
        centroids_CD = kmeans(residual_ND, codebook_size, iters, generator, on_iter)
        residual_ND = residual_ND - centroids_CD[nearest(residual_ND, centroids_CD)]
        codebooks.append(centroids_CD)
    return torch.stack(codebooks)


def rvq_encode(x_ND: torch.Tensor, codebooks_LCD: torch.Tensor) -> torch.Tensor:
    """Greedy residual quantisation: codes ``[levels, N]``."""
    codes = []
    residual_ND = x_ND
    for centroids_CD in codebooks_LCD:
        idx_N = nearest(residual_ND, centroids_CD)
        residual_ND = residual_ND - centroids_CD[idx_N]
        codes.append(idx_N)
    return torch.stack(codes) if codes else torch.zeros(0, x_ND.shape[0], dtype=torch.long)


def rvq_decode(codes_LN: torch.Tensor, codebooks_LCD: torch.Tensor) -> torch.Tensor:
    """Sum of the chosen centroids of the given levels (``codes_LN`` may hold fewer levels than there
    are codebooks: the coarse-only reconstruction)."""
    x_ND = torch.zeros(codes_LN.shape[1], codebooks_LCD.shape[2])
    for level, idx_N in enumerate(codes_LN):
        x_ND = x_ND + codebooks_LCD[level][idx_N]
    return x_ND
