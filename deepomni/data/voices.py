"""Speakers: Debian's three English synthesizers behind one call, text -> 16 kHz mono float32.

| engine    | voices                                              | speed                 | pitch                  |
|-----------|-----------------------------------------------------|-----------------------|------------------------|
| espeak-ng | formant; 8 English accents x ~100 variants (``+f2``) | ``-s`` words a minute | ``-p`` 0..99           |
| flite     | CMU diphone / clustergen: kal, kal16, awb, rms, slt | ``duration_stretch``  | tape shift (see below) |
| festival  | kal diphone, slt HTS (``festvox-*`` packages)       | ``Duration_Stretch``  | tape shift             |

``Voice.speed`` is words a minute for every engine (flite and festival stretch durations by 175 / speed,
175 being espeak's default); ``Voice.pitch`` is 0..99 with 50 the voice's own. espeak-ng takes the pitch
itself; flite and festival voices are shifted like tape, resampled by 2 ** ((pitch - 50) / 150) (pitch
30..70: x0.91..1.10 in pitch, the duration shortened by the same factor).

Every engine is deterministic: identical arguments give identical samples, so a corpus is reproducible
from a seed. Text goes in on stdin or a temporary file, never as a command-line argument.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000  # what the Whisper encoder reads
TRAILING_SILENCE_S = 0.15  # synthesizers pad ~0.3-0.5 s of zeros after each utterance; keep a short tail
ENGINES = ("espeak-ng", "flite", "festival")
_DEFAULT_WPM = 175  # espeak-ng's default speed: flite's and festival's natural rate is taken as this

# the espeak-ng accents of English; variants are listed by the installed espeak-ng itself
ESPEAK_ENGLISH = ("en-us", "en", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
                  "en-us-nyc")
# variants that do not speak in a voice (whispered): unusable for a speech encoder's training or test
_UNVOICED_VARIANTS = ("whisper", "female_whisper")
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")  # awb_time is a talking clock: it says only times
# festival voice -> its Scheme selector; present when the festvox package is installed
FESTIVAL_VOICES = {"kal_diphone": "english/kal_diphone", "cmu_us_slt_arctic_hts": "us/cmu_us_slt_arctic_hts"}
_FESTIVAL_ROOT = Path("/usr/share/festival/voices")


@dataclass(frozen=True)
class Voice:
    """One rendering setting: ``name`` is the engine's voice (espeak-ng: with an optional variant,
    ``en-us+f2``), ``speed`` in words per minute, ``pitch`` 0..99 (50 is the voice's own)."""

    name: str
    speed: int = 160
    pitch: int = 50
    engine: str = "espeak-ng"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown speech engine {self.engine!r}; expected one of {ENGINES}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> str:
        """``engine/name``: what held-out voice lists and per-voice figures are keyed by."""
        return f"{self.engine}/{self.name}"


def _binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found on PATH; install it (apt-get install {package}) to synthesize speech")
    return path


def espeak_binary() -> str:
    return _binary("espeak-ng", "espeak-ng")


def _run(cmd: list[str], stdin: bytes, what: str) -> None:
    res = subprocess.run(cmd, input=stdin, capture_output=True)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed: {res.stderr.decode(errors='replace').strip()[-400:]}")


def _espeak_wav(text: str, voice: Voice) -> bytes:
    cmd = [espeak_binary(), "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout"]
    res = subprocess.run(cmd, input=text.encode(), capture_output=True)
    if res.returncode != 0 or not res.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice.name!r}: {res.stderr.decode(errors='replace').strip()}")
    return res.stdout


def _flite_wav(text: str, voice: Voice, tmp: Path) -> bytes:
    txt, wav = tmp / "in.txt", tmp / "out.wav"
    txt.write_text(text)
    _run([_binary("flite", "flite"), "-voice", voice.name, "-f", str(txt), "-o", str(wav),
          "--setf", f"duration_stretch={_DEFAULT_WPM / voice.speed:.4f}"], b"", f"flite voice {voice.name!r}")
    return wav.read_bytes()


