"""Speech-output codecs: waveform <-> K channels of codes (see ``base.py`` for the interface).

``load_codec("builtin:<dir>")`` is the weight-free default (``builtin.py``); ``load_codec("snac:<dir>")``
wraps a local SNAC checkpoint, the paper's codec (``snac.py``).
"""

from .base import Codec, StreamDecoder, load_codec
from .builtin import BuiltinCodec, BuiltinConfig, fit_builtin_codec
from .metrics import log_spectral_distance

__all__ = ["BuiltinCodec", "BuiltinConfig", "Codec", "StreamDecoder", "fit_builtin_codec", "load_codec",
           "log_spectral_distance"]
