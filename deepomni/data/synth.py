"""The built-in spoken corpus: items from :mod:`deepomni.data.content`, spoken by espeak-ng, written as
raw-item shards ``<out>/raw/<split>/part-*.parquet`` plus ``<out>/summary.json``.

Two steps, so the output is a pure function of the config:
1. plan (main process, pure Python): per split, the task of every item (exact mixture quotas, shuffled),
   then per item an rng seeded by ``(seed, split, index)`` picks the content, the input modality
   (spoken_qa: speech or text at random, the paper's random input modality) and the question's voice,
   speed and pitch;
2. render (``workers`` threads, each running espeak-ng child processes): espeak-ng -> 16 kHz -> FLAC.
   espeak is deterministic, so the same seed gives byte-identical shards whatever the number of workers.

Questions are spoken by many voices (accents, male/female variants, speeds, pitches) so the model does not
learn one speaker; spoken answers use one fixed *assistant* voice, because the model's own voice should be
consistent and codec targets in one voice are easier for a small model to learn.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..config import configclass
from . import content
from .espeak import Voice, check_voices, encode_flac, speak, SAMPLE_RATE
from .schema import ASR, SPEECH, SPLITS, SPOKEN_QA, TASKS, TEXT, TEXT_QA, TTS, ShardWriter

# every entry checked to give distinct samples with espeak-ng 1.51+ (variants on "en-gb" are ignored,
# hence "en+f3"); f* are female variants, m* male
DEFAULT_VOICES = ("en-us", "en-us+f2", "en-us+f4", "en-us+m3", "en", "en+f3", "en-gb-scotland", "en-gb-scotland+f2",
                  "en-gb-x-rp+f4", "en-029", "en-us-nyc+m2", "en-gb-x-gbcwmd+f1")
DEFAULT_TASK_MIX = {ASR: 0.3, SPOKEN_QA: 0.3, TTS: 0.1, TEXT_QA: 0.3}
# the knowledge families only: the text ability the base learns and the recipe must keep (content.py);
# the skill families (repeat, spell, letter, count) can be mixed in by name
DEFAULT_FAMILY_MIX = {"arith": 0.25, "fact_town": 0.15, "fact_job": 0.15, "fact_pet": 0.15, "next": 0.15,
                      "opposite": 0.15}


@configclass()
class SynthConfig:
    """What to synthesize. Sizes are items per split; mixes are relative weights (normalised)."""

    seed: int = 0  # same seed -> byte-identical shards
    # the world and the split pools (people, towns, templates, each fact's held-out phrasings); None: seed.
    # A pretrained base knows one world (its foundation set's world_seed), so corpora of other seeds that
    # test it keep that world and draw only their items anew
    world_seed: int | None = None
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 200, "validation": 50, "test": 50})
    task_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_MIX))
    family_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FAMILY_MIX))  # for spoken_qa, text_qa
    world: content.WorldConfig = field(default_factory=content.WorldConfig)  # what the knowledge questions ask
    voices: tuple[str, ...] = DEFAULT_VOICES  # question voices, drawn per item
    speed_range: tuple[int, int] = (140, 190)  # words per minute, drawn per item (espeak default 175)
    pitch_range: tuple[int, int] = (30, 70)  # 0..99, drawn per item
    assistant_voice: Voice = Voice("en-us", 160, 50)  # every spoken answer (tts, spoken_qa)
    speech_input_prob: float = 0.5  # spoken_qa: probability that the question is speech rather than text
    rows_per_shard: int = 500  # rows per Parquet shard
    workers: int = 2  # parallel espeak-ng processes

    def __post_init__(self) -> None:
        mixes = (("task_mix", self.task_mix, TASKS), ("family_mix", self.family_mix, content.QA_FAMILIES))
        for name, mix, known in mixes:
            unknown = set(mix) - set(known)
            if unknown or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
                raise ValueError(f"{name} {mix} must give non-negative weights to names in {list(known)}")
        unknown = set(self.sizes) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)} in sizes; expected {list(SPLITS)}")
        if not self.voices:
            raise ValueError("need at least one voice")


# -------------------------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class Job:
    """One item to render: its row without audio, and what espeak should say in which voice."""

    row: dict[str, Any]
    question: tuple[str, Voice] | None
    answer: tuple[str, Voice] | None


def task_quotas(n: int, mix: dict[str, float]) -> list[str]:
    """Exactly ``n`` task names in the mixture's proportions (largest remainder), every weighted task at
    least once when ``n`` allows, so even a 12-item corpus has all tasks."""
    total = sum(mix.values())
    tasks = [t for t in TASKS if mix.get(t, 0) > 0]
    exact = {t: n * mix[t] / total for t in tasks}
    counts = {t: int(exact[t]) for t in tasks}
    for t in sorted(tasks, key=lambda t: counts[t] - exact[t])[: n - sum(counts.values())]:
        counts[t] += 1
    if n >= len(tasks):
        for t in tasks:
            if counts[t] == 0:
                counts[max(counts, key=counts.get)] -= 1
                counts[t] = 1
    return [t for t in tasks for _ in range(counts[t])]


def weighted(rng: random.Random, mix: dict[str, float]) -> str:
    """One name of ``mix`` drawn by its weight (one ``rng.random()`` call; zero weights never drawn)."""
    names = sorted(mix)
    return rng.choices(names, weights=[mix[k] for k in names])[0]


class _FactCycle:
    """Each knowledge family's facts in a seeded shuffled order, reshuffled every pass: a split with n items
    of a family covers min(n, facts) distinct facts, and every fact comes back before any repeats."""

    def __init__(self, world: content.World, split: str, seed: int):
        self.world, self.split, self.seed = world, split, seed
        self.queue: dict[str, list[str]] = {}
        self.passes: dict[str, int] = {}

    def next(self, family: str) -> str:
        if not self.queue.get(family):
            k = self.passes[family] = self.passes.get(family, -1) + 1
            order = list(self.world.facts[family])
            random.Random(f"deepomni-synth/{self.seed}/{self.split}/{family}/pass{k}").shuffle(order)
            self.queue[family] = order
        return self.queue[family].pop()


def plan_item(cfg: SynthConfig, pools: content.SplitPools, task: str, index: int,
              world: content.World, facts: _FactCycle, world_seed: int) -> Job:
    rng = random.Random(f"deepomni-synth/{cfg.seed}/{pools.split}/{index}")
    if task in (ASR, TTS):
        item = content.sentence(pools, rng)
        answer_text = content.transcript(item.answer_text) if task == ASR else item.answer_text
    else:
        family = weighted(rng, cfg.family_mix)
        if family in content.KNOWLEDGE_FAMILIES:
            item = content.knowledge_item(world, family, facts.next(family), pools.split, rng, world_seed)
        else:
            item = content.skill_item(pools, family, rng)
        answer_text = item.answer_text
    speech_in = task == ASR or (task == SPOKEN_QA and rng.random() < cfg.speech_input_prob)
    q_voice = None
    if speech_in:
        q_voice = Voice(rng.choice(cfg.voices), rng.randint(*cfg.speed_range), rng.randint(*cfg.pitch_range))
    a_voice = cfg.assistant_voice if task in (TTS, SPOKEN_QA) else None
    meta = {"source": "synth", "seed": cfg.seed, "family": item.family, "template": item.template,
            "entities": list(item.entities), "question_voice": q_voice and q_voice.to_dict(),
            "answer_voice": a_voice and a_voice.to_dict()}
    row = {"id": f"synth-s{cfg.seed}-{pools.split}-{index:06d}", "split": pools.split, "task": task,
           "input_modality": SPEECH if speech_in else TEXT, "question_text": item.question_text,
           "answer_text": answer_text, "meta": json.dumps(meta, sort_keys=True)}
    return Job(row,
               (item.question_speak or item.question_text, q_voice) if q_voice else None,
               (item.answer_speak or item.answer_text, a_voice) if a_voice else None)


def plan(cfg: SynthConfig) -> dict[str, list[Job]]:
    world_seed = cfg.seed if cfg.world_seed is None else cfg.world_seed
    pools, world = content.pools_and_world(world_seed, cfg.world)
    jobs = {}
    for split in SPLITS:
        n = cfg.sizes.get(split, 0)
        tasks = task_quotas(n, cfg.task_mix)
        random.Random(f"deepomni-synth/{cfg.seed}/{split}/tasks").shuffle(tasks)
        facts = _FactCycle(world, split, cfg.seed)
        jobs[split] = [plan_item(cfg, pools[split], t, i, world, facts, world_seed) for i, t in enumerate(tasks)]
    return jobs


# ------------------------------------------------------------------------------------------ render

def render(job: Job) -> dict[str, Any]:
    """The job's row with its audio columns filled (runs in a worker thread)."""
    row = dict(job.row, question_audio=None, question_seconds=None, answer_audio=None, answer_seconds=None)
    for side, spec in (("question", job.question), ("answer", job.answer)):
        if spec is not None:
            x_T = speak(*spec)
            row[f"{side}_audio"] = encode_flac(x_T)
            row[f"{side}_seconds"] = len(x_T) / SAMPLE_RATE
    return row


