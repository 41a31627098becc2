"""Speech input I/O: encoded audio or arrays -> checked mono float32 at 16 kHz -> Whisper log-mel.

The first hop of the data flow (audio -> features -> tokens -> model). Training data (audio bytes stored
in Parquet) and serving requests (uploaded files) both go through :func:`load_audio` and :class:`LogMel`,
so a bad input fails the same way in both places: an :class:`AudioError` whose message says what is
wrong, never a crash deep inside a decoder or the encoder.

:func:`load_audio` normalises exactly this much (no peak normalisation, no silence trimming):

* several channels -> their mean (downmix); a 2-D array may be ``(frames, channels)`` (soundfile's
  layout) or ``(channels, frames)`` (torchaudio's): the axis of at most ``MAX_CHANNELS`` is the channels;
* integer PCM -> float in [-1, 1): divided by ``2**(bits-1)``; unsigned ones are offset binary (8-bit WAV);
* any sample rate from ``MIN_SAMPLE_RATE`` to ``MAX_SAMPLE_RATE`` -> ``target_sr`` with soxr (HQ);
* float samples are kept as they are, even past [-1, 1]: loudness is information, and Whisper's log-mel
  clamps its dynamic range per utterance anyway.

Decoding is libsndfile's (through soundfile): WAV, FLAC, OGG/Vorbis, MP3 and the rest of
``soundfile.available_formats()``. libsndfile reads a cut WAV or MP3 silently as a shorter file; we refuse
it (WAV: libsndfile's own log says the data chunk is shorter than its header declares; others: fewer
frames decode than the header declares). Known gap: an OGG file cut exactly at a page boundary reads as
a valid, shorter file.

A missing file raises ``FileNotFoundError``, not ``AudioError``: it is a problem of the environment, not
of the audio, and callers already handle ``OSError`` that way.
"""

from __future__ import annotations

import errno
import io
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple, Union

import numpy as np
import soundfile as sf
import soxr

if TYPE_CHECKING:
    import torch

    from .config import SpeechEncoderConfig

AudioSource = Union[bytes, bytearray, memoryview, str, PathLike, IO[bytes], np.ndarray]

MIN_SAMPLE_RATE = 1_000  # lower is a mistake (a rate given in kHz, a corrupt header), not speech
MAX_SAMPLE_RATE = 768_000  # the highest rate recorders use
MAX_CHANNELS = 32  # more "channels" than this means a 2-D array is not (frames, channels) audio
WHISPER_SAMPLE_RATE = 16_000
WHISPER_HOP = 160  # samples per log-mel frame: 100 frames per second
N_FFT = 400  # Whisper's STFT window (25 ms)
MEL_HOPS_PER_FRAME = 2  # log-mel frames per encoder frame (deepomni.model.speech.MEL_FRAMES_PER_ENCODER_FRAME)
_DEFAULT_SUBTYPE = {"FLAC": "PCM_16", "WAV": "PCM_16"}  # others: soundfile.default_subtype (OGG: VORBIS)
# WAV written to a pipe cannot seek back to fill in its sizes: the writer declares "unknown" instead
# (0xFFFFFFFF, 0x7FFFF000 as espeak-ng --stdout writes, or INT32_MAX); such a file is not cut
_UNKNOWN_SIZE = 0xFFFF_0000  # this and above
_UNKNOWN_SIZES = frozenset({0x7FFF_F000, 0x7FFF_FFFF})
_WAV_DATA_LOG = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_READ_BLOCK_SAMPLES = 1 << 22  # decode in blocks of this many samples (16 MB of float32), see _read_frames


class AudioError(ValueError):
    """Input that is not usable speech audio; the message is meant for the person who sent it."""


class AudioInfo(NamedTuple):
    sample_rate: int
    frames: int
    channels: int
    duration_s: float
    format: str  # soundfile's container name ("WAV", "FLAC", "OGG", "MP3", ...) or "array"


# ---------------------------------------------------------------------------------------------- checks


