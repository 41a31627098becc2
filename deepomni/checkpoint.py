"""Model checkpoints: a directory any stage, evaluation or server can load.

    <dir>/config.json         ModelConfig (deepomni.config)
    <dir>/model.safetensors   the model's state dict (the frozen speech encoder included, unless config.json's
                              speech_encoder.path names its directory, relative to <dir> or absolute: a
                              foundation set's base/, deepomni/foundations/; such a base may also leave
                              out the projector, which then starts from a seeded init)
    <dir>/experts.json        the modality expert assignment, when one has been made (deepomni.model.modality)

Optimizer state and training progress are the trainer's business and live beside it (``deepomni.train``).

Writes are atomic (:func:`deepomni.atomic.atomic_directory`): the files go to a hidden temporary
sibling, are fsynced, then renamed into place, so a process killed mid-write leaves the previous checkpoint
(or none), never a half-written one, where a loader looks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_directory
from .config import ModelConfig, with_encoder_path_from
from .model.modality import ExpertAssignment
from .model.model import DeepOmniModel

CONFIG, WEIGHTS, EXPERTS = "config.json", "model.safetensors", "experts.json"
PROJECTOR = "speech.projector."


def save_model(model: DeepOmniModel, directory: str | Path, assignment: ExpertAssignment | None = None) -> Path:
    """Write the checkpoint directory atomically: an existing one at ``directory`` is replaced as a whole
    (a stale experts.json does not survive a save without assignment; files other than the checkpoint's
    own are kept)."""
    d = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_directory(d, keep_others=(CONFIG, WEIGHTS, EXPERTS)) as tmp:
        (tmp / CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=1))
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "deepomni"})
        if assignment is not None:
            assignment.save(tmp / EXPERTS)
    return d


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[DeepOmniModel, ExpertAssignment | None]:
    """The model (eval mode) and its expert assignment (None if the checkpoint has none)."""
    d = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d} is not a DeepOmni checkpoint: {name} is missing")
    cfg = with_encoder_path_from(ModelConfig.from_dict(json.loads((d / CONFIG).read_text())), d)
    enc = cfg.speech_encoder
    if enc.path and not Path(enc.path).is_dir():
        # the frozen encoder's weights are in model.safetensors: build it from the recorded architecture
        cfg = cfg.replace(speech_encoder=dataclasses.replace(enc, path=None))
    model = DeepOmniModel(cfg)
    state = load_file(str(d / WEIGHTS), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if cfg.speech_encoder.path:  # the encoder was read from its directory; the file may leave it out
        missing = [k for k in missing if not k.startswith("speech.encoder.")]
        if missing and all(k.startswith(PROJECTOR) for k in missing) and not any(k.startswith(PROJECTOR) for k in state):
            # a base LLM with the encoder it will hear through, but no projector yet (a foundation set's
            # base/): the first stage that trains one starts it (Stage.projector_from_text); seeded, so
            # every run from this base starts from the same weights
            model.init_weights(seed=0, prefix=PROJECTOR)
            missing = []
    if missing or unexpected:
        raise ValueError(f"{d}: checkpoint does not match its config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.embed.reset_buffers()
    model.rotary.reset_buffers()
    assignment = ExpertAssignment.load(d / EXPERTS) if (d / EXPERTS).is_file() else None
    return model.to(device).eval(), assignment