def synthesize(cfg: SynthConfig, out_dir: str | Path, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Plan, render and write the corpus; returns (and writes to ``out_dir/summary.json``) a summary:
    items per split and task, audio hours per split, wall time, items per second."""
    t0 = time.perf_counter()
    check_voices(list(cfg.voices) + [cfg.assistant_voice.name])
    out = Path(out_dir)
    jobs = plan(cfg)
    total = sum(len(j) for j in jobs.values())
    counts: dict[str, Counter] = {s: Counter() for s in SPLITS}
    seconds: dict[str, float] = {s: 0.0 for s in SPLITS}
    # every split's directory is checked (and cleared with overwrite) before any work
    writers = {s: ShardWriter(out / "raw" / s, cfg.rows_per_shard, overwrite) for s in SPLITS}
    # threads suffice: ~85% of an item's time is the espeak-ng child process, the rest mostly GIL-free C
    pool = ThreadPoolExecutor(cfg.workers) if cfg.workers > 1 else None
    try:
        with tqdm(total=total, desc="synth", unit="item", disable=not progress) as bar:
            for split in SPLITS:
                rows = pool.map(render, jobs[split]) if pool else map(render, jobs[split])
                for row in rows:
                    writers[split].add(row)
                    counts[split][row["task"]] += 1
                    seconds[split] += (row["question_seconds"] or 0.0) + (row["answer_seconds"] or 0.0)
                    bar.update()
                writers[split].close()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    wall = time.perf_counter() - t0
    summary = {
        "items": {s: dict(sorted(counts[s].items())) for s in SPLITS},
        "audio_hours": {s: round(seconds[s] / 3600, 4) for s in SPLITS},
        "audio_seconds_per_item": round(sum(seconds.values()) / max(total, 1), 3),
        "wall_seconds": round(wall, 2),
        "items_per_second": round(total / wall, 2) if wall > 0 else None,
        "config": _config_dict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if progress:
        print(format_summary(summary))
    return summary


def _config_dict(cfg: SynthConfig) -> dict[str, Any]:
    d = asdict(cfg)  # (the world's size is in d["world"])
    d["voices"] = list(cfg.voices)
    return d


def format_summary(summary: dict[str, Any]) -> str:
    lines = []
    for s in SPLITS:
        items = summary["items"][s]
        tasks = " ".join(f"{t}={n}" for t, n in items.items())
        lines.append(f"[synth] {s:<10} {sum(items.values()):>6} items ({tasks}), "
                     f"{summary['audio_hours'][s]:.3f} h audio")
    lines.append(f"[synth] {summary['wall_seconds']:.1f} s wall, {summary['items_per_second']} items/s, "
                 f"{summary['audio_seconds_per_item']:.2f} s audio per item")
    return "\n".join(lines)