def _check_rate(sr: object, what: str) -> int:
    if isinstance(sr, bool) or not isinstance(sr, (int, float, np.integer, np.floating)):
        raise AudioError(f"{what} must be a number of Hz, got {sr!r}")
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE or not float(sr).is_integer():
        raise AudioError(f"{what} of {sr} Hz is not a usable sample rate: expected a whole number "
                         f"from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz")
    return int(sr)


def _check_samples(wav: np.ndarray, name: str) -> None:
    """Refuse empty audio and NaN/Inf, which would turn every log-mel frame and the encoder output to NaN."""
    if wav.size == 0:
        raise AudioError(f"{name} holds no audio (0 samples)")
    bad = ~np.isfinite(wav)
    if bad.any():
        first = int(np.argmax(bad.reshape(len(wav), -1).any(axis=1)))
        raise AudioError(f"{name} has {int(bad.sum())} non-finite samples (NaN or Inf), the first at "
                         f"frame {first}: the audio is corrupt")


def _limit_frames(frames: int, sr: int, max_seconds: float | None, truncate: bool, name: str) -> int:
    """How many frames to keep under ``max_seconds`` (checked before decoding, so a long file is not read)."""
    if max_seconds is None or frames <= max_seconds * sr:
        return frames
    if truncate:
        return math.floor(max_seconds * sr)
    raise AudioError(f"{name} is {frames / sr:.2f} s long, over the limit of {max_seconds:g} s "
                     f"(pass truncate=True to keep only the first {max_seconds:g} s)")


# --------------------------------------------------------------------------------------- numpy arrays


def _frames_channels(arr: np.ndarray, name: str = "audio array") -> np.ndarray:
    """Any 1-D / 2-D float or integer-PCM array -> float32 ``[frames, channels]``."""
    a = np.asarray(arr)
    if a.size == 0:
        raise AudioError(f"{name} holds no audio (0 samples)")
    if a.dtype.kind not in "fiu":
        raise AudioError(f"{name} has dtype {a.dtype}, which is not audio: expected float or integer "
                         f"PCM samples")
    if a.ndim == 1:
        a = a[:, None]
    elif a.ndim == 2:
        if a.shape[1] > MAX_CHANNELS:
            if a.shape[0] > MAX_CHANNELS:
                raise AudioError(f"{name} of shape {a.shape} is not audio: expected (frames,), (frames, "
                                 f"channels) or (channels, frames) with at most {MAX_CHANNELS} channels")
            a = a.T  # (channels, frames)
    else:
        raise AudioError(f"{name} is {a.ndim}-D with shape {a.shape}: expected 1-D (frames,) or 2-D "
                         f"(frames, channels) audio")
    if a.dtype.kind == "f":
        return a.astype(np.float32, copy=False)
    full_scale = 2.0 ** (8 * a.dtype.itemsize - 1)
    offset = full_scale if a.dtype.kind == "u" else 0.0  # unsigned PCM is offset binary (8-bit WAV)
    return ((a.astype(np.float64) - offset) / full_scale).astype(np.float32)


# --------------------------------------------------------------------------------------- encoded audio


