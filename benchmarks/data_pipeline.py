"""Throughput of the preprocessing pipeline (``deepomni data prepare``) on this machine.

    python -m benchmarks.data_pipeline [--train 400] [--feature-actors 1] [--codec-actors 1]

Synthesizes a built-in corpus, then runs, on the same raw shards and the same fitted codec:
  1. the Ray Data pipeline (embedded local Ray, actor pools), end to end including the Parquet write;
  2. the same three stages called in-process on the same batches, no Ray (the reference).
Prints items/s and seconds of audio per second for both, saves ``benchmarks/results/data_pipeline.json``;
the last line is ``audio_seconds_per_second=<Ray pipeline figure>``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow.dataset as pads

from benchmarks.harness import command, machine, parser, save_result
from deepomni.config import DataConfig, load_preset
from deepomni.data.pipeline import CodecStage, FeatureStage, SequenceStage, prepare, resolve_codec
from deepomni.data.synth import SynthConfig, synthesize


def in_process(raw_files: list[str], cfg: DataConfig, codec_spec: str) -> float:
    model_cfg = load_preset(cfg.preset).to_dict()
    stages = [FeatureStage(model_cfg, asdict(cfg)), CodecStage(codec_spec, cfg.max_audio_seconds),
              SequenceStage(model_cfg, cfg.tokenizer)]
    table = pads.dataset(raw_files, format="parquet").to_table()
    t0 = time.perf_counter()
    for start in range(0, table.num_rows, cfg.batch_size):
        batch = table.slice(start, cfg.batch_size)
        for stage in stages:
            batch = stage(batch)
    return time.perf_counter() - t0


def main() -> None:
    ap = parser("data_pipeline", __doc__)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--feature-actors", type=int, default=1)
    ap.add_argument("--codec-actors", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        synth = synthesize(SynthConfig(seed=0, sizes={"train": args.train, "validation": 0, "test": 0}), out,
                           progress=False)
        cfg = DataConfig(feature_actors=args.feature_actors, codec_actors=args.codec_actors,
                         batch_size=args.batch_size)
        t0 = time.perf_counter()  # fit the built-in codec once, outside the timed pipeline
        cfg.codec = resolve_codec(out / "raw", out / "prep", cfg, load_preset(cfg.preset))
        fit_s = time.perf_counter() - t0
        s = prepare(out / "raw", out / "prep", cfg)
        raw_files = sorted(str(p) for p in (out / "raw").rglob("*.parquet"))
        ref_wall = in_process(raw_files, cfg, s.codec)

    # the Ray figure includes Ray start-up, actor construction and the Parquet write, not the codec fit
    result = {
        "command": command("data_pipeline"), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
        "items": s.items, "rejected": s.rejected,
        "audio_seconds": s.audio_seconds, "codec_fit_s": fit_s, "synth_items_per_second": synth.get("items_per_second"),
        "ray": {"wall_s": s.wall_seconds, "items_per_second": s.items_per_second,
                "audio_seconds_per_second": s.audio_seconds_per_second},
        "in_process": {"wall_s": ref_wall, "items_per_second": s.items / ref_wall,
                       "audio_seconds_per_second": s.audio_seconds / ref_wall},
        "data_config": asdict(cfg),
    }
    save_result("data_pipeline", result)
    print(f"corpus: {s.items} items, {s.audio_seconds / 60:.1f} min of audio ({s.rejected} rejected)")
    print(f"{'run':<34}{'wall s':>8}{'items/s':>10}{'audio s/s':>11}")
    print(f"{'Ray Data pipeline (incl. write)':<34}{s.wall_seconds:>8.1f}{s.items_per_second:>10.2f}"
          f"{s.audio_seconds_per_second:>11.1f}")
    print(f"{'same stages in-process (no Ray)':<34}{ref_wall:>8.1f}{s.items / ref_wall:>10.2f}"
          f"{s.audio_seconds / ref_wall:>11.1f}")
    print(f"ray / in-process throughput: {ref_wall / s.wall_seconds:.2f} (built-in codec fit, not timed above: "
          f"{fit_s:.1f} s)")
    print(f"audio_seconds_per_second={s.audio_seconds_per_second:.1f}")


if __name__ == "__main__":
    main()
