"""``deepomni data ...``: ``synth`` (the built-in espeak corpus) and ``import`` (LibriSpeech, JSONL
manifests), both writing raw-item shards ``<out>/raw/<split>/part-*.parquet``; ``prepare`` (Ray Data)
turning them into tokenized shards ``<out>/tokenized/split=<split>/status=ok|rejected/``."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from ..config import add_flags
from .schema import SPLITS, ShardWriter


SYNTH_OWN_FLAGS = ("sizes", "assistant_voice", "world")  # flags of their own below (--train, --assistant-voice)


def cmd_synth(args: argparse.Namespace) -> int:
    from ..config import flag_values, load_config
    from .espeak import Voice
    from .synth import SynthConfig, synthesize

    values = flag_values(args, SynthConfig, exclude=SYNTH_OWN_FLAGS)
    values["sizes"] = {"train": args.train, "validation": args.validation, "test": args.test}
    values["assistant_voice"] = Voice(args.assistant_voice, 160, 50)
    cfg = load_config(SynthConfig, None, values)
    synthesize(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"[synth] wrote {Path(args.out) / 'raw'} and {Path(args.out) / 'summary.json'}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .readers import read_jsonl_manifest, read_librispeech

    if args.librispeech:
        rows = read_librispeech(args.librispeech, args.split)
    else:
        rows = read_jsonl_manifest(args.manifest, args.split)
    t0 = time.perf_counter()
    writers: dict[str, ShardWriter] = {}
    counts: Counter = Counter()
    seconds = 0.0
    for row in rows:
        split = row["split"]
        if split not in writers:
            writers[split] = ShardWriter(Path(args.out) / "raw" / split, args.rows_per_shard, args.overwrite)
        writers[split].add(row)
        counts[(split, row["task"])] += 1
        seconds += (row["question_seconds"] or 0.0) + (row["answer_seconds"] or 0.0)
    for w in writers.values():
        w.close()
    for (split, task), n in sorted(counts.items()):
        print(f"[import] {split:<10} {task:<10} {n:>7} items")
    print(f"[import] {sum(counts.values())} items, {seconds / 3600:.3f} h audio, {time.perf_counter() - t0:.1f} s "
          f"-> {Path(args.out) / 'raw'}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from ..config import DataConfig, flag_values, load_config
    from .pipeline import prepare

    cfg = load_config(DataConfig, args.config, flag_values(args, DataConfig))
    raw = Path(args.raw) if args.raw else Path(args.out) / "raw"
    s = prepare(raw, args.out, cfg)
    for key, tasks in sorted(s.per_split_task.items()):
        print(f"[prepare] {key:<22} " + " ".join(f"{t}={n}" for t, n in sorted(tasks.items())))
    print(f"[prepare] {s.items} items ({s.rejected} rejected), {s.audio_seconds / 60:.1f} min audio in "
          f"{s.wall_seconds:.1f} s: {s.items_per_second:.1f} items/s, {s.audio_seconds_per_second:.1f} audio s/s")
    print(f"[prepare] codec {s.codec} -> {s.out}")
    return 0


def _add_prepare_args(p: argparse.ArgumentParser) -> None:
    from ..config import DataConfig, add_flags, list_presets

    p.add_argument("--out", required=True, help="output directory (tokenized/, codec/, prepare_summary.json)")
    p.add_argument("--raw", help="raw-item shards (default: <out>/raw)")
    p.add_argument("--config", default="tiny", help=f"DataConfig: a preset ({', '.join(list_presets('data'))}) "
                                                    f"or a JSON/YAML file; the flags below override it")
    add_flags(p, DataConfig)


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data synth`` and ``data import`` under the top-level ``deepomni`` parser."""
    data = subparsers.add_parser("data", help="build datasets (synth, import, prepare)")
    sub = data.add_subparsers(dest="data_cmd", required=True)

    s = sub.add_parser("synth", help="synthesize the built-in spoken corpus with espeak-ng",
                       description="Templated ASR / TTS / spoken QA / text QA items spoken by espeak-ng; splits "
                                   "share no template and no entity. See docs/data.md.")
    s.add_argument("--out", required=True, help="output directory (raw/<split>/part-*.parquet, summary.json)")
    for split, n in (("train", 200), ("validation", 50), ("test", 50)):
        s.add_argument(f"--{split}", type=int, default=n, help=f"items in the {split} split (default {n})")
    s.add_argument("--assistant-voice", default="en-us", help="espeak-ng voice of every spoken answer")
    s.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    s.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    from .synth import SynthConfig

    add_flags(s, SynthConfig, exclude=SYNTH_OWN_FLAGS)
    s.set_defaults(fn=cmd_synth)

    i = sub.add_parser("import", help="import LibriSpeech or a JSONL manifest as raw-item shards")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--librispeech", help="a LibriSpeech subset directory (<speaker>/<chapter>/...)")
    src.add_argument("--manifest", help="a JSONL manifest (fields: audio, text, task, answer_text, ...)")
    i.add_argument("--out", required=True, help="output directory (raw/<split>/part-*.parquet)")
    i.add_argument("--split", default="train", choices=SPLITS, help="split of the rows (a manifest line may override)")
    i.add_argument("--rows-per-shard", type=int, default=1000)
    i.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    i.set_defaults(fn=cmd_import)

    pr = sub.add_parser("prepare", help="tokenize raw items on Ray Data (features, codec, sequences)")
    _add_prepare_args(pr)
    pr.set_defaults(fn=cmd_prepare)
