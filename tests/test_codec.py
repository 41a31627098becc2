"""Speech-output codecs: the built-in mel/RVQ/Griffin-Lim codec and the SNAC adapter, whole and streamed."""

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from deepomni.codec import BuiltinCodec, fit_builtin_codec, load_codec, log_spectral_distance
from deepomni.codec.builtin import mel_frames_for
from deepomni.codec.rvq import rvq_decode
from deepomni.codec.snac import STREAM_ATOL, SnacCodec, flatten_codes, unflatten_codes

# snac's layers module decorates a function with torch.jit.script at import
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

SR = 16000
SENTENCES = [
    ("en-us", "The birch canoe slid on the smooth planks."),
    ("en-gb", "Glue the sheet to the dark blue background."),
    ("en-us+f3", "It is easy to tell the depth of a well."),
    ("en-gb-scotland", "These days a chicken leg is a rare dish."),
    ("en-us+m3", "Rice is often served in round bowls."),  # held out
]


# ------------------------------------------------------------------------------------------ corpus
def _espeak(voice: str, text: str, tmp_path) -> np.ndarray:
    import soundfile as sf
    import soxr

    path = tmp_path / "say.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "-w", str(path), text], check=True)
    wav, rate = sf.read(path, dtype="float32")
    return soxr.resample(wav, rate, SR).astype(np.float32)


def _harmonic(seconds: float, f0: float, seed: int) -> np.ndarray:
    """Speech-like stand-in: a gliding harmonic tone with a syllable-rate envelope and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.2 * np.sin(2 * np.pi * 0.7 * t))) / SR
    tone = sum(np.sin(h * phase) / h for h in range(1, 20))
    envelope = np.clip(np.sin(2 * np.pi * 3 * t + seed), 0, None)
    return (0.1 * envelope * tone + 0.003 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(training waveforms, held-out waveform): espeak-ng speech, or harmonic signals without it."""
    if shutil.which("espeak-ng"):
        tmp = tmp_path_factory.mktemp("speech")
        wavs = [_espeak(voice, text, tmp) for voice, text in SENTENCES]
    else:
        wavs = [_harmonic(2.5, f0, seed) for seed, f0 in enumerate([110, 150, 210, 130, 180])]
    return wavs[:-1], wavs[-1]


@pytest.fixture(scope="module")
def builtin(corpus):
    return fit_builtin_codec(corpus[0], seed=0, kmeans_iters=8, progress=False)


# ------------------------------------------------------------------------------------------ built-in
def test_builtin_describes_the_tiny_preset_layout(builtin):
    assert (builtin.num_channels, builtin.codebook_size, builtin.sample_rate) == (4, 256, SR)
    assert builtin.frame_rate == 12.5 and builtin.samples_per_frame == 1280


def test_builtin_frame_is_given_in_milliseconds_of_its_mel_hop():
    assert (mel_frames_for(80), mel_frames_for(40), mel_frames_for(10)) == (8, 4, 1)
    for bad in (0, 45, -40):
        with pytest.raises(ValueError, match="multiple of its 10 ms mel hop"):
            mel_frames_for(bad)


def test_builtin_fit_is_deterministic_for_a_seed(corpus, builtin):
    again = fit_builtin_codec(corpus[0], seed=0, kmeans_iters=8, progress=False)
    assert torch.equal(again.codebooks_KCD, builtin.codebooks_KCD)
    small = [fit_builtin_codec(corpus[0][:1], seed=s, kmeans_iters=2, codebook_size=16, progress=False)
             for s in (0, 1)]
    assert small[0].codebooks_KCD.shape == (4, 16, builtin.config.frame_dim)
    assert not torch.equal(small[0].codebooks_KCD, small[1].codebooks_KCD)


def test_builtin_encode_decode_shapes(builtin, corpus):
    wav = corpus[1]
    codes = builtin.encode(wav)
    frames = math.ceil(len(wav) / builtin.samples_per_frame)
    assert codes.dtype == torch.long and codes.shape == (4, frames)
    assert abs(frames - len(wav) / SR * builtin.frame_rate) < 1
    assert 0 <= int(codes.min()) and int(codes.max()) < builtin.codebook_size
    audio = builtin.decode(codes)
    assert audio.dtype == np.float32 and audio.shape == (frames * builtin.samples_per_frame,)
    assert len(audio) - len(wav) < builtin.samples_per_frame and np.isfinite(audio).all()
    assert builtin.encode(np.zeros(0, dtype=np.float32)).shape == (4, 0)
    assert builtin.decode(torch.zeros(4, 0, dtype=torch.long)).shape == (0,)


