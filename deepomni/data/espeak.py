"""espeak-ng, the built-in corpus's default speaker: kept as a name for :mod:`deepomni.data.voices`, which
holds every engine (espeak-ng, flite, festival) behind one ``speak(text, Voice)``."""

from .voices import SAMPLE_RATE, Voice, check_voices, encode_flac, espeak_binary, speak

__all__ = ["SAMPLE_RATE", "Voice", "check_voices", "encode_flac", "espeak_binary", "speak"]
