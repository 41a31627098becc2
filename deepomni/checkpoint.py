"""Model checkpoints: a directory any stage, evaluation or server can load.

    <dir>/config.json         ModelConfig (deepomni.config)
    <dir>/model.safetensors   the model's state dict (the frozen speech encoder included)
    <dir>/experts.json        the modality expert assignment, when one has been made (deepomni.model.modality)

Optimizer state and training progress are the trainer's business and live beside it (``deepomni.train``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model.modality import ExpertAssignment
from .model.model import DeepOmniModel

CONFIG, WEIGHTS, EXPERTS = "config.json", "model.safetensors", "experts.json"


def save_model(model: DeepOmniModel, directory: str | Path, assignment: ExpertAssignment | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=1))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(d / WEIGHTS), metadata={"format": "deepomni"})
    if assignment is not None:
        assignment.save(d / EXPERTS)
    return d


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[DeepOmniModel, ExpertAssignment | None]:
    """The model (eval mode) and its expert assignment (None if the checkpoint has none)."""
    d = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d} is not a DeepOmni checkpoint: {name} is missing")
    cfg = ModelConfig.from_dict(json.loads((d / CONFIG).read_text()))
    enc = cfg.speech_encoder
    if enc.path and not Path(enc.path).is_dir():
        # the frozen encoder's weights are in model.safetensors: build it from the recorded architecture
        cfg = cfg.replace(speech_encoder=dataclasses.replace(enc, path=None))
    model = DeepOmniModel(cfg)
    state = load_file(str(d / WEIGHTS), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{d}: checkpoint does not match its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.embed.reset_buffers()
    model.rotary.reset_buffers()
    assignment = ExpertAssignment.load(d / EXPERTS) if (d / EXPERTS).is_file() else None
    return model.to(device).eval(), assignment
