"""What the app serves: the model and the codec, from its settings (:class:`deepomni.serve.config.AppConfig`).

Every replica loads only its part of a checkpoint (:func:`deepomni.checkpoint.load_part`): the SpeechEncoder
the speech input (frozen encoder + projector), the Backbone the LLM without it, in the app's ``dtype``
(bf16 on a GPU), read tensor by tensor onto meta-built modules. The checkpoint is ``checkpoint`` (a
directory written by :func:`deepomni.checkpoint.save_model`, e.g. ``runs/pipeline/runs/s3_joint/final``)
or, without one, the random ``preset`` model (seeded, including the Whisper encoder's random init) written
once to a checkpoint in the cache (:func:`random_checkpoint`), so the encoder and the backbone replicas
agree. Without a ``codec`` spec, the built-in codec is fitted on a few espeak-ng phrases
(seeded, deterministic) once and cached under ``$DEEPOMNI_CACHE`` (default ``~/.cache/deepomni``); with no
espeak-ng, seeded random codebooks stand in (valid codes, noise-like audio).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from typing import TYPE_CHECKING

from deepomni.config import ModelConfig
from deepomni.serve.config import AppConfig

if TYPE_CHECKING:
    from deepomni.checkpoint import Part

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


def load_serving_model(cfg: AppConfig, part: Part = "model"):
    """One part of the served model (:data:`deepomni.checkpoint.PARTS`) in eval mode on the configured device
    and dtype: from the checkpoint, or from the seeded random preset's (:func:`random_checkpoint`)."""
    from deepomni.checkpoint import load_part

    return load_part(cfg.checkpoint or random_checkpoint(cfg), part, cfg.torch_device(), cfg.torch_dtype())


def random_checkpoint(cfg: AppConfig) -> Path:
    """``<cache>/serve/random-<preset>-<config hash>-seed<seed>``: the random ``preset`` model as every replica
    built it before loading became per part (``torch.manual_seed(seed)``, then ``init_weights(seed)``: the
    same weights), written once (atomic: the first writer wins; the others' identical copy is dropped). A
    random model at DeepSeek-V2-Lite size takes its fp32 size on disk (63 GB): serve a checkpoint there."""
    from deepomni.checkpoint import save_model
    from deepomni.model.model import DeepOmniModel

    model_cfg = cfg.model_config()
    key = hashlib.sha256(json.dumps(model_cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "serve" / f"random-{cfg.preset}-{key}-seed{cfg.seed}"
    if not (target / "config.json").is_file():
        torch.manual_seed(cfg.seed)  # the Whisper encoder's random init draws from the global generator
        model = DeepOmniModel(model_cfg).init_weights(seed=cfg.seed)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent)) / "ckpt"
        save_model(model, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another replica got there first: theirs is identical (seeded)
            pass
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return target


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
