"""Round-trip quality of the built-in codec on real (espeak-ng) speech, per number of RVQ levels.

Corpus: the first 40 Harvard sentences (IEEE 1969), spoken by espeak-ng with 8 voices in turn, resampled to
16 kHz. The codec is fitted on sentences 1-32 and measured on the held-out sentences 33-40 (other text;
the voices recur, as a deployed codec would be fitted on its own TTS voices).

Measure: log-spectral distance (``deepomni.codec.quality.log_spectral_distance``: per 32 ms frame the RMS
over frequency of the dB difference of the power spectra, averaged over frames; floor 80 dB below the
reference's peak), mean over held-out sentences. Rows:

    levels 1..K     decode with only the first n RVQ levels (channels); each row should beat the previous
    unquantised     the frame vectors straight into the decoder: the floor that mel + Griffin-Lim allow
    train, K levels the same on the training sentences (how much the codebooks overfit)
    N Griffin-Lim iters  all K levels decoded with N phase iterations per block (the decoder's main cost)

Also: fit time, encode and decode real-time factors, and a check that streaming one frame at a time
equals the whole decode bit for bit.

    python -m benchmarks.codec_quality            # fit on 32 sentences, measure on 8
    python -m benchmarks.codec_quality --quick    # smoke test: 8 + 2 sentences, writes no results

The last printed line is ``log_spectral_distance_db=<held-out LSD with all K levels>``. Figures go to
``benchmarks/results/codec_quality.json``.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from benchmarks.harness import RESULTS, command, machine, parser, save_result
from deepomni.codec import BuiltinCodec, fit_builtin_codec, log_spectral_distance

SAMPLE_RATE = 16000
NUM_TRAIN = 32
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-scotland", "en-us+m3", "en-029", "en-us+f2", "en-gb-x-rp+m4"]
SENTENCES = [
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "Large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.", "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.", "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.", "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.", "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.", "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.", "Read verse out loud for pleasure.",
    "Hoist the load to your left shoulder.", "Take the winding path to reach the lake.",
    "Note closely the size of the gas tank.", "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.", "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.", "The young girl gave no clear response.",
    "The meal was cooked before the bell rang.", "What joy there is in living.",
]


def speak(sentences: list[str]) -> list[np.ndarray]:
    """espeak-ng at 150 words/min, voice i mod 8, resampled to 16 kHz float32."""
    if not shutil.which("espeak-ng"):
        raise SystemExit("espeak-ng is needed for this benchmark (apt-get install espeak-ng)")
    wavs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(sentences):
            path = Path(tmp) / f"{i}.wav"
            subprocess.run(["espeak-ng", "-v", VOICES[i % len(VOICES)], "-s", "150", "-w", str(path), text],
                           check=True)
            wav, rate = sf.read(path, dtype="float32")
            wavs.append(soxr.resample(wav, rate, SAMPLE_RATE).astype(np.float32))
    return wavs


def mean_lsd(codec: BuiltinCodec, wavs: list[np.ndarray], levels: int | None) -> float:
    return float(np.mean([log_spectral_distance(w, codec.decode(codec.encode(w), levels=levels)) for w in wavs]))


def unquantised_lsd(codec: BuiltinCodec, wavs: list[np.ndarray]) -> float:
    scores = []
    for wav in wavs:
        state = codec.init_stream_state()
        audio = np.concatenate([codec.synthesise(state, codec.frame_vectors(wav)), codec.stream_flush(state)])
        scores.append(log_spectral_distance(wav, audio))
    return float(np.mean(scores))


def main() -> None:
    ap = parser("codec_quality", __doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kmeans-iters", type=int, default=20)
    ap.add_argument("--gl-iters", type=int, nargs="*", default=[8, 16, 24, 32],
                    help="Griffin-Lim iterations per block to compare (held-out LSD, decode speed)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 training + 2 held-out sentences")
    ap.add_argument("--out", type=Path, default=None, help="JSON results file (default "
                    "benchmarks/results/codec_quality.json; --quick writes none)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    num_train = 8 if args.quick else NUM_TRAIN
    train_text = SENTENCES[:num_train]
    test_text = SENTENCES[NUM_TRAIN:NUM_TRAIN + (2 if args.quick else len(SENTENCES))]
    wavs = speak(train_text + test_text)
    train, test = wavs[:num_train], wavs[num_train:]
    train_s, test_s = (sum(map(len, ws)) / SAMPLE_RATE for ws in (train, test))

    t0 = time.perf_counter()
    codec = fit_builtin_codec(train, seed=args.seed, kmeans_iters=args.kmeans_iters)
    fit_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    codes = [codec.encode(w) for w in test]
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded = [codec.decode(c) for c in codes]
    decode_s = time.perf_counter() - t0

    K = codec.num_channels
    per_level = {n: mean_lsd(codec, test, n) for n in range(1, K)}
    per_level[K] = float(np.mean([log_spectral_distance(w, d) for w, d in zip(test, decoded)]))
    floor = unquantised_lsd(codec, test)
    train_lsd = mean_lsd(codec, train, None)

    stream = codec.stream_decoder()
    streamed = np.concatenate([stream.push(codes[0][:, i:i + 1]) for i in range(codes[0].shape[1])]
                              + [stream.flush()])
    stream_exact = bool(np.array_equal(streamed, decoded[0]))

    sweep = {}
    for iters in args.gl_iters:  # decoding only: the codebooks and codes stay the same
        gl = dataclasses.replace(codec.config, griffin_lim_iters=iters)
        variant = BuiltinCodec(gl, codec.codebooks_KCD)
        t0 = time.perf_counter()
        out = [variant.decode(c) for c in codes]
        sweep[iters] = {"lsd_db": float(np.mean([log_spectral_distance(w, d) for w, d in zip(test, out)])),
                        "decode_realtime_factor": test_s / (time.perf_counter() - t0)}

    cfg = codec.config
    print(f"built-in codec: {K} x {cfg.codebook_size} RVQ, {codec.frame_rate:g} Hz frames, {cfg.num_mels} mels | "
          f"fit on {num_train} sentences ({train_s:.1f} s) in {fit_s:.1f} s | held out {len(test)} ({test_s:.1f} s) "
          f"| torch {torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'decode':<24}{'LSD dB':>8}")
    for n, lsd in per_level.items():
        print(f"{f'levels 1..{n}':<24}{lsd:>8.2f}")
    print(f"{'unquantised (floor)':<24}{floor:>8.2f}")
    print(f"{f'train, {K} levels':<24}{train_lsd:>8.2f}")
    for iters, r in sweep.items():
        print(f"{f'{iters} Griffin-Lim iters':<24}{r['lsd_db']:>8.2f}   decode {r['decode_realtime_factor']:.1f}x real time")
    print(f"encode {test_s / encode_s:.0f}x real time, decode {test_s / decode_s:.1f}x real time; "
          f"streaming (1 frame per push) == whole decode: {stream_exact}")

    if not args.quick or args.out:
        save_result(args.out or RESULTS / "codec_quality.json", {
            "command": command("codec_quality"), "machine": machine(),
            "threads": torch.get_num_threads(),
            "config": {**cfg.__dict__, "frame_rate_hz": codec.frame_rate},
            "corpus": {"voices": VOICES, "train_sentences": num_train, "train_seconds": train_s,
                       "test_sentences": len(test), "test_seconds": test_s},
            "seed": args.seed,
            "kmeans_iters": args.kmeans_iters,
            "fit_seconds": fit_s,
            "encode_realtime_factor": test_s / encode_s,
            "decode_realtime_factor": test_s / decode_s,
            "lsd_db_held_out_by_levels": {str(n): v for n, v in per_level.items()},
            "lsd_db_held_out_unquantised": floor,
            "lsd_db_train_all_levels": train_lsd,
            "streaming_equals_decode": stream_exact,
            "griffin_lim_iters_sweep": {str(k): v for k, v in sweep.items()},
        })
    print(f"log_spectral_distance_db={per_level[K]:.3f}")


if __name__ == "__main__":
    main()
