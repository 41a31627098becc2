"""What the app serves: its settings (:class:`AppConfig`, from the builder's ``args``), the model, the codec.

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
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from deepomni.config import ModelConfig, load_preset

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


@dataclass
class AppConfig:
    checkpoint: str | None = None  # deepomni.checkpoint directory; None: random weights of `preset`
    preset: str = "tiny"  # model preset when there is no checkpoint
    codec: str | None = None  # "builtin:<dir>" | "snac:<dir>"; None: the cached default built-in codec
    tokenizer: str = "bytes"  # "bytes" | "hf:<dir>" (the tokenizer the checkpoint was trained with)
    device: str = "auto"  # "cpu" | "cuda" | "auto" (cuda when available)
    torch_threads: int = 1  # intra-op threads per CPU replica (several replicas share few cores)
    encoder_threads: int = 2  # the SpeechEncoder's (bursty, on the way to the first audio: 25 -> 13 ms a turn)
    seed: int = 0  # random init when there is no checkpoint
    max_rows: int = 32  # BatchEngine rows per Backbone replica (a speech answer takes 2, then 1)
    # sessions that may wait for rows per Backbone replica; one more is refused at once (503 overloaded,
    # Retry-After). None: max_rows (with Backbone's max_ongoing_requests 64 in config.yaml: 32 rows' worth
    # of answers + 32 waiting); 0: refuse whatever cannot start at once
    max_queued: int | None = None
    max_steps: int = 256  # default decoding steps per answer
    max_steps_limit: int = 1024  # the most a request may ask for
    max_body_bytes: int = 8 * 1024 * 1024  # request body / one WebSocket turn's audio
    # conversation memory: prompt positions a conversation may fill (the oldest turns go first beyond it;
    # the answer's max_steps must fit too), and conversations whose context a Backbone replica keeps cached
    max_context: int = 2048
    kept_contexts: int = 64
    # faults (docs/serving.md "Faults"): the longest the ingress waits for the next piece of a Backbone stream
    # (which sends a keepalive every second while an answer waits): beyond it the answer ends with an
    # `unavailable` error instead of hanging (a Backbone that died fails its streams at once)
    stall_timeout_s: float = 10.0
    # the API key every endpoint but /healthz, / and /static/* asks for (docs/serving.md "Authentication");
    # None: the environment's DEEPOMNI_API_KEY, read by each Ingress replica; neither: no key. Several keys
    # (rotation): comma-separated. Kept out of repr(): a config that is printed does not show it.
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args: dict | None) -> AppConfig:
        """From the builder's ``args`` (YAML values, or strings from ``serve run ... key=value``)."""
        args = dict(args or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown app args {unknown}; expected some of {sorted(known)}")
        out = {}
        for k, v in args.items():
            if v is None or v == "":
                out[k] = None if k in ("checkpoint", "codec", "max_queued", "api_key") else known[k].default
            elif k in ("torch_threads", "encoder_threads", "seed", "max_rows", "max_steps", "max_steps_limit", "max_body_bytes",
                       "max_context", "kept_contexts", "max_queued"):
                out[k] = int(v)
            elif k == "stall_timeout_s":
                out[k] = float(v)
            else:
                out[k] = str(v)
        cfg = cls(**out)
        if cfg.checkpoint and not (Path(cfg.checkpoint) / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {cfg.checkpoint!r} is not a DeepOmni checkpoint directory "
                                    f"(no config.json)")
        if not 1 <= cfg.max_steps <= cfg.max_steps_limit:
            raise ValueError(f"max_steps must be in [1, max_steps_limit={cfg.max_steps_limit}], got {cfg.max_steps}")
        if not cfg.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {cfg.stall_timeout_s}")
        if cfg.max_queued is not None and cfg.max_queued < 0:
            raise ValueError(f"max_queued must be >= 0 (or null: max_rows), got {cfg.max_queued}")
        return cfg

    def queue_limit(self) -> int:
        """Sessions that may wait for rows in one Backbone replica (``max_queued``, default ``max_rows``)."""
        return self.max_rows if self.max_queued is None else self.max_queued

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def setup_torch(self, threads: int | None = None) -> None:
        if self.torch_device().type == "cpu":
            torch.set_num_threads(threads or self.torch_threads)

    def model_config(self) -> ModelConfig:
        if self.checkpoint:
            return ModelConfig.from_dict(json.loads((Path(self.checkpoint) / "config.json").read_text()))
        return load_preset(self.preset)


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