def test_builtin_save_load_round_trip(builtin, corpus, tmp_path):
    builtin.save(tmp_path / "codec")
    loaded = load_codec(f"builtin:{tmp_path / 'codec'}")
    assert isinstance(loaded, BuiltinCodec) and loaded.config == builtin.config
    codes = builtin.encode(corpus[1])
    assert torch.equal(loaded.encode(corpus[1]), codes)
    assert np.array_equal(loaded.decode(codes[:, :10]), builtin.decode(codes[:, :10]))


def test_builtin_every_rvq_level_reduces_the_feature_error(builtin, corpus):
    vectors = builtin.frame_vectors(corpus[1])
    codes = builtin.encode(corpus[1])
    rms_db = [(vectors - rvq_decode(codes[:n], builtin.codebooks_KCD)).square().mean().sqrt().item()
              for n in range(1, 5)]
    assert all(a > b for a, b in zip(rms_db, rms_db[1:])), rms_db


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="a claim about speech: needs espeak-ng")
def test_builtin_more_levels_give_a_better_spectrum_on_held_out_speech(builtin, corpus):
    wav = corpus[1]
    codes = builtin.encode(wav)
    lsd = [log_spectral_distance(wav, builtin.decode(codes, levels=n)) for n in range(1, 5)]
    assert lsd[3] < lsd[0] - 0.5, lsd  # measured: 10.3 -> 9.3 dB here, 8.7 -> 7.6 in the benchmark
    assert all(0 < d < 15 for d in lsd), lsd


@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_builtin_streaming_equals_whole_decode_exactly(builtin, corpus, chunk):
    codes = builtin.encode(corpus[1])[:, :20]
    stream = builtin.stream_decoder()
    parts = [stream.push(codes[:, i:i + chunk]) for i in range(0, codes.shape[1], chunk)]
    parts += [stream.push(codes[:, :0]), stream.flush()]
    assert np.array_equal(np.concatenate(parts), builtin.decode(codes))
    # a frame's audio is out as soon as the frame is in, except the last half window (20 ms)
    assert len(parts[0]) == min(chunk, 20) * 1280 - 320
    # after flush the decoder starts a new stream
    assert np.array_equal(np.concatenate([stream.push(codes), stream.flush()]), builtin.decode(codes))


def test_builtin_many_streams_at_once_equal_one_at_a_time(builtin, corpus):
    """``stream_step_many`` (serving's batched vocoder): streams of different lengths, fed in uneven blocks,
    give exactly the audio each gives alone."""
    codes = [builtin.encode(w)[:, :n] for w, n in zip([*corpus[0][:2], corpus[1]], (7, 3, 9))]
    alone = [builtin.decode(c) for c in codes]
    states = [builtin.init_stream_state() for _ in codes]
    parts = [[] for _ in codes]
    for lo, hi in ((0, 2), (2, 3), (3, 9)):
        for i, a in enumerate(builtin.stream_step_many(states, [c[:, lo:hi] for c in codes])):
            parts[i].append(a)
    for i, st in enumerate(states):
        parts[i].append(builtin.stream_flush(st))
        assert np.array_equal(np.concatenate(parts[i]), alone[i]), i


