"""Weight files: safetensors in the transformers layout, written in shards and read a part at a time.

    <dir>/model.safetensors                                  every tensor, when they fit one shard
    <dir>/model-00001-of-0000N.safetensors ...               otherwise, at most ``max_shard_bytes`` each,
    <dir>/model.safetensors.index.json                       with the index: {"metadata": {"total_size"},
                                                             "weight_map": {tensor name: file}}

Reading is the other half of the convention (vLLM, transformers' ``from_pretrained``): a module is built
on the meta device (:func:`empty_modules`: no memory, no random init) in the dtype it will run in, then
each tensor it owns is read from its file (memory-mapped, :func:`read_tensors`), copied in its dtype, and
assigned in place of the empty parameter (:func:`assign`), one at a time. So a process holds its part's
weights once, in its own dtype, and never the tensors it does not own; :func:`materialize` then gives the
derived (non-persistent) buffers real storage and recomputes them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' save_pretrained default ("5GB")
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def is_weight_file(name: str) -> bool:
    """Whether a file name is one of the weight files this layout writes (the single file, a shard, the index)."""
    return name in (WEIGHTS_FILE, INDEX_FILE) or _SHARD.fullmatch(name) is not None


# ============================================================================================== write
def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, *,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: dict[str, str] | None = None
                      ) -> list[str]:
    """Write ``(name, tensor)`` pairs (taken in order, moved to the CPU one shard at a time) as the single
    file, or as shards of at most ``max_shard_bytes`` plus the index; returns the file names written.
    Weight files of an earlier write in ``out_dir`` are removed first (a stale shard would be read too)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if is_weight_file(old.name):
            old.unlink()
    keys: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            save_file(shard, str(out / f"shard-{len(keys):05d}.tmp.safetensors"), metadata=metadata)
            keys.append(list(shard))
            shard, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t.detach().contiguous().cpu()
        size += nbytes
        total += nbytes
    flush()
    n = len(keys)
    names = [WEIGHTS_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, name in enumerate(names):
        (out / f"shard-{i:05d}.tmp.safetensors").rename(out / name)
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: names[i] for i, ks in enumerate(keys) for k in ks}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    return names


# ============================================================================================== read
def has_weights(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / WEIGHTS_FILE).is_file() or (d / INDEX_FILE).is_file()


def weight_map(directory: str | Path) -> dict[str, Path]:
    """``{tensor name: file}`` of a directory's weights: from the index when there is one, else the single
    file's header. Clear errors for a directory without weights or an index naming missing shards."""
    from safetensors import safe_open

    d = Path(directory)
    if (d / INDEX_FILE).is_file():
        names = json.loads((d / INDEX_FILE).read_text())["weight_map"]
        missing = sorted({f for f in names.values() if not (d / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{d}: shards listed in {INDEX_FILE} are missing: {missing}")
        return {k: d / f for k, f in names.items()}
    if not (d / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{d} has no weights ({WEIGHTS_FILE}, or shards with {INDEX_FILE})")
    with safe_open(str(d / WEIGHTS_FILE), framework="pt") as f:
        return dict.fromkeys(f.keys(), d / WEIGHTS_FILE)


def read_tensors(files: dict[str, Path], names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors ``names`` (keys of ``files``, a :func:`weight_map`), in file order. Each is a view of its
    file, memory-mapped (read-only, copy-on-write) only while the caller holds it: the file is opened per
    tensor, so the pages read stay resident for one tensor at a time, not for a whole 5 GiB shard. The caller
    copies what it keeps (:func:`assign` does, into aligned storage in its own dtype)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path, keys in by_file.items():
        for k in keys:
            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(k)
            yield k, t


# ============================================================================================== assign
@contextmanager
def empty_modules(dtype: torch.dtype):
    """Build modules on the meta device with ``dtype`` as the default dtype: parameters that are not typed
    explicitly (the router's fp32 weight is) take ``dtype``, nothing is allocated or initialised."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(previous)


def assign(module: nn.Module, name: str, tensor: torch.Tensor, device: torch.device | str) -> None:
    """Put ``tensor`` (cast to the dtype the module built the slot with, on ``device``) in the place of the
    parameter or persistent buffer ``name``; its shape must match."""
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path)
    old = getattr(owner, leaf)
    if old is None or tuple(old.shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: the checkpoint's tensor has shape {tuple(tensor.shape)}, the model's "
                         f"{None if old is None else tuple(old.shape)}")
    # always a copy: a view of the file's memory map would keep its pages mapped and sit at the file's (8-byte)
    # alignment, where CPU kernels take other paths than on torch's own (64-byte aligned) storage, so results
    # (a resumed training run's, bit for bit) would depend on how the weights were loaded
    new = tensor.to(device=device, dtype=old.dtype, copy=True)
    if isinstance(old, nn.Parameter):
        owner._parameters[leaf] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = new


def materialize(module: nn.Module, device: torch.device | str) -> None:
    """After :func:`assign`: the derived (non-persistent) buffers still on the meta device get storage on
    ``device`` and are recomputed by their module's ``reset_buffers``; a parameter still empty is an error."""
    empty = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if empty:
        raise ValueError(f"no weights for {len(empty)} parameters: {empty[:5]}")
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None and b.device.type == "meta":
                m._buffers[name] = torch.zeros_like(b, device=device)
    for m in module.modules():
        reset = getattr(m, "reset_buffers", None)
        if callable(reset):
            reset()
