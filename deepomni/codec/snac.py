"""SNAC (Siuzdak et al., 2024), the paper's speech codec, behind the :class:`~deepomni.codec.base.Codec`
interface.

Checkpoint: a local directory in the hub layout (``config.json`` = ``SNAC(**kwargs)``,
``pytorch_model.bin`` = state dict), read the way ``snac.SNAC.from_pretrained`` reads a local directory but
never touching the network. Supported: the 24 kHz layout, 3 RVQ levels with ``vq_strides [4, 2, 1]`` and
no local attention in the decoder (``hubertsiuzdak/snac_24khz``: ~12/23/47 Hz, 4096 codes per level).

Channels: level 0 has one code per coarse frame (``hop * 4`` samples, ~85 ms), level 1 two, level 2 four.
The common SNAC flattening puts the 7 codes of coarse frame ``i`` in depth-first order,
``[l0[i], l1[2i], l2[4i], l2[4i+1], l1[2i+1], l2[4i+2], l2[4i+3]]``, and channel ``c`` of our ``[7, F]``
codes holds position ``c`` of that list, as channel-local ids in ``[0, 4096)``.

Decoder noise: SNAC's decoder adds ``randn * linear(x)`` after every upsampling, with fresh noise at every
call, so two decodes of the same codes differ. We keep the trained behaviour but make the noise a function
of the absolute sample position (seeded blocks of a fixed table), so decoding is deterministic and a
window decoded on its own gets the same noise as inside the whole signal.

Streaming: the decoder is convolutional with a finite receptive field of ``R`` latent frames on each side
(computed from its layers: 12 for snac_24khz). A chunk is decoded together with ``context`` coarse frames
of codes on the left (sliding window) and its last ``lookahead`` coarse frames are held back until the
codes after them arrive (or ``flush``), ``context = lookahead = ceil(R / 4)`` (a coarse frame is 4 latent
frames). So every streamed sample is computed from all the codes that reach it in the whole decode;
streamed and whole decode differ only by floating-point reassociation in convolutions of different
lengths: ``STREAM_ATOL``. (Measured on the test model, the error is ~1e-6 with this context and ~1e-3 with
one coarse frame less, so the bound is tight.) Latency: ``lookahead`` coarse frames, 3 x 85 ms for
snac_24khz.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import Codec, require_files

CONFIG_FILE, WEIGHTS_FILE = "config.json", "pytorch_model.bin"
VQ_STRIDES = [4, 2, 1]
# channel c of a flattened frame holds (level, index within the frame at that level)
CHANNEL_LAYOUT = [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3)]
STREAM_ATOL = 1e-4  # max |streamed - whole decode| (tested); the differences seen are ~1e-6
NOISE_BLOCK = 4096  # samples per independently seeded block of the positional noise table


# ----------------------------------------------------------------------------------- channel layout
def flatten_codes(levels: list[torch.Tensor]) -> torch.Tensor:
    """SNAC's per-level codes ``[1, F], [1, 2F], [1, 4F]`` -> ``[7, F]``."""
    frames = levels[0].shape[-1]
    per_frame = [codes.reshape(frames, VQ_STRIDES[0] // stride) for codes, stride in zip(levels, VQ_STRIDES)]
    return torch.stack([per_frame[level][:, pos] for level, pos in CHANNEL_LAYOUT])


def unflatten_codes(codes_7F: torch.Tensor) -> list[torch.Tensor]:
    """``[7, F]`` -> SNAC's per-level codes ``[1, F], [1, 2F], [1, 4F]`` (inverse of :func:`flatten_codes`)."""
    levels = []
    for level in range(len(VQ_STRIDES)):
        in_frame_order = sorted((pos, c) for c, (lv, pos) in enumerate(CHANNEL_LAYOUT) if lv == level)
        levels.append(codes_7F[[c for _, c in in_frame_order]].T.reshape(1, -1))
    return levels


# ----------------------------------------------------------------------------------- decoder noise
class _NoiseClock(threading.local):
    """Where the latent frames now being decoded start in the whole signal; read by every noise layer.
    Thread-local, so streams decoded in different threads do not see each other's position."""

    latent_start: int = 0


class PositionalNoise(nn.Module):
    """SNAC's ``NoiseBlock`` (``x + randn * linear(x)``) with the noise of sample ``p`` fixed by ``p``."""

    def __init__(self, linear: nn.Module, upsample: int, layer: int, clock: _NoiseClock, seed: int):
        super().__init__()
        self.linear = linear  # same attribute name as NoiseBlock, so state-dict keys are unchanged
        self.upsample, self.layer, self.clock, self.seed = upsample, layer, clock, seed

    def noise(self, start: int, length: int) -> torch.Tensor:
        first, last = start // NOISE_BLOCK, (start + length - 1) // NOISE_BLOCK
        blocks = [torch.randn(NOISE_BLOCK, generator=torch.Generator().manual_seed(
            (self.seed << 40) + (self.layer << 32) + b)) for b in range(first, last + 1)]
        offset = start - first * NOISE_BLOCK
        return torch.cat(blocks)[offset:offset + length]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = self.noise(self.clock.latent_start * self.upsample, x.shape[-1])
        return x + noise.to(x)[None, None, :] * self.linear(x)


def _install_positional_noise(decoder: nn.Module, clock: _NoiseClock, seed: int) -> None:
    from snac.layers import DecoderBlock, NoiseBlock

    upsample, layer = 1, 0
    for block in decoder.modules():
        if isinstance(block, DecoderBlock):
            upsample *= next(m for m in block.block if isinstance(m, nn.ConvTranspose1d)).stride[0]
            for i, sub in enumerate(block.block):
                if isinstance(sub, NoiseBlock):
                    block.block[i] = PositionalNoise(sub.linear, upsample, layer, clock, seed)
                    layer += 1


def receptive_field(decoder: nn.Module) -> int:
    """One-sided receptive field of SNAC's decoder in latent frames (rounded up): each conv reaches
    ``dilation * (kernel - 1) / 2`` samples at its own rate; a transposed conv reaches ``kernel / stride``
    input samples and multiplies the rate by its stride."""
    reach, rate = 0.0, 1
    for module in decoder.modules():  # registration order = forward order for SNAC's Sequentials
        if isinstance(module, nn.ConvTranspose1d):
            reach += math.ceil(module.kernel_size[0] / module.stride[0]) / rate
            rate *= module.stride[0]
        elif isinstance(module, nn.Conv1d):
            reach += module.dilation[0] * (module.kernel_size[0] - 1) / 2 / rate
    return math.ceil(reach)


# ----------------------------------------------------------------------------------- codec
@dataclass
class SnacStreamState:
    codes_KF: torch.Tensor  # codes from frame `first` on: left context + frames not yet emitted
    first: int = 0  # absolute coarse frame of codes_KF[:, 0]
    emitted: int = 0  # coarse frames whose audio has been returned


# hubertsiuzdak/snac_24khz config.json (the paper's codec: 3 levels at ~12, 23, 47 Hz, 4096 codes)
SNAC_24KHZ = dict(sampling_rate=24000, encoder_dim=48, encoder_rates=[2, 4, 8, 8], decoder_dim=1024,
                  decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096, codebook_dim=8,
                  vq_strides=[4, 2, 1], noise=True, depthwise=True)


class SnacCodec(Codec):
    """A loaded SNAC model (eval mode, on ``device``) with 7-channel flattening and streaming decode."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", noise_seed: int = 0):
        strides, window = list(model.vq_strides), model.attn_window_size
        if strides != VQ_STRIDES or window is not None:
            raise ValueError(f"SnacCodec supports the 24 kHz layout (vq_strides {VQ_STRIDES}, no decoder "
                             f"attention); this checkpoint has vq_strides {strides}, attn_window_size {window}")
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.clock = _NoiseClock()
        _install_positional_noise(self.model.decoder, self.clock, noise_seed)
        self.context = self.lookahead = math.ceil(receptive_field(self.model.decoder) / VQ_STRIDES[0])

    @classmethod
    def random(cls, config: dict | None = None, device: str | torch.device = "cpu", seed: int = 0) -> SnacCodec:
        """SNAC's architecture (default: ``snac_24khz``'s published config) with random weights: what a
        benchmark needs to time decoding where no checkpoint can be downloaded."""
        from snac import SNAC

        torch.manual_seed(seed)
        return cls(SNAC(**(config or SNAC_24KHZ)), device)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> SnacCodec:
        from snac import SNAC

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"SNAC directory not found: {directory}")
        require_files(directory, [CONFIG_FILE, WEIGHTS_FILE], "SNAC")
        model = SNAC.from_config(str(directory / CONFIG_FILE))
        model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        return cls(model, device)

    # description ---------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return int(self.model.sampling_rate)

    @property
    def num_channels(self) -> int:
        return len(CHANNEL_LAYOUT)

    @property
    def codebook_size(self) -> int:
        return int(self.model.codebook_size)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.samples_per_frame

    @property
    def samples_per_frame(self) -> int:
        return int(self.model.hop_length) * VQ_STRIDES[0]

    # encode / decode -----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, wav: np.ndarray) -> torch.Tensor:
        """SNAC pads the audio at the end to whole coarse frames (``hop * 4`` samples) itself."""
        audio = torch.as_tensor(np.asarray(wav, dtype=np.float32), device=self.device).reshape(1, 1, -1)
        return flatten_codes([c.cpu() for c in self.model.encode(audio)])

    def decode(self, codes_KF: torch.Tensor) -> np.ndarray:
        return self._decode_window(self.check_codes(codes_KF), first=0)

    @torch.inference_mode()
    def _decode_window(self, codes_KF: torch.Tensor, first: int) -> np.ndarray:
        """Audio of the frames in ``codes_KF``, which start at absolute coarse frame ``first``."""
        if codes_KF.shape[1] == 0:
            return np.zeros(0, dtype=np.float32)
        self.clock.latent_start = first * VQ_STRIDES[0]
        levels = [c.to(self.device) for c in unflatten_codes(codes_KF)]
        return self.model.decode(levels).flatten().float().cpu().numpy()

    # streaming -----------------------------------------------------------------------------------
    def init_stream_state(self) -> SnacStreamState:
        return SnacStreamState(torch.zeros(self.num_channels, 0, dtype=torch.long))

    def stream_step(self, state: SnacStreamState, codes_KF: torch.Tensor) -> np.ndarray:
        state.codes_KF = torch.cat([state.codes_KF, codes_KF], dim=1)
        final = state.first + state.codes_KF.shape[1] - self.lookahead  # frames before this are settled
        if final <= state.emitted:
            return np.zeros(0, dtype=np.float32)
        audio = self._emit(state, end=final + self.lookahead, upto=final)
        # keep only the left context the next window needs, plus the held-back frames
        keep_from = max(state.first, final - self.context)
        state.codes_KF = state.codes_KF[:, keep_from - state.first:]
        state.first = keep_from
        return audio

    def stream_flush(self, state: SnacStreamState) -> np.ndarray:
        end = state.first + state.codes_KF.shape[1]
        return self._emit(state, end=end, upto=end)

    def _emit(self, state: SnacStreamState, end: int, upto: int) -> np.ndarray:
        """Decode frames ``[emitted - context, end)`` and return the audio of ``[emitted, upto)``."""
        start = max(state.first, state.emitted - self.context)
        window = state.codes_KF[:, start - state.first:end - state.first]
        audio = self._decode_window(window, first=start)
        spf = self.samples_per_frame
        audio = audio[(state.emitted - start) * spf:(upto - start) * spf]
        state.emitted = upto
        return audio
