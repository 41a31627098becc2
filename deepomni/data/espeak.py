"""Real speech for the built-in corpus from the espeak-ng command line: text -> 16 kHz mono float32 ->
FLAC bytes.

espeak-ng is a formant synthesizer: robotic, but real speech with real words, many accents and voice
variants, no model weights to download, ~20 ms per sentence on one core, and *deterministic* (identical
arguments give identical samples), which makes the corpus reproducible from a seed. The text goes in on
stdin so no sentence can be mistaken for a command-line option.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import asdict, dataclass

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000  # what the Whisper encoder reads
TRAILING_SILENCE_S = 0.15  # espeak pads ~0.3-0.5 s of zeros after each utterance; keep a short tail


@dataclass(frozen=True)
class Voice:
    """One espeak-ng rendering setting: ``name`` is a voice with an optional variant (``en-us+f2``),
    ``speed`` in words per minute, ``pitch`` 0..99 (50 is the voice's default)."""

    name: str
    speed: int = 160
    pitch: int = 50

    def to_dict(self) -> dict:
        return asdict(self)


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("espeak-ng not found on PATH; install it (apt-get install espeak-ng) to synthesize speech")
    return path


def _espeak_wav(text: str, voice: Voice) -> bytes:
    cmd = [espeak_binary(), "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout"]
    res = subprocess.run(cmd, input=text.encode(), capture_output=True)
    if res.returncode != 0 or not res.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice.name!r}: {res.stderr.decode(errors='replace').strip()}")
    return res.stdout


def speak(text: str, voice: Voice) -> np.ndarray:
    """``text`` spoken by ``voice`` as float32 samples at 16 kHz, trailing silence trimmed."""
    x_T, sr = sf.read(io.BytesIO(_espeak_wav(text, voice)), dtype="float32")
    x_T = soxr.resample(x_T, sr, SAMPLE_RATE).astype(np.float32)
    voiced = np.flatnonzero(np.abs(x_T) > 1e-3)
    end = len(x_T) if voiced.size == 0 else min(len(x_T), voiced[-1] + 1 + int(TRAILING_SILENCE_S * SAMPLE_RATE))
    return x_T[:end]


def encode_flac(x_T: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Lossless 16-bit FLAC: about half the size of WAV, and decodable by soundfile everywhere."""
    buf = io.BytesIO()
    sf.write(buf, x_T, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def check_voices(names: list[str]) -> None:
    """Fail early, naming the voice, if espeak-ng does not know a voice or silently ignores its variant
    (it does for ``en-gb+f4``: same samples as ``en-gb``; ``en+f4`` works)."""
    probe = "one two three"
    for name in names:
        try:
            wav = _espeak_wav(probe, Voice(name))
        except RuntimeError as e:
            raise ValueError(f"unknown espeak-ng voice {name!r} (list them with: espeak-ng --voices=en)") from e
        if "+" in name and wav == _espeak_wav(probe, Voice(name.split("+")[0])):
            raise ValueError(f"espeak-ng ignores the variant in voice {name!r} (output equals "
                             f"{name.split('+')[0]!r}); try the language's base voice, e.g. 'en+{name.split('+')[1]}'")
