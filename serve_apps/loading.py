"""What the app serves: the model and the codec, from its settings (:class:`deepomni.serve.config.AppConfig`).

With a ``checkpoint`` (a directory written by :func:`deepomni.checkpoint.save_model`, e.g.
``runs/pipeline/runs/s3_joint/final``) every replica loads it. Without one, every replica builds the same
random ``preset`` model (seeded, including the Whisper encoder's random init), so the encoder and the
backbone replicas agree. Without a ``codec`` spec, the built-in codec is fitted on a few espeak-ng phrases
(seeded, deterministic) once and cached under ``$DEEPOMNI_CACHE`` (default ``~/.cache/deepomni``); with no
espeak-ng, seeded random codebooks stand in (valid codes, noise-like audio).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from deepomni.config import ModelConfig
from deepomni.serve.config import AppConfig

CODEC_PHRASES = (
    "What is the capital of France?",
    "The capital of France is Paris.",
    "Hello there, how are you today?",
    "Seven plus five makes twelve.",
    "The quick brown fox jumps over the lazy dog.",
    "Please tell me the weather for tomorrow morning.",
    "Rivers flow down from the mountains to the sea.",
    "My favourite colour is a deep shade of blue.",
)
CODEC_VOICES = ("en-us", "en+f3", "en-gb")


def load_serving_model(cfg: AppConfig):
    """The model in eval mode on the configured device (checkpoint, or the seeded random preset)."""
    from deepomni.model.model import DeepOmniModel

    device = cfg.torch_device()
    if cfg.checkpoint:
        from deepomni.checkpoint import load_model

        model, _ = load_model(cfg.checkpoint, device=device)
        return model
    torch.manual_seed(cfg.seed)  # the Whisper encoder's random init draws from the global generator
    return DeepOmniModel(cfg.model_config()).init_weights(seed=cfg.seed).to(device).eval()


# ------------------------------------------------------------------------------------------ codec
def cache_dir() -> Path:
    return Path(os.environ.get("DEEPOMNI_CACHE", Path.home() / ".cache" / "deepomni")).expanduser()


def default_codec_spec(model_cfg: ModelConfig) -> str:
    """``builtin:<cache>/serve/builtin-codec-...``, fitted on first use (atomic: the first writer wins)."""
    from deepomni.codec.builtin import BuiltinCodec

    K, C = model_cfg.num_codec_channels, model_cfg.codebook_size
    speech = shutil.which("espeak-ng") is not None
    target = cache_dir() / "serve" / f"builtin-codec-v2-k{K}-c{C}-{'espeak' if speech else 'random'}"
    if not (target / "codebooks.safetensors").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        _fit_default_codec(K, C, speech).save(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another replica got there first: theirs is identical (seeded)
            shutil.rmtree(tmp, ignore_errors=True)
    BuiltinCodec.load(target)  # fail here, with the path, if the cache is broken
    return f"builtin:{target}"


def _fit_default_codec(K: int, C: int, speech: bool):
    from deepomni.codec.builtin import BuiltinCodec, BuiltinConfig, fit_builtin_codec

    if speech:
        from deepomni.data.espeak import Voice, speak

        wavs = [speak(text, Voice(CODEC_VOICES[i % len(CODEC_VOICES)])) for i, text in enumerate(CODEC_PHRASES)]
        return fit_builtin_codec(wavs, num_channels=K, codebook_size=C, seed=0, kmeans_iters=8, progress=False)
    cfg = BuiltinConfig(num_channels=K, codebook_size=C)
    g = torch.Generator().manual_seed(0)
    # level 0 around a speech-like log-mel level (dB), finer levels small residuals
    scale = torch.tensor([20.0] + [4.0] * (K - 1)).view(K, 1, 1)
    books = torch.randn(K, C, cfg.frame_dim, generator=g) * scale
    books[0] += -50.0
    return BuiltinCodec(cfg, books)
