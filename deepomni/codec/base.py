"""The speech-output codec interface: audio <-> K channels of codes, decoded whole or as a stream.

The model writes one text channel plus K codec channels per step (docs/paper.md "Tokens and channels"); a
:class:`Codec` turns a waveform into those K channels (``[K, frames]``, channel-local ids in
``[0, codebook_size)``) and back. Serving hears the answer while it is generated, so every codec also
decodes incrementally: :meth:`Codec.stream_decoder` returns a :class:`StreamDecoder` that takes codes as
they arrive and returns the audio that no later code can change.

Streaming follows moshi: the state is an explicit data object made by :meth:`Codec.init_stream_state`
and advanced by :meth:`Codec.stream_step` / :meth:`Codec.stream_flush`; the :class:`StreamDecoder` only
holds one such state, so independent streams never share anything. Each codec documents how its
streamed audio relates to :meth:`Codec.decode` (exactly equal, or within a stated tolerance).

:func:`load_codec` builds a codec from a spec string: ``builtin:<dir>`` (this package's weight-free
mel/RVQ codec) or ``snac:<dir>`` (a local SNAC checkpoint, the paper's codec).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch


class Codec(ABC):
    """Waveform (mono float32 at :attr:`sample_rate`) <-> codes ``[K, frames]``."""

    # ------------------------------------------------------------------------------------ description
    @property
    @abstractmethod
    def sample_rate(self) -> int:
        """Audio samples per second that :meth:`encode` expects and :meth:`decode` returns."""

    @property
    @abstractmethod
    def num_channels(self) -> int:
        """K: codec tokens per frame, one per channel."""

    @property
    @abstractmethod
    def codebook_size(self) -> int:
        """Codes of every channel are channel-local ids in ``[0, codebook_size)``."""

    @property
    @abstractmethod
    def frame_rate(self) -> float:
        """Codec frames per second (the model's speech steps per second)."""

    @property
    def samples_per_frame(self) -> int:
        """Audio samples one frame decodes to."""
        return round(self.sample_rate / self.frame_rate)

    # ------------------------------------------------------------------------------------ whole signals
    @abstractmethod
    def encode(self, wav: np.ndarray) -> torch.Tensor:
        """Mono float32 audio at :attr:`sample_rate` -> ``LongTensor [K, frames]``; the audio is padded
        at the end to whole frames, so ``frames = ceil(len(wav) / samples_per_frame)`` (SNAC may pad
        further, to its own block size)."""

    @abstractmethod
    def decode(self, codes_KF: torch.Tensor) -> np.ndarray:
        """``[K, frames]`` -> mono float32 audio of ``frames * samples_per_frame`` samples."""

    # ------------------------------------------------------------------------------------ streaming
    @abstractmethod
    def init_stream_state(self) -> Any:
        """A fresh state object for one stream (a dataclass of tensors and counters)."""

    @abstractmethod
    def stream_step(self, state: Any, codes_KF: torch.Tensor) -> np.ndarray:
        """Take the next ``codes_KF`` frames (any number, also 0), update ``state`` in place and return
        the audio that has become final."""

    @abstractmethod
    def stream_flush(self, state: Any) -> np.ndarray:
        """No more codes: return the rest of the audio."""

    def stream_step_many(self, states: list[Any], codes: list[torch.Tensor]) -> list[np.ndarray]:
        """:meth:`stream_step` for several independent streams (serving batches the answers decoding at
        the same time). The default loops; codecs whose step is overhead-bound batch it."""
        return [self.stream_step(st, c) for st, c in zip(states, codes)]

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    # ------------------------------------------------------------------------------------ checks
    def check_codes(self, codes_KF: torch.Tensor) -> torch.Tensor:
        """Validate a code block and return it as a CPU ``LongTensor`` (errors name what is wrong, since
        codes usually come from a model and an off-by-one in the channel layout is the common bug)."""
        codes_KF = torch.as_tensor(codes_KF)
        if codes_KF.dim() != 2 or codes_KF.shape[0] != self.num_channels:
            raise ValueError(f"codes must be [K={self.num_channels}, frames], got {tuple(codes_KF.shape)}")
        if codes_KF.dtype.is_floating_point or codes_KF.dtype == torch.bool:
            raise ValueError(f"codes must be integer ids, got {codes_KF.dtype}")
        codes_KF = codes_KF.long().cpu()
        if codes_KF.numel() and (codes_KF.min() < 0 or codes_KF.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got "
                             f"[{int(codes_KF.min())}, {int(codes_KF.max())}]")
        return codes_KF


class StreamDecoder:
    """One decoding stream: ``push`` code chunks as they are generated, then ``flush`` once.

    ``concat(push(c_1), ..., push(c_n), flush())`` is the decoding of ``concat(c_1, ..., c_n)``; how
    close it is to :meth:`Codec.decode` is the codec's documented streaming tolerance. After ``flush``
    the decoder starts a new stream.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.state = codec.init_stream_state()

    def push(self, codes_KF: torch.Tensor) -> np.ndarray:
        return self.codec.stream_step(self.state, self.codec.check_codes(codes_KF))

    def flush(self) -> np.ndarray:
        audio = self.codec.stream_flush(self.state)
        self.state = self.codec.init_stream_state()
        return audio


def require_files(directory: Path, names: list[str], what: str) -> None:
    """Raise one FileNotFoundError that lists every missing file of a checkpoint directory."""
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} directory {directory} lacks {', '.join(missing)}")
