"""Log-mel analysis and its approximate inverse (mel -> linear magnitude) for the built-in codec.

Analysis: Hann-windowed STFT (``torch.stft``, centred, reflect padding) -> power -> Slaney mel filterbank
(transformers' ``mel_filter_bank``, the one Whisper's features use) -> dB with a floor. Frame ``t`` is
centred on sample ``t * hop``, which is what lets the synthesis in ``griffin_lim.py`` put it back in the
same place.

Inverse: a mel band only knows the total power under its triangle, so the fine structure inside a band is
lost for good. We take each band's *average* power (band power / filter weight sum) as the spectrum's value
at the band centre and interpolate linearly in dB between centres. This keeps the envelope smooth and
positive, which suits Griffin-Lim better than the filterbank's pseudo-inverse (negative lobes, clipped to
zero): on held-out espeak speech the unquantised round trip measured 6.4 dB LSD vs 6.9 dB for the
pseudo-inverse (80 mels).
"""

from __future__ import annotations

import numpy as np
import torch


class MelFrontend:
    """Fixed (parameter-free) mel analysis/synthesis tables for one sample rate and STFT geometry."""

    def __init__(self, sample_rate: int, hop_length: int, win_length: int, num_mels: int, floor_db: float):
        from transformers.audio_utils import mel_filter_bank

        self.hop_length, self.win_length, self.floor_db = hop_length, win_length, floor_db
        num_freqs = win_length // 2 + 1
        self.window = torch.hann_window(win_length)
        filters_FM = mel_filter_bank(num_freqs, num_mels, 0.0, sample_rate / 2, sample_rate,
                                     norm="slaney", mel_scale="slaney")
        self.filters_MF = torch.tensor(filters_FM.T, dtype=torch.float32)
        # mel dB -> average power dB per band: subtract the band's total filter weight
        self.band_weight_db_M = 10 * torch.log10(self.filters_MF.sum(1))
        # linear interpolation in frequency between band centres (constant beyond the outer centres)
        freqs_F = np.linspace(0, sample_rate / 2, num_freqs)
        centres_M = filters_FM.T @ freqs_F / filters_FM.sum(0)
        interp_FM = np.stack([np.interp(freqs_F, centres_M, row) for row in np.eye(num_mels)], axis=1)
        self.interp_MF = torch.tensor(interp_FM.T, dtype=torch.float32)

    def log_mel(self, wav: torch.Tensor) -> torch.Tensor:
        """``[samples]`` (a multiple of hop) -> dB mel power ``[samples // hop, mels]``."""
        frames = wav.shape[0] // self.hop_length
        if frames == 0:
            return torch.zeros(0, self.filters_MF.shape[0])
        spec_FT = torch.stft(wav, self.win_length, self.hop_length, window=self.window, center=True,
                             pad_mode="reflect", return_complex=True)[:, :frames]
        mel_MT = self.filters_MF @ spec_FT.abs().square()
        return 10 * torch.log10(mel_MT.clamp_min(10 ** (self.floor_db / 10))).T

    def magnitude(self, db_TM: torch.Tensor) -> torch.Tensor:
        """dB mel power ``[T, mels]`` -> linear STFT magnitude ``[T, win // 2 + 1]``."""
        linear_db_TF = (db_TM - self.band_weight_db_M) @ self.interp_MF
        return torch.pow(10.0, linear_db_TF / 20)
