"""Codec quality measures."""

from __future__ import annotations

import numpy as np
import torch


def log_spectral_distance(reference: np.ndarray, decoded: np.ndarray, n_fft: int = 512, hop: int = 128,
                          dynamic_range_db: float = 80.0) -> float:
    """Log-spectral distance in dB: per STFT frame the RMS over frequency of
    ``10 log10 P_ref - 10 log10 P_dec``, averaged over frames (the usual LSD definition).

    Both power spectra get the same floor, ``dynamic_range_db`` below the reference's loudest bin, so
    digital silence in the reference does not turn into an unbounded error. The signals are compared over
    their common length (a codec pads to whole frames). 0 dB = identical spectra; this is a phase-blind
    measure, which is the right one for a magnitude codec whose phase is reconstructed.
    """
    n = min(len(reference), len(decoded))
    if n < n_fft:
        raise ValueError(f"signals of {n} samples are shorter than one {n_fft}-point frame")
    window = torch.hann_window(n_fft, dtype=torch.float64)

    def power(x: np.ndarray) -> torch.Tensor:
        x_t = torch.as_tensor(np.asarray(x[:n], dtype=np.float64))
        return torch.stft(x_t, n_fft, hop, window=window, center=False, return_complex=True).abs().square()

    p_ref, p_dec = power(reference), power(decoded)
    floor = p_ref.max().clamp_min(1e-20) * 10 ** (-dynamic_range_db / 10)
    diff_db = 10 * torch.log10((p_ref + floor) / (p_dec + floor))
    return float(diff_db.square().mean(dim=0).sqrt().mean())