def _soundfile_input(src: AudioSource) -> tuple[str | IO[bytes], str]:
    """What soundfile opens (a path, or a seekable binary file) and a name for messages."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise AudioError("no audio: got 0 bytes")
        return io.BytesIO(data), f"audio ({len(data)} bytes)"
    if isinstance(src, (str, PathLike)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, "audio file not found", str(path))
        if path.stat().st_size == 0:
            raise AudioError(f"{path} holds no audio (empty file)")
        return str(path), str(path)
    if isinstance(src, io.TextIOBase):
        raise TypeError("audio file objects must be opened in binary mode ('rb')")
    if hasattr(src, "read"):
        name = str(getattr(src, "name", "audio stream"))
        if not (hasattr(src, "seekable") and src.seekable()):
            src = io.BytesIO(src.read())  # libsndfile seeks (headers, MP3/OGG lengths)
        return src, name
    raise TypeError(f"audio must be bytes, a path, a binary file object or a numpy array, "
                    f"got {type(src).__name__}")


@contextmanager
def _open(src: AudioSource) -> Iterator[tuple[sf.SoundFile, str]]:
    """Open with soundfile; any libsndfile error, opening or reading, becomes an AudioError."""
    obj, name = _soundfile_input(src)
    try:
        with sf.SoundFile(obj) as f:
            yield f, name
    except sf.LibsndfileError as e:
        reason = e.error_string
        if "not recognised" in reason:
            raise AudioError(f"{name} is not a recognised audio file (libsndfile: {reason}); supported "
                             f"formats are WAV, FLAC, OGG/Vorbis, MP3 and the rest of "
                             f"soundfile.available_formats()") from e
        raise AudioError(f"{name} could not be decoded: the file is truncated or corrupt "
                         f"(libsndfile: {reason})") from e


def _declared_wav_bytes(f: sf.SoundFile) -> tuple[int, int] | None:
    """(declared, present) bytes of a WAV data chunk that is shorter than its header says, else None.

    A size that means "unknown" (:data:`_UNKNOWN_SIZES`) is not a cut: libsndfile then reads the whole
    sample frames that are present and drops a trailing partial one."""
    m = _WAV_DATA_LOG.search(f.extra_info)
    if m and int(m[2]) < int(m[1]) < _UNKNOWN_SIZE and int(m[1]) not in _UNKNOWN_SIZES:
        return int(m[1]), int(m[2])
    return None


def _read_frames(f: sf.SoundFile, frames: int) -> np.ndarray:
    """Up to ``frames`` float32 ``[frames, channels]``, read block by block: soundfile allocates what it is
    asked for up front, and a header may declare far more than the file holds (a few hundred bytes of FLAC
    can claim 2**36 frames), so memory follows what really decodes, not what the header says."""
    block = max(1, _READ_BLOCK_SAMPLES // f.channels)
    parts, left = [], frames
    while left > 0:
        want = min(left, block)
        part = f.read(want, dtype="float32", always_2d=True)
        parts.append(part)
        left -= len(part)
        if len(part) < want:  # the end of what decodes
            break
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros((0, f.channels), dtype=np.float32)


def _decode(src: AudioSource, max_seconds: float | None, truncate: bool) -> tuple[np.ndarray, int, str]:
    """Decode -> (float32 ``[frames, channels]``, sample rate, name), refusing cut or empty files."""
    with _open(src) as (f, name):
        sr = _check_rate(f.samplerate, f"the sample rate of {name}")
        cut = _declared_wav_bytes(f)
        if f.frames == 0:
            hint = f"; its header declares {cut[0]} bytes of data, so it looks truncated" if cut else ""
            raise AudioError(f"{name} holds no audio (0 samples){hint}")
        if cut:
            raise AudioError(f"{name} is truncated: its WAV data chunk declares {cut[0]} bytes but only "
                             f"{cut[1]} are present")
        keep = _limit_frames(f.frames, sr, max_seconds, truncate, name)
        data = _read_frames(f, keep)
        # an MP3's length may be estimated from its bitrate: allow a little slack; other formats are exact
        slack = max(2 * 1152, keep // 100) if f.format == "MP3" else 0
        if len(data) < keep - slack:
            raise AudioError(f"{name} is truncated: its {f.format} header declares {keep} frames "
                             f"({keep / sr:.2f} s) but only {len(data)} could be decoded")
    return data, sr, name


# ---------------------------------------------------------------------------------------------- public


def load_audio(
    src: AudioSource,
    target_sr: int = WHISPER_SAMPLE_RATE,
    max_seconds: float | None = None,
    *,
    sample_rate: int | None = None,
    truncate: bool = False,
) -> np.ndarray:
    """Decode and check speech audio -> 1-D float32 mono at ``target_sr`` (see the module docstring).

    ``src``: encoded audio as bytes, a path or a binary file object; or a numpy array with its
    ``sample_rate``. ``max_seconds``: longer audio raises AudioError, or with ``truncate=True`` is cut
    to its first ``max_seconds`` (the output then has at most ``floor(max_seconds * target_sr)`` samples).
    """
    target_sr = _check_rate(target_sr, "target_sr")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if isinstance(src, np.ndarray):
        if sample_rate is None:
            raise TypeError("a numpy array carries no sample rate: pass sample_rate=")
        name, sr = "audio array", _check_rate(sample_rate, "sample_rate")
        frames_FC = _frames_channels(src, name)
        frames_FC = frames_FC[: _limit_frames(len(frames_FC), sr, max_seconds, truncate, name)]
    else:
        if sample_rate is not None:
            raise TypeError("sample_rate is only for numpy arrays: encoded audio declares its own")
        frames_FC, sr, name = _decode(src, max_seconds, truncate)
    wav = frames_FC.mean(axis=1) if frames_FC.shape[1] > 1 else frames_FC[:, 0]
    _check_samples(wav, name)
    if sr != target_sr:
        wav = soxr.resample(wav, sr, target_sr, quality="HQ")
    if max_seconds is not None:  # resampling may round one sample past the limit
        wav = wav[: math.floor(max_seconds * target_sr)]
    return np.ascontiguousarray(wav, dtype=np.float32)


def audio_info(src: AudioSource, *, sample_rate: int | None = None) -> AudioInfo:
    """Sample rate, frames, channels, duration and format from the header, without decoding the audio.

    Only unreadable input raises (not audio, a cut header, a missing file); the frames are what
    libsndfile says it can read — :func:`load_audio` is what checks the audio itself."""
    if isinstance(src, np.ndarray):
        if sample_rate is None:
            raise TypeError("a numpy array carries no sample rate: pass sample_rate=")
        sr = _check_rate(sample_rate, "sample_rate")
        frames_FC = _frames_channels(src)
        return AudioInfo(sr, len(frames_FC), frames_FC.shape[1], len(frames_FC) / sr, "array")
    with _open(src) as (f, name):
        sr = _check_rate(f.samplerate, f"the sample rate of {name}")
        return AudioInfo(sr, f.frames, f.channels, f.frames / sr, f.format)


def encode_audio(
    wav: np.ndarray, sample_rate: int, format: str = "FLAC", *, subtype: str | None = None
) -> bytes:
    """Encode ``[frames]`` or ``[frames, channels]`` audio to file bytes (FLAC 16-bit by default: lossless
    at 16-bit and about half the size of WAV, the form audio bytes are stored in Parquet). Float samples
    past [-1, 1] are clipped by PCM formats. ``load_audio`` reads the bytes back."""
    fmt = format.upper()
    if fmt not in sf.available_formats():
        known = ", ".join(sorted(sf.available_formats()))
        raise AudioError(f"unknown audio format {format!r}: expected one of {known}")
    sr = _check_rate(sample_rate, "sample_rate")
    frames_FC = _frames_channels(wav)
    _check_samples(frames_FC, "audio array")
    subtype = subtype or _DEFAULT_SUBTYPE.get(fmt) or sf.default_subtype(fmt)
    buf = io.BytesIO()
    try:
        sf.write(buf, frames_FC, sr, format=fmt, subtype=subtype)
    except (sf.LibsndfileError, ValueError, TypeError) as e:
        raise AudioError(f"cannot encode {frames_FC.shape[1]}-channel audio at {sr} Hz as {fmt} "
                         f"({subtype}): {e}") from e
    return buf.getvalue()


class LogMel:
    """Whisper log-mel features for a batch of 16 kHz mono utterances -> ``(mel_BMT, num_frames)``.

    transformers' ``WhisperFeatureExtractor``, built locally (nothing is downloaded) and sized from the
    encoder: the Whisper encoder takes exactly ``2 * max_source_positions`` mel frames (its second conv
    has stride 2) at 100 frames/s, so its window is ``2 * max_source_positions / 100`` s (1500 -> 30 s).
    Every utterance is padded to that window and ``num_frames[i]`` counts the frames it really covers
    (``ceil(samples / 160)``), which :class:`deepomni.model.speech.SpeechInput` uses to keep only those
    encoder outputs. Longer audio raises AudioError instead of being cut silently (the extractor's
    default): cut it upstream with ``load_audio(..., max_seconds=logmel.max_seconds, truncate=True)``.
    """

    def __init__(self, num_mel_bins: int = 80, max_source_positions: int = 1500, pad: str = "window"):
        from transformers import WhisperFeatureExtractor

        from .model.speech import MEL_FRAMES_PER_ENCODER_FRAME

        if num_mel_bins <= 0 or max_source_positions <= 0:
            raise ValueError(f"need positive num_mel_bins and max_source_positions, got "
                             f"{num_mel_bins}, {max_source_positions}")
        if pad not in ("window", "longest"):
            raise ValueError(f"pad must be 'window' or 'longest', got {pad!r}")
        self.num_mel_bins, self.pad = num_mel_bins, pad
        self.input_frames = MEL_FRAMES_PER_ENCODER_FRAME * max_source_positions
        self.max_samples = self.input_frames * WHISPER_HOP
        chunk_s = self.max_samples / WHISPER_SAMPLE_RATE
        self.extractor = WhisperFeatureExtractor(
            feature_size=num_mel_bins,
            sampling_rate=WHISPER_SAMPLE_RATE,
            hop_length=WHISPER_HOP,
            chunk_length=int(chunk_s) if chunk_s.is_integer() else chunk_s,
            n_fft=N_FFT,
            return_attention_mask=True,
        )

    @classmethod
    def from_config(cls, cfg: SpeechEncoderConfig) -> LogMel:
        """Sized for the encoder that ``cfg`` builds: a local checkpoint's own config wins, as in
        :func:`deepomni.model.speech.build_whisper_encoder`."""
        pad = "window" if cfg.window == "full" else "longest"
        if cfg.path:
            from transformers import WhisperConfig

            hf = WhisperConfig.from_pretrained(cfg.path)
            return cls(hf.num_mel_bins, hf.max_source_positions, pad)
        return cls(cfg.num_mel_bins, cfg.max_source_positions, pad)

    @property
    def max_seconds(self) -> float:
        """Longest utterance the encoder window holds."""
        return self.max_samples / WHISPER_SAMPLE_RATE

    def __call__(self, wavs: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[int]]:
        """``wavs``: 1-D float 16 kHz mono utterances (as :func:`load_audio` returns) ->
        ``mel_BMT`` float32 ``[B, num_mel_bins, T]`` and ``num_frames`` per utterance. ``T`` is the window's
        ``input_frames``, or with ``pad="longest"`` (an encoder that reads each utterance's own frames,
        ``SpeechEncoderConfig.window="utterance"``) just past the longest utterance: the frames it covers
        are the same as in the window (the STFT's edge lies in the padding either way), the cost is the
        audio's, not 16 windows' for 16 short questions."""
        if isinstance(wavs, np.ndarray):
            raise TypeError("pass a list of 1-D arrays, one per utterance")
        if not len(wavs):
            raise ValueError("no utterances to featurise")
        batch = [self._checked(i, w) for i, w in enumerate(wavs)]
        feats = self.extractor(
            batch,
            sampling_rate=WHISPER_SAMPLE_RATE,
            padding="max_length",
            max_length=self._padded_samples(batch),
            truncation=False,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return feats.input_features, feats.attention_mask.sum(-1).tolist()

    def _padded_samples(self, batch: list[np.ndarray]) -> int:
        if self.pad == "window":
            return self.max_samples
        # whole encoder frames (2 hops) past the longest utterance, and a full STFT window (n_fft) more
        frame = MEL_HOPS_PER_FRAME * WHISPER_HOP
        longest = max(len(w) for w in batch) + N_FFT
        return min(self.max_samples, -(-longest // frame) * frame)

    def _checked(self, i: int, wav: np.ndarray) -> np.ndarray:
        wav = np.asarray(wav)
        name = f"utterance {i}"
        if wav.ndim != 1 or wav.dtype.kind != "f":
            raise AudioError(f"{name}: expected 1-D float 16 kHz mono samples (see load_audio), got "
                             f"shape {wav.shape} dtype {wav.dtype}")
        _check_samples(wav, name)
        if len(wav) > self.max_samples:
            raise AudioError(f"{name} is {len(wav) / WHISPER_SAMPLE_RATE:.2f} s long, over the speech "
                             f"encoder's {self.max_seconds:g} s window: cut or split it first")
        return wav.astype(np.float32, copy=False)