def _festival_wav(text: str, voice: Voice, tmp: Path) -> bytes:
    if voice.name not in FESTIVAL_VOICES:
        raise ValueError(f"unknown festival voice {voice.name!r}; expected one of {list(FESTIVAL_VOICES)}")
    txt, wav = tmp / "in.txt", tmp / "out.wav"
    txt.write_text(text)
    _run([_binary("text2wave", "festival"), "-eval", f"(voice_{voice.name})",
          "-eval", f"(Parameter.set 'Duration_Stretch {_DEFAULT_WPM / voice.speed:.4f})", str(txt), "-o", str(wav)],
         b"", f"festival voice {voice.name!r}")
    return wav.read_bytes()


def speak(text: str, voice: Voice) -> np.ndarray:
    """``text`` spoken by ``voice`` as float32 samples at 16 kHz, trailing silence trimmed."""
    if voice.engine == "espeak-ng":
        x_T, sr = sf.read(io.BytesIO(_espeak_wav(text, voice)), dtype="float32")
    else:
        with tempfile.TemporaryDirectory(prefix="deepomni-tts-") as tmp:
            render = _flite_wav if voice.engine == "flite" else _festival_wav
            x_T, sr = sf.read(io.BytesIO(render(text, voice, Path(tmp))), dtype="float32")
        sr = sr * 2 ** ((voice.pitch - 50) / 150)  # tape shift: read faster -> higher and shorter
    if x_T.ndim > 1:
        x_T = x_T.mean(axis=1)
    x_T = soxr.resample(x_T, sr, SAMPLE_RATE).astype(np.float32)
    voiced = np.flatnonzero(np.abs(x_T) > 1e-3)
    end = len(x_T) if voiced.size == 0 else min(len(x_T), voiced[-1] + 1 + int(TRAILING_SILENCE_S * SAMPLE_RATE))
    return x_T[:end]


def encode_flac(x_T: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Lossless 16-bit FLAC: about half the size of WAV, and decodable by soundfile everywhere."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(x_T, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
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


# ----------------------------------------------------------------------------------- the inventory

def espeak_variants() -> list[str]:
    """The variant files the installed espeak-ng lists (``m3``, ``f2``, ``klatt``, ...), unvoiced ones left out."""
    out = subprocess.run([espeak_binary(), "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = [m.group(1) for m in re.finditer(r"!v/(\S+)", out)]
    return sorted(n for n in set(names) if n not in _UNVOICED_VARIANTS)


@lru_cache(maxsize=None)
def english_voices() -> tuple[Voice, ...]:
    """Every usable English voice on this machine, at speed 175 and pitch 50: each espeak-ng accent alone and
    with each variant whose samples differ from the accent's own (espeak ignores some variants on some
    accents), then flite's and festival's voices when those are installed. Sorted, so the same machine
    always gives the same list."""
    voices: list[Voice] = []
    if shutil.which("espeak-ng"):
        probe = "one two three"
        variants = espeak_variants()
        for accent in ESPEAK_ENGLISH:
            base = _espeak_wav(probe, Voice(accent, 175))
            voices.append(Voice(accent, 175))
            seen = {base}
            for v in variants:
                wav = _espeak_wav(probe, Voice(f"{accent}+{v}", 175))
                if wav not in seen:
                    seen.add(wav)
                    voices.append(Voice(f"{accent}+{v}", 175))
    if shutil.which("flite"):
        listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout.split()
        voices += [Voice(v, 175, engine="flite") for v in FLITE_VOICES if v in listed]
    if shutil.which("text2wave"):
        voices += [Voice(v, 175, engine="festival") for v, d in FESTIVAL_VOICES.items() if (_FESTIVAL_ROOT / d).is_dir()]
    return tuple(voices)
