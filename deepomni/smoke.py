"""``deepomni smoke``: build a preset, answer one spoken turn on random weights, say what happened.

    deepomni smoke [--preset tiny] [--steps 48] [--seconds 2.0] [--seed 0]

Speech in: a synthetic 2 s utterance (a gliding tone with noise) through transformers'
WhisperFeatureExtractor (deepomni.audio.LogMel) -> the frozen Whisper encoder -> projector. Then one full forward of the spoken
turn and a batch-parallel generation (text item + speech item, KV cache, delay pattern). The weights are
random, so the tokens mean nothing yet; later stages train them.
"""

from __future__ import annotations

import argparse
import time


def synthetic_utterance(seconds: float, sr: int = 16000, seed: int = 0):
    """A voice-like float32 waveform (numpy) of ``seconds``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f = 180 + 60 * np.sin(2 * np.pi * 0.7 * t)  # a voice-like gliding pitch
    wav = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / sr) + 0.01 * rng.standard_normal(t.size)
    return wav.astype(np.float32)


def add_smoke_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="tiny", help="model preset or ModelConfig JSON file")
    ap.add_argument("--steps", type=int, default=48, help="decoding steps")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of the synthetic spoken question")
    ap.add_argument("--seed", type=int, default=0)


def cmd_smoke(args: argparse.Namespace) -> int:
    import torch

    from .audio import LogMel
    from .config import load_preset
    from .model.generate import GenerationConfig, stream
    from .model.model import DeepOmniModel, count_parameters
    from .model.prompt import user_turn

    torch.manual_seed(args.seed)
    cfg = load_preset(args.preset)
    t0 = time.perf_counter()
    model = DeepOmniModel(cfg).init_weights(seed=args.seed).eval()
    n = count_parameters(cfg)
    print(f"[build] preset={args.preset} total={n['total'] / 1e6:.2f}M active={n['active'] / 1e6:.2f}M "
          f"layers={cfg.num_hidden_layers} experts={cfg.n_routed_experts}(top-{cfg.num_experts_per_tok})"
          f"+{cfg.n_shared_experts} shared channels=1+{cfg.num_codec_channels} "
          f"({time.perf_counter() - t0:.2f}s)")

    wav = synthetic_utterance(args.seconds, seed=args.seed)
    logmel = LogMel.from_config(cfg.speech_encoder)
    t0 = time.perf_counter()
    mel, (n_mel,) = logmel([wav])
    with torch.no_grad():
        audio = model.encode_speech(mel, [n_mel])[0]
    print(f"[speech in] {args.seconds:.1f}s audio -> log-mel {tuple(mel.shape)} ({n_mel} frames) -> "
          f"{audio.shape[0]} positions x {audio.shape[1]} ({time.perf_counter() - t0:.2f}s)")

    prompt = user_turn(model.layout, audio_positions=audio.shape[0])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(prompt.unsqueeze(0), audio=[audio])
    shapes = ", ".join(str(tuple(l.shape)) for l in out.logits)
    print(f"[forward] spoken turn tokens {tuple(prompt.shape)} -> logits per channel [{shapes}] "
          f"({(time.perf_counter() - t0) * 1e3:.0f} ms)")

    gcfg = GenerationConfig(max_steps=args.steps, seed=args.seed)
    t0 = time.perf_counter()
    first_audio = None
    text, frames, steps = [], [], 0
    for ev in stream(model, prompt, audio, gcfg):
        if ev.kind == "text":
            text.append(ev.text_id)
        elif ev.kind == "frame":
            frames.append(ev.frame_K)
            first_audio = first_audio or time.perf_counter() - t0
        else:
            steps = ev.step
    dt = time.perf_counter() - t0
    codes = torch.stack(frames, 1) if frames else torch.zeros(cfg.num_codec_channels, 0)
    print(f"[generate] batch-parallel decoding: {steps} steps in {dt:.2f}s ({steps / dt:.1f} steps/s), "
          f"{len(text)} text tokens, codec frames {tuple(codes.shape)}, first frame after "
          f"{(first_audio or float('nan')) * 1e3:.0f} ms")
    print(f"[generate] text ids: {text[:12]}{' ...' if len(text) > 12 else ''}")
    print("smoke run done (random weights: `make demo` trains a model whose answers mean something)")
    return 0
