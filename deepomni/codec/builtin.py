"""The built-in codec: log-mel frames, residual VQ fitted in seconds, Griffin-Lim back to audio.

It exists so that the whole pipeline (data -> model -> speech out) runs on a CPU with no downloaded
weights; it is a stand-in for SNAC, not a rival. One codec frame is 80 ms by default (12.5 Hz, close to
SNAC's ~85 ms coarse frames); ``deepomni data prepare`` fits it at 40 ms (``DataConfig.codec_frame_ms``:
with byte-level text the text channel must run faster than the speech it paces, docs/paper.md
"Speech output"). At 80 ms:

    audio 16 kHz -> log-mel, 80 bands, 10 ms hop, 40 ms Hann window            (mel.py)
      -> 8 consecutive mel frames stacked into one 640-dim frame vector
      -> K-level residual VQ, codebooks fitted by k-means (256 codes each)    (rvq.py)  = codes [K, frames]
    codes -> sum of centroids -> mel frames -> linear magnitude (interpolated between band centres)
      -> streaming Griffin-Lim, one codec frame per block                      (griffin_lim.py)

Why these numbers: a 10 ms hop with a 40 ms window gives Griffin-Lim the 4x overlap it needs for clean phase
(a 20 ms hop halves the overlap and sounds rougher); 80 bands measured 1.5 dB LSD better than 40 on
held-out speech before quantisation. The codebooks are fitted on every 8-frame window at a 10 ms stride,
not only the ones aligned to codec frames: 8x the training vectors from the same audio, and codebooks that
do not depend on where a frame boundary falls.

Streaming: decoding *is* the streaming loop (one Griffin-Lim block per codec frame, each dequantised on its
own so every block sees the same shapes), so ``stream_decoder()`` output equals ``decode()`` bit for bit,
for any chunking. Latency: a frame's audio is final once the frame arrives, except the last 20 ms, which
wait for the next frame (or ``flush``).

Files: ``config.json`` (:class:`BuiltinConfig`) + ``codebooks.safetensors`` (``codebooks [K, C, D]``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import configclass, parse_config
from .base import Codec, require_files
from .griffin_lim import GriffinLimState, StreamingGriffinLim
from .mel import MelFrontend
from .rvq import fit_rvq, rvq_decode, rvq_encode

CONFIG_FILE, WEIGHTS_FILE = "config.json", "codebooks.safetensors"


@configclass()
class BuiltinConfig:
    sample_rate: int = 16000
    hop_length: int = 160  # 10 ms between mel frames
    win_length: int = 640  # 40 ms Hann window: 4x overlap for Griffin-Lim
    num_mels: int = 80
    mel_frames_per_code: int = 8  # mel frames stacked into one codec frame: 8 x 10 ms = 80 ms
    num_channels: int = 4  # K, RVQ levels
    codebook_size: int = 256
    floor_db: float = -100.0  # mel power floor (dB re full-scale), where digital silence lands
    griffin_lim_iters: int = 16  # per block: held-out LSD 7.65 dB vs 7.62 at 32, decoding 1.9x faster (benchmarks/codec_quality.py)
    griffin_lim_momentum: float = 0.99

    @property
    def frame_dim(self) -> int:
        return self.num_mels * self.mel_frames_per_code

    @property
    def samples_per_frame(self) -> int:
        return self.hop_length * self.mel_frames_per_code


class BuiltinCodec(Codec):
    """Mel + RVQ + Griffin-Lim codec; build one with :func:`fit_builtin_codec` or :meth:`load`."""

    def __init__(self, config: BuiltinConfig, codebooks_KCD: torch.Tensor):
        expected = (config.num_channels, config.codebook_size, config.frame_dim)
        if tuple(codebooks_KCD.shape) != expected:
            raise ValueError(f"codebooks must be {expected} for this config, got {tuple(codebooks_KCD.shape)}")
        self.config = config
        self.codebooks_KCD = codebooks_KCD.float().contiguous()
        self.mel = MelFrontend(config.sample_rate, config.hop_length, config.win_length, config.num_mels,
                               config.floor_db)
        self.griffin_lim = StreamingGriffinLim(config.hop_length, config.win_length, config.griffin_lim_iters,
                                               config.griffin_lim_momentum)

    # description ---------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def num_channels(self) -> int:
        return self.config.num_channels

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def frame_rate(self) -> float:
        return self.config.sample_rate / self.config.samples_per_frame

    # encode / decode -----------------------------------------------------------------------------
    def frame_vectors(self, wav: np.ndarray) -> torch.Tensor:
        """Audio -> the vectors the RVQ quantises, ``[frames, mel_frames_per_code * mels]`` (audio padded
        with zeros to whole frames)."""
        wav_t = torch.as_tensor(np.asarray(wav, dtype=np.float32)).flatten()
        wav_t = torch.nn.functional.pad(wav_t, (0, -wav_t.shape[0] % self.config.samples_per_frame))
        return self.mel.log_mel(wav_t).reshape(-1, self.config.frame_dim)

    def encode(self, wav: np.ndarray) -> torch.Tensor:
        return rvq_encode(self.frame_vectors(wav), self.codebooks_KCD)

    def decode(self, codes_KF: torch.Tensor, levels: int | None = None) -> np.ndarray:
        """Decode; ``levels`` < K uses only the first (coarsest) RVQ levels, to measure what each adds."""
        codes_KF = self.check_codes(codes_KF)
        state = self.init_stream_state()
        head = self._step(state, codes_KF, levels)
        return np.concatenate([head, self.stream_flush(state)])

    # streaming -----------------------------------------------------------------------------------
    def init_stream_state(self) -> GriffinLimState:
        return self.griffin_lim.init_state()

    def stream_step(self, state: GriffinLimState, codes_KF: torch.Tensor) -> np.ndarray:
        return self._step(state, codes_KF, None)

    def stream_step_many(self, states: list[GriffinLimState], codes: list[torch.Tensor]) -> list[np.ndarray]:
        """Frame j of every stream that has one goes through one batched Griffin-Lim block: the same
        numbers as one stream at a time, at a fraction of the per-frame overhead."""
        cfg = self.config
        vectors = [rvq_decode(c, self.codebooks_KCD) for c in codes]
        out: list[list[np.ndarray]] = [[np.zeros(0, dtype=np.float32)] for _ in states]
        for j in range(max((v.shape[0] for v in vectors), default=0)):
            idx = [i for i, v in enumerate(vectors) if v.shape[0] > j]
            mags = torch.stack([self.mel.magnitude(vectors[i][j].reshape(cfg.mel_frames_per_code, cfg.num_mels))
                                for i in idx])
            for i, audio in zip(idx, self.griffin_lim.step_many([states[i] for i in idx], mags)):
                out[i].append(audio.numpy())
        return [np.concatenate(o) for o in out]

    def stream_flush(self, state: GriffinLimState) -> np.ndarray:
        return self.griffin_lim.flush(state).numpy()

    def _step(self, state: GriffinLimState, codes_KF: torch.Tensor, levels: int | None) -> np.ndarray:
        return self.synthesise(state, rvq_decode(codes_KF[:levels], self.codebooks_KCD))

    def synthesise(self, state: GriffinLimState, vectors_FD: torch.Tensor) -> np.ndarray:
        """Frame vectors (quantised, or straight from :meth:`frame_vectors` to measure the mel/Griffin-Lim
        floor) -> the audio that became final. One block per frame, so the work is identical however the
        frames are chunked."""
        cfg = self.config
        out = [np.zeros(0, dtype=np.float32)]
        for vector_D in vectors_FD:
            mag_TF = self.mel.magnitude(vector_D.reshape(cfg.mel_frames_per_code, cfg.num_mels))
            out.append(self.griffin_lim.step(state, mag_TF).numpy())
        return np.concatenate(out)

    # files ---------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        save_file({"codebooks": self.codebooks_KCD}, str(directory / WEIGHTS_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> BuiltinCodec:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"built-in codec directory not found: {directory}")
        require_files(directory, [CONFIG_FILE, WEIGHTS_FILE], "built-in codec")
        config = parse_config(BuiltinConfig, json.loads((directory / CONFIG_FILE).read_text()))
        return cls(config, load_file(str(directory / WEIGHTS_FILE))["codebooks"])


def mel_frames_for(frame_ms: int, config: BuiltinConfig | None = None) -> int:
    """The ``mel_frames_per_code`` of a ``frame_ms`` codec frame (a multiple of the mel hop, 10 ms)."""
    config = config or BuiltinConfig()
    hop_ms = 1000 * config.hop_length / config.sample_rate
    n = round(frame_ms / hop_ms)
    if n < 1 or abs(n * hop_ms - frame_ms) > 1e-6:
        raise ValueError(f"the built-in codec's frame must be a positive multiple of its {hop_ms:g} ms mel hop, "
                         f"got {frame_ms} ms")
    return n


def fit_builtin_codec(wavs: Sequence[np.ndarray], sample_rate: int = 16000, num_channels: int = 4,
                      codebook_size: int = 256, seed: int = 0, kmeans_iters: int = 20,
                      max_vectors: int = 30000, progress: bool = True, **config: object) -> BuiltinCodec:
    """Fit the RVQ codebooks on a corpus of mono float32 waveforms at ``sample_rate``.

    Deterministic for a given corpus, seed and machine. ``max_vectors`` caps the training set (a seeded
    random subset) so a large corpus still fits in well under a minute on a CPU; other keyword arguments
    override :class:`BuiltinConfig` fields.
    """
    cfg = BuiltinConfig(sample_rate=sample_rate, num_channels=num_channels, codebook_size=codebook_size,
                        **config)  # type: ignore[arg-type]
    mel = MelFrontend(cfg.sample_rate, cfg.hop_length, cfg.win_length, cfg.num_mels, cfg.floor_db)
    stacks = []
    for wav in wavs:
        mel_TM = mel.log_mel(torch.as_tensor(np.asarray(wav, dtype=np.float32)).flatten())
        if mel_TM.shape[0] >= cfg.mel_frames_per_code:
            # every window of mel_frames_per_code frames (stride 1), flattened frame-major like frame_vectors
            windows = mel_TM.unfold(0, cfg.mel_frames_per_code, 1).transpose(1, 2)
            stacks.append(windows.reshape(-1, cfg.frame_dim))
    if not stacks:
        raise ValueError(f"no waveform is longer than one codec frame ({cfg.samples_per_frame} samples)")
    vectors_ND = torch.cat(stacks)
    generator = torch.Generator().manual_seed(seed)
    if vectors_ND.shape[0] > max_vectors:
        vectors_ND = vectors_ND[torch.randperm(vectors_ND.shape[0], generator=generator)[:max_vectors]]
    with tqdm(total=num_channels * (kmeans_iters + 1), desc=f"fitting {num_channels}x{codebook_size} RVQ",
              disable=not progress) as bar:
        codebooks_KCD = fit_rvq(vectors_ND, num_channels, codebook_size, kmeans_iters, generator,
                                on_iter=lambda: bar.update(1))
    return BuiltinCodec(cfg, codebooks_KCD)
