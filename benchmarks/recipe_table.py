"""The paper's forgetting table at toy scale: the recipe and every baseline, several seeds, mean and spread.

    python -m benchmarks.recipe_table                      # seeds 0 1 2, the full recipe and every baseline
    python -m benchmarks.recipe_table --seeds 0 1 2 3 4 --out runs/recipe_table
    python -m benchmarks.recipe_table --baselines full_finetune --steps-scale 0.5 --eval-items 20   # the demo's size
    python -m benchmarks.recipe_table --out runs/recipe_table26 --eval-items 60 --baselines random_assignment \
        difference_assignment moextend lora dpo full_finetune speech_finetune     # issue 26's table

Each seed is one whole `jobs.pipeline` run (its own corpus, models and random assignment, all drawn from the
seed) under ``<out>/seed<k>``; finished steps are skipped, so an interrupted run continues. Prints and saves
the table (mean +- sample standard deviation over seeds; the per-seed figures are in the JSON), the goals of
issues 11 and 26 checked against it, paired per-item differences between models (:data:`COMPARISONS`: each
model's items.jsonl, item by item, with bootstrap and over-seed intervals), the command and the wall time:

    benchmarks/results/recipe_table.json, benchmarks/results/recipe_table.md

Not part of CI. On 2 cores, from the shipped foundations: three seeds at the demo's size with the
full_finetune and paper_stages baselines took 29.1 min (seed 0 reusing `make demo`'s run); issue 26's table
(every baseline at full steps, 60 held-out items a task) 120 min, 36-45 min a seed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from benchmarks.harness import RESULTS, command, machine, parser
from deepomni.train.config import SPEECH_EXPERTS
from deepomni.train.recipe import COLUMNS, Pipeline, PipelineConfig
from deepomni.train.stages import BASELINES, MODELS


def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def aggregate(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """model -> metric -> {"mean", "std", "n"} over seeds."""
    out: dict[str, dict[str, dict]] = {}
    for model in MODELS:
        out[model] = {}
        for _, key in COLUMNS:
            vals = [per_seed[s][model].get(key) for s in per_seed if model in per_seed[s]]
            m, sd = mean_std(vals)
            out[model][key] = {"mean": m, "std": sd, "n": sum(v is not None for v in vals)}
    return out


def markdown(agg: dict[str, dict[str, dict]], seeds: list[int]) -> str:
    def cell(v: dict) -> str:
        return "-" if v["mean"] is None else f"{v['mean']:.3f} ± {v['std']:.3f}"

    lines = [f"mean ± sample std over seeds {seeds}", "",
             "| model | " + " | ".join(c for c, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for model, cols in agg.items():
        if not any(v["n"] for v in cols.values()):
            continue  # a baseline not run (--baselines)
        lines.append(f"| {model} | " + " | ".join(cell(cols[k]) for _, k in COLUMNS) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- paired per-item comparison
# per-item scores the paired comparisons read from each model's eval/<model>/items.jsonl: (task, score of a record)
ITEM_SCORES = {
    "text_qa_accuracy": ("text_qa", lambda r: float(r["correct"])),
    "spoken_qa_accuracy": ("spoken_qa", lambda r: float(r["correct"])),
    "tts_consistency_wer": (None, lambda r: _consistency_wer(r)),  # every item with judged speech and text
}


def _consistency_wer(r: dict) -> float | None:
    from deepomni.train.evaluate import word_edits
    from deepomni.train.judge import normalize

    if "heard" not in r or not normalize(r["prediction"]):
        return None
    edits, words = word_edits(r["prediction"], r["heard"])
    return edits / words


def item_scores(eval_dir: Path, metric: str) -> dict[str, float]:
    """``{item id: score}`` of one evaluated model on ``metric`` (:data:`ITEM_SCORES`)."""
    task, score = ITEM_SCORES[metric]
    out = {}
    for line in (eval_dir / "items.jsonl").read_text().splitlines():
        r = json.loads(line)
        if task is None or r["task"] == task:
            v = score(r)
            if v is not None:
                out[f"{r['task']}/{r['id']}"] = v
    return out


def paired(out: Path, seeds: list[int], a: str, b: str, metric: str, resamples: int = 10000) -> dict | None:
    """Model ``a`` minus model ``b`` on ``metric``, item by item on the items both scored, over seeds: the mean
    difference, a 95% interval from a bootstrap that resamples items within each seed (each seed keeps its
    items' count; the seeds' own training noise is in the per-seed means, and in a t-interval over them),
    the per-seed means and the number of pairs. None where the models were not evaluated."""
    import random

    diffs: dict[int, list[float]] = {}
    for seed in seeds:
        ev = out / f"seed{seed}" / "eval"
        if not ((ev / a / "items.jsonl").is_file() and (ev / b / "items.jsonl").is_file()):
            continue
        sa, sb = item_scores(ev / a, metric), item_scores(ev / b, metric)
        diffs[seed] = [sa[i] - sb[i] for i in sorted(sa.keys() & sb.keys())]
    if not diffs or not any(diffs.values()):
        return None
    rng = random.Random(0)
    pooled = [d for ds in diffs.values() for d in ds]
    boots = []
    for _ in range(resamples):
        tot = n = 0
        for ds in diffs.values():
            tot += sum(rng.choice(ds) for _ in ds) if ds else 0
            n += len(ds)
        boots.append(tot / n)
    boots.sort()
    per_seed = {s: sum(ds) / len(ds) for s, ds in diffs.items() if ds}
    m_seed, sd_seed = mean_std(list(per_seed.values()))
    t95 = {1: float("nan"), 2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(per_seed), 2.0)
    half = t95 * (sd_seed or 0.0) / math.sqrt(len(per_seed)) if len(per_seed) > 1 else float("nan")
    return {"a": a, "b": b, "metric": metric, "mean": sum(pooled) / len(pooled), "n": len(pooled),
            "ci95_items": [boots[int(0.025 * resamples)], boots[int(0.975 * resamples) - 1]],
            "per_seed": per_seed, "ci95_seeds": [m_seed - half, m_seed + half]}


# the paired comparisons the report makes (a, b, metric): what load-based assignment, DPO, MoExtend and LoRA
# change, each against its reference
COMPARISONS = [("deeptalk", "random_assignment", "text_qa_accuracy"),
               ("deeptalk", "random_assignment", "spoken_qa_accuracy"),
               ("deeptalk", "random_assignment", "tts_consistency_wer"),
               ("difference_assignment", "random_assignment", "text_qa_accuracy"),
               ("difference_assignment", "deeptalk", "text_qa_accuracy"),
               ("difference_assignment", "random_assignment", "spoken_qa_accuracy"),
               ("deeptalk_dpo", "deeptalk", "tts_consistency_wer"),
               ("deeptalk_dpo", "deeptalk", "text_qa_accuracy"),
               ("deeptalk", "moextend", "text_qa_accuracy"),
               ("deeptalk", "lora", "text_qa_accuracy")]


def paired_markdown(rows: list[dict]) -> str:
    lines = ["| a - b | metric | mean difference | 95% interval (items within seeds) | per seed | 95% interval "
             "(t over seeds) | pairs |", "|---|---|---|---|---|---|---|"]
    for p in rows:
        seeds = ", ".join(f"{v:+.3f}" for v in p["per_seed"].values())
        lines.append(f"| {p['a']} - {p['b']} | {p['metric']} | {p['mean']:+.3f} | [{p['ci95_items'][0]:+.3f}, "
                     f"{p['ci95_items'][1]:+.3f}] | {seeds} | [{p['ci95_seeds'][0]:+.3f}, {p['ci95_seeds'][1]:+.3f}] "
                     f"| {p['n']} |")
    return "\n".join(lines)


def goals(agg: dict[str, dict[str, dict]]) -> list[dict]:
    """Issue 11's goals, each with the figures it compares and whether it is met (means over seeds; a
    difference counts only when it exceeds the larger of the two spreads)."""
    def g(model: str, key: str) -> tuple[float | None, float]:
        v = agg[model][key]
        return v["mean"], v["std"] or 0.0

    out = []

    def add(name: str, met: bool | None, **figures) -> None:
        out.append({"goal": name, "met": met, **{k: None if v is None else round(v, 4) for k, v in figures.items()}})

    base, _ = g("base", "text_qa_accuracy")
    add("base text score >= 0.5", None if base is None else base >= 0.5, base=base)
    drop, drop_sd = g("deeptalk", "text_drop")
    ff, ff_sd = g("full_finetune", "text_drop")
    sp, _ = g("speech_finetune", "text_drop")
    add("recipe relative text drop <= 0.055", None if drop is None else drop <= 0.055, recipe=drop)
    add("recipe drop below compute-matched full fine-tune by more than the spread",
        None if None in (drop, ff) else ff - drop > max(drop_sd, ff_sd), recipe=drop, full_finetune=ff,
        spread=max(drop_sd, ff_sd))
    add("speech-only full fine-tune drops >= 0.20", None if sp is None else sp >= 0.20, speech_finetune=sp)
    rnd, rnd_sd = g("random_assignment", "text_drop")
    sq, sq_sd = g("deeptalk", "spoken_qa_accuracy")
    rsq, rsq_sd = g("random_assignment", "spoken_qa_accuracy")
    add("load-based beats random assignment by more than the spread (text drop or spoken QA)",
        None if None in (drop, rnd, sq, rsq) else (rnd - drop > max(drop_sd, rnd_sd) or sq - rsq > max(sq_sd, rsq_sd)),
        text_drop_load=drop, text_drop_random=rnd, spoken_qa_load=sq, spoken_qa_random=rsq)
    for other in ("moextend", "lora"):  # issue 26: the text drop against the other ways of adding speech
        od, od_sd = g(other, "text_drop")
        osq, _ = g(other, "spoken_qa_accuracy")
        oca, _ = g(other, "codec_accuracy")
        ca, _ = g("deeptalk", "codec_accuracy")
        add(f"recipe drop below {other}'s by more than the spread (speech ability beside it)",
            None if None in (drop, od) else od - drop > max(drop_sd, od_sd), recipe=drop, **{other: od},
            spread=max(drop_sd, od_sd), spoken_qa_recipe=sq, **{f"spoken_qa_{other}": osq},
            codec_acc_recipe=ca, **{f"codec_acc_{other}": oca})
    tts, tts_sd = g("deeptalk", "tts_consistency_wer")
    dtts, dtts_sd = g("deeptalk_dpo", "tts_consistency_wer")
    ddrop, ddrop_sd = g("deeptalk_dpo", "text_drop")
    add("DPO lowers TTS-consistency WER beyond the spread, text drop not raised beyond it",
        None if None in (tts, dtts, drop, ddrop) else
        (tts - dtts > max(tts_sd, dtts_sd) and ddrop - drop <= max(drop_sd, ddrop_sd)),
        tts_recipe=tts, tts_dpo=dtts, drop_recipe=drop, drop_dpo=ddrop)
    asr, _ = g("deeptalk", "asr_wer")
    add("ASR WER <= 0.3", None if asr is None else asr <= 0.3, asr_wer=asr)
    text, _ = g("deeptalk", "spoken_qa_typed_accuracy")
    add("spoken-QA exact >= half the text-QA exact on the same questions", None if None in (sq, text) else sq >= text / 2,
        spoken=sq, same_questions_typed=text)
    floor, _ = g("deeptalk", "judge_floor_wer")
    add("TTS-consistency WER within 0.15 of the judge's floor", None if None in (tts, floor) else tts - floor <= 0.15,
        tts_consistency=tts, judge_floor=floor)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = parser("recipe_table", __doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/recipe_table", help="working directory (one pipeline per seed)")
    ap.add_argument("--config", default="small", help="training preset or TrainConfig file")
    ap.add_argument("--foundations", default="small", help="foundation set (name or directory) every seed starts "
                                                           "from; none: each seed pretrains its own encoder and base")
    ap.add_argument("--train-items", type=int, default=1500)
    ap.add_argument("--eval-items", type=int, default=40)
    ap.add_argument("--steps-scale", type=float, default=1.0)
    ap.add_argument("--n-speech", default=SPEECH_EXPERTS)
    ap.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=list(BASELINES),
                    help="baselines run beside the recipe (default: all)")
    ap.add_argument("--results", default=str(RESULTS / "recipe_table"), help="where to save .json and .md")
    args = ap.parse_args(argv)

    from deepomni.ray_env import init_ray

    init_ray()
    t0 = time.perf_counter()
    per_seed, walls = {}, {}
    for seed in args.seeds:
        ts = time.perf_counter()
        pipe = Pipeline(PipelineConfig(out=str(Path(args.out) / f"seed{seed}"), config=args.config, seed=seed,
                                       steps_scale=args.steps_scale, n_speech=args.n_speech,
                                       train_items=args.train_items, eval_items=args.eval_items,
                                       foundations=args.foundations))
        pipe.prepare_data()
        pipe.train_all(tuple(args.baselines))
        per_seed[seed] = pipe.evaluate_all(pipe.models(tuple(args.baselines)))
        walls[seed] = round(time.perf_counter() - ts, 1)
        print(f"[recipe_table] seed {seed}: {walls[seed]:.0f} s\n{Pipeline.table(per_seed[seed])}", flush=True)
    wall = time.perf_counter() - t0
    agg = aggregate(per_seed)
    table = markdown(agg, args.seeds)
    checked = goals(agg)
    pairs = [p for p in (paired(Path(args.out).resolve(), args.seeds, *c) for c in COMPARISONS) if p is not None]
    result = {"command": command("recipe_table", argv), "seeds": args.seeds, "wall_seconds": round(wall, 1),
              "wall_seconds_per_seed": walls, "machine": machine(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("results", "out")},
              "per_seed": {str(s): m for s, m in per_seed.items()}, "aggregate": agg, "goals": checked,
              "paired": pairs}
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# Recipe table (`{result['command']}`)", "", table, "",
             "| goal | met | figures |", "|---|---|---|"]
    for c in checked:
        figs = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("goal", "met"))
        lines.append(f"| {c['goal']} | {c['met']} | {figs} |")
    if pairs:
        lines += ["", "Paired per-item differences (a - b; for WER lower is better, so a negative difference "
                  "favours a):", "", paired_markdown(pairs)]
    lines += ["", f"wall time {wall:.0f} s ({wall / 60:.1f} min) for {len(args.seeds)} seeds"]
    res.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
