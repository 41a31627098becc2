"""Streaming phase reconstruction: Griffin-Lim run block by block with the past frames held fixed.

Plain Griffin-Lim alternates "give the frames these magnitudes" and "make the frames one consistent
signal" over the whole signal, so its output changes everywhere until the last frame is known. This is the
real-time variant of Zhu, Beauregard & Wyse (RTISI, 2007): frames are committed a block at a time; while a
block is iterated, the frames already committed (the last ``win/hop - 1``, the only ones that overlap it)
are fixed and enter the overlap-add as they are. A new block starts from the phase the committed frames
imply (zero for the very first one), and the momentum of the fast Griffin-Lim of Perraudin et al. (2013)
speeds it up, with torchaudio's ``GriffinLim`` parametrisation.

Because a block only reads committed frames, the samples before the next block's first frame are final
after the block: ``step`` returns exactly those. Decoding a whole signal is the same loop, so streamed and
whole decodes are bit-identical however the blocks are grouped into calls.

Geometry matches ``torch.stft(center=True)``: frame ``t`` is centred on sample ``t * hop``; internally
everything is shifted by ``win // 2`` and the state drops that many samples at the front.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class GriffinLimState:
    """What one stream carries between blocks."""

    tail_NW: torch.Tensor  # windowed time signals of the last committed frames (the ones still overlapping)
    tail_weight_N: torch.Tensor  # 1 for committed frames, 0 for the virtual frames before the start
    skip: int  # samples still to drop from the front (the analysis' centring pad)


class StreamingGriffinLim:
    """Phase reconstruction of magnitude blocks ``[T, win // 2 + 1]`` into audio, block after block."""

    def __init__(self, hop_length: int, win_length: int, iters: int = 32, momentum: float = 0.99):
        if win_length % hop_length:
            raise ValueError(f"win_length {win_length} must be a multiple of hop_length {hop_length}")
        self.hop, self.win, self.iters = hop_length, win_length, iters
        self.momentum = momentum / (1 + momentum)  # torchaudio's parametrisation of the fast G-L step
        self.overlap = win_length // hop_length - 1  # earlier frames that overlap a new frame
        self.window = torch.hann_window(win_length)

    def init_state(self) -> GriffinLimState:
        return GriffinLimState(torch.zeros(self.overlap, self.win), torch.zeros(self.overlap), self.win // 2)

    def _overlap_add(self, frames_BNW: torch.Tensor) -> torch.Tensor:
        """Overlap-add ``[..., N, W]`` frames at ``hop`` -> ``[..., (N - 1) * hop + W]`` samples."""
        lead = frames_BNW.shape[:-2]
        x = frames_BNW.reshape(-1, *frames_BNW.shape[-2:])
        length = (x.shape[1] - 1) * self.hop + self.win
        out = F.fold(x.transpose(1, 2), (1, length), (1, self.win), stride=(1, self.hop))
        return out.reshape(*lead, length)

    def step(self, state: GriffinLimState, mag_TF: torch.Tensor) -> torch.Tensor:
        """Commit the frames of one block and return the samples that became final (``T * hop`` of them,
        fewer at the very start)."""
        return self.step_many([state], mag_TF.unsqueeze(0))[0]

    def step_many(self, states: list[GriffinLimState], mag_BTF: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`step` for B independent streams at once (same block length ``T``), as one batch of tensor
        ops: the per-op overhead that dominates a one-frame block is paid once for all streams."""
        B, num_new = mag_BTF.shape[0], mag_BTF.shape[1]
        if num_new == 0:
            return [torch.zeros(0) for _ in states]
        tail_BNW = torch.stack([st.tail_NW for st in states])
        weight_BN = torch.cat([torch.stack([st.tail_weight_N for st in states]), torch.ones(B, num_new)], dim=1)
        norm = self._overlap_add(self.window.square() * weight_BN[..., None]).clamp_min(1e-8)
        fixed = self._overlap_add(torch.cat([tail_BNW, torch.zeros(B, num_new, self.win)], dim=1))
        zeros_tail = torch.zeros_like(tail_BNW)

        def synthesise(new_BTW: torch.Tensor) -> torch.Tensor:
            return (fixed + self._overlap_add(torch.cat([zeros_tail, new_BTW], dim=1))) / norm

        new_BTW = torch.zeros(B, num_new, self.win)
        previous = torch.zeros_like(mag_BTF, dtype=torch.complex64)
        for _ in range(self.iters):
            frames = synthesise(new_BTW).unfold(-1, self.win, self.hop)[:, self.overlap:]
            rebuilt = torch.fft.rfft(frames * self.window)
            direction = rebuilt - self.momentum * previous
            previous = rebuilt
            # angle(0) = 0: where nothing is known yet (the first block) the phase starts at zero
            new_BTW = torch.fft.irfft(torch.polar(mag_BTF, direction.angle()), n=self.win) * self.window

        start = self.overlap * self.hop
        audio_BL = synthesise(new_BTW)[:, start:start + num_new * self.hop]
        tails = torch.cat([tail_BNW, new_BTW], dim=1)[:, -self.overlap:]
        out = []
        for b, st in enumerate(states):
            st.tail_NW, st.tail_weight_N = tails[b].clone(), weight_BN[b, -self.overlap:].clone()
            out.append(self._drop_front(st, audio_BL[b]))
        return out

    def flush(self, state: GriffinLimState) -> torch.Tensor:
        """The last ``win // 2`` samples, which only committed frames reach."""
        if not state.tail_weight_N.any():
            return torch.zeros(0)
        norm = self._overlap_add(self.window.square() * state.tail_weight_N[:, None]).clamp_min(1e-8)
        start = self.overlap * self.hop
        audio = (self._overlap_add(state.tail_NW) / norm)[start:start + self.win // 2]
        return self._drop_front(state, audio)

    @staticmethod
    def _drop_front(state: GriffinLimState, audio: torch.Tensor) -> torch.Tensor:
        drop = min(state.skip, audio.shape[0])
        state.skip -= drop
        return audio[drop:]
