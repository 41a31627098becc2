"""Model checkpoints: a directory any stage, evaluation or server can load, whole or a part at a time.

    <dir>/config.json         ModelConfig (deepomni.config)
    <dir>/model.safetensors   the model's state dict (the frozen speech encoder included, unless config.json's
                              speech_encoder.path names its directory, relative to <dir> or absolute: a
                              foundation set's base/, deepomni/foundations/; such a base may also leave
                              out the projector, which then starts from a seeded init); above
                              ``max_shard_bytes`` (5 GiB) shards + ``model.safetensors.index.json`` instead,
                              the transformers layout (deepomni.weights)
    <dir>/experts.json        the modality expert assignment, when one has been made (deepomni.model.modality)

Loading builds the module on the meta device in the dtype asked for and assigns the checkpoint's tensors
one at a time (:mod:`deepomni.weights`): no random init, no second copy, no fp32 copy of a bf16 model. A
part reads only its own tensors (:data:`PARTS`), so the serving app's SpeechEncoder replicas hold the
encoder and projector, its Backbone replicas the LLM without the encoder.

Optimizer state and training progress are the trainer's business and live beside it (``deepomni.train``).

Writes are atomic (:func:`deepomni.atomic.atomic_directory`): the files go to a hidden temporary
sibling, are fsynced, then renamed into place, so a process killed mid-write leaves the previous checkpoint
(or none), never a half-written one, where a loader looks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .atomic import atomic_directory
from .config import ModelConfig, with_encoder_path_from
from .model.modality import ExpertAssignment
from .model.model import DeepOmniModel, init_parameters
from .model.speech import SpeechInput, encoder_weights
from .weights import (DEFAULT_MAX_SHARD_BYTES, assign, empty_modules, has_weights, is_weight_file, materialize,
                      read_tensors, weight_map, write_safetensors)

CONFIG, EXPERTS = "config.json", "experts.json"
SPEECH, PROJECTOR = "speech.", "speech.projector."

# what a process may load: the whole model (training, evaluation, export), the LLM without the speech input
# (``DeepOmniModel(with_speech_input=False)``: the serving Backbone), or the speech input alone (a
# ``SpeechInput``, frozen encoder + projector: the serving SpeechEncoder)
Part = Literal["model", "backbone", "speech"]
PARTS: tuple[Part, ...] = ("model", "backbone", "speech")


def save_model(model: DeepOmniModel, directory: str | Path, assignment: ExpertAssignment | None = None, *,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the checkpoint directory atomically: an existing one at ``directory`` is replaced as a whole
    (a stale experts.json or shard does not survive; files other than the checkpoint's own are kept).
    Tensors are written as they are (a bf16 model as bf16), in shards above ``max_shard_bytes``."""
    d = Path(directory)
    stale = [p.name for p in d.iterdir() if is_weight_file(p.name)] if d.is_dir() else []
    own = (CONFIG, EXPERTS, *stale)  # the new checkpoint's files replace these; other files are kept
    with atomic_directory(d, keep_others=own) as tmp:
        (tmp / CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=1))
        write_safetensors(model.state_dict().items(), tmp, max_shard_bytes=max_shard_bytes,
                          metadata={"format": "deepomni"})
        if assignment is not None:
            assignment.save(tmp / EXPERTS)
    return d


def read_config(directory: str | Path) -> ModelConfig:
    """A checkpoint's ModelConfig, its encoder path resolved against the directory (and dropped when that
    directory is gone: the encoder's weights are then in the checkpoint, built from the recorded architecture)."""
    d = Path(directory)
    if not (d / CONFIG).is_file() or not has_weights(d):
        missing = CONFIG if not (d / CONFIG).is_file() else "model.safetensors"
        raise FileNotFoundError(f"{d} is not a DeepOmni checkpoint: {missing} is missing")
    cfg = with_encoder_path_from(ModelConfig.from_dict(json.loads((d / CONFIG).read_text())), d)
    enc = cfg.speech_encoder
    if enc.path and not Path(enc.path).is_dir():
        cfg = cfg.replace(speech_encoder=dataclasses.replace(enc, path=None))
    return cfg


@torch.no_grad()
def load_part(directory: str | Path, part: Part = "model", device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> nn.Module:
    """One part of a checkpoint (:data:`PARTS`) in eval mode on ``device``, its floating-point weights in
    ``dtype`` (the router's stay fp32, as built), read tensor by tensor onto the meta-built module: peak
    memory is the part's weights in ``dtype`` plus one tensor. ``"model"`` and ``"backbone"`` give a
    :class:`~deepomni.model.model.DeepOmniModel`, ``"speech"`` a :class:`~deepomni.model.speech.SpeechInput`.
    Tensors of the part that the checkpoint lacks, or that it has and the part does not, are a ValueError."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    d = Path(directory)
    cfg = read_config(d)
    with empty_modules(dtype):
        module = (SpeechInput(cfg.speech_encoder, cfg.hidden_size) if part == "speech"
                  else DeepOmniModel(cfg, with_speech_input=part == "model"))
    prefix = SPEECH if part == "speech" else ""  # checkpoint name = prefix + the part's own name
    own = set(module.state_dict())
    files = weight_map(d)
    ours = {n for n in files  # the checkpoint's tensors of this part
            if (n.startswith(SPEECH) if part == "speech" else part == "model" or not n.startswith(SPEECH))}
    unexpected = sorted(n for n in ours if n.removeprefix(prefix) not in own)
    for name, t in read_tensors(files, sorted(ours - set(unexpected))):
        assign(module, name.removeprefix(prefix), t, device)
    missing = {n for n in own if prefix + n not in files}
    if cfg.speech_encoder.path and part != "backbone":  # the frozen encoder from its directory, where the file lacks it
        enc = "encoder." if part == "speech" else SPEECH + "encoder."
        if any(n.startswith(enc) for n in missing):
            for name, t in encoder_weights(cfg.speech_encoder).items():
                if enc + name in missing:
                    assign(module, enc + name, t, device)
                    missing.discard(enc + name)
        projector = PROJECTOR.removeprefix(prefix)
        no_projector = not any(n.startswith(PROJECTOR) for n in files)
        if missing and no_projector and all(n.startswith(projector) for n in missing):
            # a base LLM with the encoder it will hear through, but no projector yet (a foundation set's base/):
            # the first stage that trains one starts it (Stage.projector_from_text); seeded, so every run (and
            # every part) from this base starts from the same weights, those init_weights(seed=0) would draw
            proj = module.get_submodule(projector.rstrip("."))
            proj.to_empty(device=device)
            init_parameters([(n, p) for n, p in module.named_parameters() if n.startswith(projector)], 0,
                            cfg.initializer_range)
            missing = set()
    if missing or unexpected:
        raise ValueError(f"{d}: checkpoint does not match its config for part {part!r} (missing "
                         f"{sorted(missing)[:5]}, unexpected {unexpected[:5]})")
    materialize(module, device)
    return module.eval()


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
               ) -> tuple[DeepOmniModel, ExpertAssignment | None]:
    """The whole model (eval mode, :func:`load_part` ``"model"``) and its expert assignment (None if the
    checkpoint has none)."""
    d = Path(directory)
    model = load_part(d, "model", device, dtype)
    assignment = ExpertAssignment.load(d / EXPERTS) if (d / EXPERTS).is_file() else None
    return model, assignment
