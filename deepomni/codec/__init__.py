"""Speech-output codecs: waveform <-> K channels of codes (see ``base.py`` for the interface).

:func:`load_codec`, here as the one place that knows every codec: ``load_codec("builtin:<dir>")`` is the
weight-free default (``builtin.py``); ``load_codec("snac:<dir>")`` wraps a local SNAC checkpoint, the
paper's codec (``snac.py``). ``quality.py``: audio quality measures (log-spectral distance).
"""

from __future__ import annotations


from pathlib import Path

import torch

from .base import Codec, StreamDecoder
from .builtin import BuiltinCodec, BuiltinConfig, fit_builtin_codec
from .quality import log_spectral_distance

__all__ = ["BuiltinCodec", "BuiltinConfig", "Codec", "StreamDecoder", "fit_builtin_codec", "load_codec",
           "log_spectral_distance"]


def load_codec(spec: str, device: str | torch.device = "cpu") -> Codec:
    """``builtin:<dir>`` -> :class:`~deepomni.codec.builtin.BuiltinCodec`; ``snac:<dir>`` ->
    :class:`~deepomni.codec.snac.SnacCodec` (``config.json`` + ``pytorch_model.bin``, never downloaded).
    ``device`` is where SNAC's networks run; the built-in codec always runs on CPU."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise ValueError(f"codec spec must be 'builtin:<dir>' or 'snac:<dir>', got {spec!r}")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"codec directory not found: {directory} (from spec {spec!r})")
    if kind == "builtin":
        return BuiltinCodec.load(directory)
    if kind == "snac":
        from .snac import SnacCodec  # imports SNAC's own modules: on first use

        return SnacCodec.load(directory, device=device)
    raise ValueError(f"unknown codec kind {kind!r} in {spec!r}; expected 'builtin' or 'snac'")