def test_codes_are_checked(builtin):
    with pytest.raises(ValueError, match="K=4"):
        builtin.decode(torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        builtin.stream_decoder().push(torch.full((4, 2), 256))
    with pytest.raises(ValueError, match="integer"):
        builtin.decode(torch.zeros(4, 2))


# ------------------------------------------------------------------------------------------ SNAC
SMALL_SNAC = dict(sampling_rate=24000, encoder_dim=8, encoder_rates=[2, 4, 8, 8], decoder_dim=32,
                  decoder_rates=[8, 8, 4, 2], attn_window_size=None, codebook_size=4096, codebook_dim=8,
                  vq_strides=[4, 2, 1], noise=True, depthwise=True)  # snac_24khz's layout, narrower


def _save_snac(directory, **overrides):
    """A randomly initialised SNAC saved in the hub layout (config.json + pytorch_model.bin)."""
    from snac import SNAC

    config = {**SMALL_SNAC, **overrides}
    torch.manual_seed(0)
    model = SNAC(**config)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


@pytest.fixture(scope="module")
def snac_dir(tmp_path_factory):
    return _save_snac(tmp_path_factory.mktemp("snac"))


@pytest.fixture(scope="module")
def snac(snac_dir):
    return load_codec(f"snac:{snac_dir}")


@pytest.fixture(scope="module")
def snac_codes(snac):
    wav = np.random.default_rng(0).standard_normal(int(1.5 * 24000)).astype(np.float32) * 0.1
    return snac.encode(wav)


def test_snac_encode_decode_shapes(snac, snac_codes):
    assert isinstance(snac, SnacCodec)
    assert (snac.num_channels, snac.codebook_size, snac.sample_rate, snac.samples_per_frame) == (7, 4096, 24000, 2048)
    assert snac.frame_rate == pytest.approx(11.71875)
    assert snac_codes.shape == (7, math.ceil(1.5 * 24000 / 2048)) and snac_codes.dtype == torch.long
    assert 0 <= int(snac_codes.min()) and int(snac_codes.max()) < 4096
    audio = snac.decode(snac_codes)
    assert audio.shape == (snac_codes.shape[1] * 2048,) and np.isfinite(audio).all()
    assert np.array_equal(audio, snac.decode(snac_codes))  # positional noise: decoding is deterministic


def test_snac_flattening_is_the_common_layout_and_inverts():
    l0, l1, l2 = torch.arange(3), torch.arange(100, 106), torch.arange(200, 212)
    flat = flatten_codes([l0[None], l1[None], l2[None]])
    assert flat[:, 1].tolist() == [l0[1], l1[2], l2[4], l2[5], l1[3], l2[6], l2[7]]
    codes = torch.randint(0, 4096, (7, 9))
    assert torch.equal(flatten_codes(unflatten_codes(codes)), codes)


def test_snac_matches_the_reference_loader(snac_dir, snac, tmp_path):
    from snac import SNAC

    wav = np.random.default_rng(1).standard_normal(5000).astype(np.float32) * 0.1
    reference = SNAC.from_pretrained(str(snac_dir))  # a local directory: no network
    with torch.inference_mode():
        assert torch.equal(flatten_codes(reference.encode(torch.from_numpy(wav)[None, None])), snac.encode(wav))
    # without decoder noise the adapter's decode is SNAC's decode of the unflattened codes
    quiet_dir = _save_snac(tmp_path / "quiet", noise=False)
    quiet, quiet_ref = load_codec(f"snac:{quiet_dir}"), SNAC.from_pretrained(str(quiet_dir))
    codes = torch.randint(0, 4096, (7, 4))
    with torch.inference_mode():
        expected = quiet_ref.decode(unflatten_codes(codes)).flatten().numpy()
    np.testing.assert_allclose(quiet.decode(codes), expected, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_snac_streaming_matches_whole_decode(snac, snac_codes, chunk):
    stream = snac.stream_decoder()
    parts = [stream.push(snac_codes[:, i:i + chunk]) for i in range(0, snac_codes.shape[1], chunk)]
    streamed = np.concatenate(parts + [stream.flush()])
    whole = snac.decode(snac_codes)
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, atol=STREAM_ATOL, rtol=0)
    # audio is held back only for the decoder's look-ahead
    assert sum(map(len, parts)) == (snac_codes.shape[1] - snac.lookahead) * snac.samples_per_frame


def test_snac_rejects_other_layouts(tmp_path):
    directory = _save_snac(tmp_path, encoder_rates=[2, 4, 8], decoder_rates=[8, 4, 2], vq_strides=[8, 4, 2, 1])
    with pytest.raises(ValueError, match="vq_strides"):
        load_codec(f"snac:{directory}")


# ------------------------------------------------------------------------------------------ factory
def test_load_codec_errors(tmp_path, snac_dir):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_codec(f"builtin:{tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="codebooks.safetensors"):
        load_codec(f"builtin:{tmp_path}")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_codec(f"snac:{tmp_path}")
    with pytest.raises(ValueError, match="unknown codec kind"):
        load_codec(f"encodec:{snac_dir}")
    with pytest.raises(ValueError, match="builtin:<dir>"):
        load_codec(str(snac_dir))
