"""Speech input I/O: decoding, normalisation, refusal of bad audio, encoding, and Whisper log-mel features."""

import dataclasses
import io
import math
import shutil
import struct
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch

from deepomni.audio import AudioError, LogMel, audio_info, encode_audio, load_audio


def sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def on_int16_grid(x: np.ndarray) -> np.ndarray:
    """Samples exactly representable at 16 bits, so lossless formats must give them back unchanged."""
    return (np.round(x * 32767) / 32768).astype(np.float32)


def peak_hz(wav: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), 1 / sr)[np.argmax(spectrum)])


def wav_bytes(x: np.ndarray, sr: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_lossless_round_trip(fmt):
    x = on_int16_grid(sine(440, 16000, 1.5))
    data = encode_audio(x, 16000, fmt)
    assert audio_info(data) == (16000, len(x), 1, 1.5, fmt)
    np.testing.assert_array_equal(load_audio(data), x)


@pytest.mark.parametrize("fmt", ["OGG", "MP3"])
def test_lossy_round_trip(fmt):
    if fmt not in sf.available_formats():
        pytest.skip(f"libsndfile without {fmt}")
    x = sine(440, 16000, 1.0)
    y = load_audio(encode_audio(x, 16000, fmt))
    assert abs(len(y) - len(x)) <= 0.01 * 16000
    assert abs(peak_hz(y, 16000) - 440) <= 2
    n = min(len(x), len(y))
    assert np.corrcoef(x[:n], y[:n])[0, 1] > 0.9


def test_sources_path_file_object_and_stream(tmp_path):
    x = on_int16_grid(sine(300, 16000, 0.5))
    path = tmp_path / "a.flac"
    path.write_bytes(encode_audio(x, 16000))

    class Stream:  # read() only, like a socket or an HTTP body
        def __init__(self, data: bytes):
            self._buf = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self._buf.read(n)

        def seekable(self) -> bool:
            return False

    with open(path, "rb") as f:
        from_file = load_audio(f)
    for y in (load_audio(str(path)), load_audio(path), from_file, load_audio(Stream(path.read_bytes()))):
        np.testing.assert_array_equal(y, x)
    assert audio_info(path).format == "FLAC"


# -------------------------------------------------------------------------------------- normalisations


def test_stereo_downmix_file_and_arrays():
    left, right = on_int16_grid(sine(300, 16000, 0.5)), on_int16_grid(sine(700, 16000, 0.5, amp=0.25))
    stereo_FC = np.stack([left, right], axis=1)
    want = (left + right) / 2
    np.testing.assert_allclose(load_audio(encode_audio(stereo_FC, 16000, "WAV")), want, atol=1e-7)
    np.testing.assert_allclose(load_audio(stereo_FC, sample_rate=16000), want, atol=1e-7)
    channels_first = load_audio(stereo_FC.T, sample_rate=16000)  # torchaudio's (channels, frames)
    np.testing.assert_allclose(channels_first, want, atol=1e-7)
    assert audio_info(stereo_FC.T, sample_rate=16000) == (16000, len(left), 2, 0.5, "array")


def test_integer_pcm_becomes_float():
    pcm = np.array([0, 16384, -16384, 32767, -32768], dtype=np.int16)
    want = pcm.astype(np.float32) / 32768
    np.testing.assert_array_equal(load_audio(pcm, sample_rate=16000), want)
    np.testing.assert_array_equal(load_audio(wav_bytes(pcm, 16000)), want)
    np.testing.assert_array_equal(load_audio(pcm.astype(np.int32) << 16, sample_rate=16000), want)
    u8 = np.array([128, 192, 64, 255, 0], dtype=np.uint8)  # 8-bit WAV: offset binary
    np.testing.assert_array_equal(load_audio(u8, sample_rate=16000), [0, 0.5, -0.5, 127 / 128, -1])
    assert load_audio(pcm, sample_rate=16000).dtype == np.float32


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resampling_keeps_duration_and_pitch(sr):
    x = sine(1000, sr, 1.2345)
    y = load_audio(encode_audio(x, sr, "WAV"))
    assert abs(len(y) - len(x) * 16000 / sr) <= 1
    assert abs(peak_hz(y, 16000) - 1000) <= 2
    assert abs(peak_hz(load_audio(x, target_sr=24000, sample_rate=sr), 24000) - 1000) <= 2


def test_max_seconds_refuses_or_truncates():
    x = sine(440, 48000, 3.0)
    data = encode_audio(x, 48000)
    with pytest.raises(AudioError, match=r"3\.00 s long, over the limit of 2 s.*truncate=True"):
        load_audio(data, max_seconds=2)
    with pytest.raises(AudioError, match="3.00 s long"):
        load_audio(x, max_seconds=2, sample_rate=48000)
    assert len(load_audio(data, max_seconds=1.5, truncate=True)) == 24000
    assert len(load_audio(x, max_seconds=1.5, truncate=True, sample_rate=48000)) == 24000
    assert len(load_audio(data, max_seconds=3)) == 48000  # exactly at the limit is fine


# ------------------------------------------------------------------------------------------ bad audio


def test_not_audio(tmp_path):
    with pytest.raises(AudioError, match="not a recognised audio file"):
        load_audio(np.random.default_rng(0).bytes(2000))
    text = tmp_path / "notes.wav"
    text.write_text("this is a text file, not audio\n" * 20)
    with pytest.raises(AudioError, match=r"notes\.wav is not a recognised audio file"):
        load_audio(text)
    with pytest.raises(AudioError, match="not a recognised"):
        audio_info(text)


def test_truncated_files():
    x = sine(440, 16000, 1.0)
    wav = wav_bytes(x, 16000)
    with pytest.raises(AudioError, match="truncated or corrupt"):  # cut inside the header
        load_audio(wav[:20])
    with pytest.raises(AudioError, match=r"0 samples.*looks truncated"):  # header only
        load_audio(wav[:44])
    with pytest.raises(AudioError, match="truncated: its WAV data chunk declares 32000 bytes but only"):
        load_audio(wav[: len(wav) // 2])
    flac = encode_audio(x, 16000, "FLAC")
    with pytest.raises(AudioError, match="truncated or corrupt"):
        load_audio(flac[: len(flac) // 2])
    if "MP3" in sf.available_formats():
        mp3 = encode_audio(sine(440, 16000, 3.0), 16000, "MP3")
        with pytest.raises(AudioError, match="truncated: its MP3 header declares 48000 frames"):
            load_audio(mp3[: len(mp3) // 2])


def test_empty_audio(tmp_path):
    for empty in (b"", wav_bytes(np.zeros(0, np.float32), 16000), np.zeros(0, np.float32), np.zeros((0, 2))):
        with pytest.raises(AudioError, match="(0 samples|0 bytes)"):
            load_audio(empty, sample_rate=16000 if isinstance(empty, np.ndarray) else None)
    (tmp_path / "empty.wav").touch()
    with pytest.raises(AudioError, match="empty file"):
        load_audio(tmp_path / "empty.wav")


def test_non_finite_samples():
    x = sine(440, 16000, 0.1)
    x[100] = np.nan
    with pytest.raises(AudioError, match=r"1 non-finite samples \(NaN or Inf\), the first at frame 100"):
        load_audio(wav_bytes(x, 16000, subtype="FLOAT"))
    x[100], x[7] = 0, -np.inf
    with pytest.raises(AudioError, match="first at frame 7"):
        load_audio(x, sample_rate=16000)
    with pytest.raises(AudioError, match="non-finite"):
        encode_audio(np.array([0.1, np.inf]), 16000)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(FileNotFoundError):
        audio_info(str(tmp_path / "missing.wav"))


def test_bad_sample_rates():
    x = sine(440, 16000, 0.1)
    for sr in (0, -16000, 10**9, 22050.5, float("nan")):
        with pytest.raises(AudioError, match="not a usable sample rate"):
            load_audio(x, sample_rate=sr)
    with pytest.raises(AudioError, match="target_sr of 0 Hz"):
        load_audio(x, target_sr=0, sample_rate=16000)
    header = bytearray(wav_bytes(x, 16000))
    header[24:28] = struct.pack("<I", 3)  # a corrupt header declaring 3 Hz
    with pytest.raises(AudioError, match="sample rate of audio .* 3 Hz"):
        load_audio(bytes(header))
    header[24:28] = struct.pack("<I", 0)  # libsndfile itself refuses 0 Hz
    with pytest.raises(AudioError, match="truncated or corrupt"):
        load_audio(bytes(header))
    with pytest.raises(AudioError, match="sample_rate of 4 Hz"):
        encode_audio(x, 4)


def test_bad_arrays_and_arguments():
    with pytest.raises(AudioError, match=r"3-D with shape \(2, 3, 1000\)"):
        load_audio(np.zeros((2, 3, 1000), np.float32), sample_rate=16000)
    with pytest.raises(AudioError, match="shape \\(100, 100\\) is not audio"):
        load_audio(np.zeros((100, 100), np.float32), sample_rate=16000)
    for dtype in (np.complex64, object, bool):
        with pytest.raises(AudioError, match="which is not audio"):
            load_audio(np.ones(1000, dtype=dtype), sample_rate=16000)
    with pytest.raises(TypeError, match="pass sample_rate="):
        load_audio(np.zeros(1000, np.float32))
    with pytest.raises(TypeError, match="only for numpy arrays"):
        load_audio(wav_bytes(np.zeros(100, np.float32), 16000), sample_rate=16000)
    with pytest.raises(TypeError, match="got int"):
        load_audio(123)
    with pytest.raises(AudioError, match="unknown audio format 'M4A'"):
        encode_audio(np.zeros(100, np.float32), 16000, "M4A")


# ------------------------------------------------------------------------------------------------ LogMel


@pytest.fixture(scope="module")
def logmel():
    return LogMel()


def test_logmel_batch_shapes_and_frames(logmel):
    wavs = [sine(440, 16000, 1.0), sine(220, 16000, 2.5), sine(880, 16000, 0.0101)]
    mel_BMT, num_frames = logmel(wavs)
    assert mel_BMT.shape == (3, 80, 3000) and mel_BMT.dtype == torch.float32
    assert num_frames == [math.ceil(len(w) / 160) for w in wavs] == [100, 250, 2]
    assert logmel.max_seconds == 30.0 and logmel.input_frames == 3000
    # one utterance alone gives the same features as inside a batch (normalisation is per utterance)
    torch.testing.assert_close(logmel(wavs[1:2])[0][0], mel_BMT[1])


def test_logmel_equals_whisper_feature_extractor(logmel):
    from transformers import WhisperFeatureExtractor

    wav = np.random.default_rng(0).standard_normal(12345).astype(np.float32) * 0.1
    ref = WhisperFeatureExtractor(feature_size=80)(wav, sampling_rate=16000, return_tensors="pt")
    torch.testing.assert_close(logmel([wav])[0], ref.input_features)


def test_logmel_sizes_and_limits(tiny_cfg, logmel):
    small = LogMel(num_mel_bins=128, max_source_positions=200)
    mel_BMT, num_frames = small([sine(440, 16000, 1.0)])
    assert mel_BMT.shape == (1, 128, 400) and num_frames == [100] and small.max_seconds == 4.0
    with pytest.raises(AudioError, match=r"4\.01 s long, over the speech encoder's 4 s window"):
        small([sine(440, 16000, 4.01)])
    assert logmel([np.zeros(480_000, np.float32)])[1] == [3000]  # exactly 30 s fits
    assert LogMel.from_config(tiny_cfg.speech_encoder).max_seconds == 8.0  # tiny: 400 positions of 20 ms
    with pytest.raises(AudioError, match="0 samples"):
        logmel([np.zeros(0, np.float32)])
    with pytest.raises(AudioError, match="expected 1-D float"):
        logmel([np.zeros((100, 2), np.float32)])


def test_logmel_from_local_whisper_checkpoint_config(tmp_path, tiny_cfg):
    from transformers import WhisperConfig

    WhisperConfig(num_mel_bins=128, max_source_positions=750).save_pretrained(tmp_path)
    cfg = dataclasses.replace(tiny_cfg.speech_encoder, path=str(tmp_path))  # the checkpoint's sizes win
    logmel = LogMel.from_config(cfg)
    assert (logmel.num_mel_bins, logmel.input_frames, logmel.max_seconds) == (128, 1500, 15.0)


def test_logmel_feeds_speech_encoder(tiny_model, tiny_cfg):
    logmel = LogMel.from_config(tiny_cfg.speech_encoder)
    wavs = [load_audio(sine(440, 48000, 1.0), sample_rate=48000), sine(300, 16000, 0.37)]
    mel_BMT, num_frames = logmel(wavs)
    with torch.no_grad():
        out = tiny_model.encode_speech(mel_BMT, num_frames)
    ds = tiny_cfg.speech_encoder.downsample  # 20 ms encoder frames, stacked ds at a time by the projector
    assert [o.shape[0] for o in out] == [math.ceil(math.ceil(n / 2) / ds) for n in num_frames] == [13, 5]
    assert all(o.shape[1] == tiny_cfg.hidden_size and torch.isfinite(o).all() for o in out)


def test_logmel_padded_to_the_longest_is_the_window_features():
    """pad="longest" (an encoder reading each utterance's own frames) stops just past the longest utterance
    in whole encoder frames, and the frames the audio covers are the window's, bit for bit."""
    wavs = [sine(440, 16000, 1.0), sine(220, 16000, 2.5), sine(880, 16000, 0.0101)]
    window, longest = LogMel(80, 400, "window"), LogMel(80, 400, "longest")
    (mel_w, n_w), (mel_l, n_l) = window(wavs), longest(wavs)
    assert n_w == n_l == [100, 250, 2] and mel_w.shape[-1] == 800
    assert 252 <= mel_l.shape[-1] <= 256 and mel_l.shape[-1] % 2 == 0
    for i, n in enumerate(n_w):
        assert torch.equal(mel_w[i, :, :n], mel_l[i, :, :n])
    assert longest([np.zeros(128_000, np.float32)])[0].shape[-1] == 800  # never past the window
    with pytest.raises(ValueError, match="pad must be"):
        LogMel(pad="batch")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_real_speech_from_espeak(tmp_path, logmel):
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "hello, this is a spoken question"], check=True)
    info = audio_info(path)
    wav = load_audio(path)
    assert info.sample_rate != 16000 and abs(len(wav) / 16000 - info.duration_s) < 1e-3
    mel_BMT, (n,) = logmel([wav])
    assert n == math.ceil(len(wav) / 160)
    speech, padding = mel_BMT[0, :, :n], mel_BMT[0, :, n + 1 :]
    assert speech.std() > 0.1 and padding.std() < 1e-4  # speech has structure; the padding is silence


# ------------------------------------------------------------------------------ WAV written to a pipe


def piped_wav(pcm_FC: np.ndarray, sr: int, data_size: int, riff_size: int, tail: bytes = b"") -> bytes:
    """A 16-bit PCM WAV as a writer that cannot seek back writes it: sizes declared "unknown"."""
    frames, channels = pcm_FC.shape
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, channels, sr, sr * 2 * channels, 2 * channels, 16)
    return (struct.pack("<4sI4s", b"RIFF", riff_size, b"WAVE") + fmt
            + struct.pack("<4sI", b"data", data_size) + pcm_FC.astype("<i2").tobytes() + tail)


@pytest.mark.parametrize("data_size", [0xFFFF_FFFF, 0x7FFF_F000])
@pytest.mark.parametrize("riff_size", [0xFFFF_FFFF, 0x7FFF_F024, None])
def test_wav_with_unknown_size_from_a_pipe(data_size, riff_size):
    rng = np.random.default_rng(0)
    mono = rng.integers(-32768, 32768, size=(1001, 1), dtype=np.int16)
    stereo = rng.integers(-32768, 32768, size=(777, 2), dtype=np.int16)
    for pcm, tail in ((mono, b""), (mono, b"\x7f"), (stereo, b""), (stereo, b"\x01\x02\x03")):
        body = 36 + pcm.nbytes + len(tail)
        data = piped_wav(pcm, 16000, data_size, body if riff_size is None else riff_size, tail)
        expected = pcm.astype(np.float32).mean(axis=1) / 32768  # a trailing partial frame is dropped
        assert audio_info(data).frames == len(pcm)
        np.testing.assert_allclose(load_audio(data), expected, rtol=0, atol=1e-7)
        np.testing.assert_allclose(load_audio(io.BytesIO(data), max_seconds=0.01, truncate=True),
                                   expected[:160], rtol=0, atol=1e-7)


def test_truncated_wav_still_refused_next_to_unknown_sizes():
    pcm = np.arange(-500, 500, dtype=np.int16)[:, None]
    for declared in (pcm.nbytes + 2, 2 * pcm.nbytes, 0x7FFF_EFFE, 0x8000_0000):
        data = piped_wav(pcm, 16000, declared, 36 + declared)
        with pytest.raises(AudioError, match=f"truncated: its WAV data chunk declares {declared} bytes "
                                             f"but only {pcm.nbytes} are present"):
            load_audio(data)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_espeak_stdout_wav_loads():
    out = subprocess.run(["espeak-ng", "--stdout", "hello world"], check=True, capture_output=True).stdout
    assert struct.unpack("<I", out[40:44])[0] in (0x7FFF_F000, 0xFFFF_FFFF)  # the data size is "unknown"
    info = audio_info(out)
    wav = load_audio(out)
    assert info.frames == (len(out) - 44) // 2
    assert abs(len(wav) / 16000 - info.duration_s) < 1e-3 and wav.std() > 0.01
