"""The speech encoder's pretraining corpus: hours of (audio, transcript) pairs in hundreds of voices, as
raw ``asr`` shards (``<out>/raw/{train,test}``) that :func:`deepomni.train.encoder.pretrain_encoder` reads.

A real run's Whisper has heard 680k hours of many speakers saying everything. Ours hears, per utterance:

* **words**: one of three kinds of text (``text_mix``):
  ``corpus``: the built-in corpus's own train-split sentences, questions and answers (content.py),
  ``words``: 3-9 random words of the CMU pronouncing dictionary that pocketsphinx ships (134k English words:
  the vocabulary a real encoder knows beyond our small world),
  ``names``: invented people and towns (lexicon.py's generator, another seed) in carrier phrases, never a
  name of the corpus's validation or test pools;
* **a voice** (:func:`deepomni.data.voices.english_voices`: every espeak-ng accent x variant, flite's and
  festival's voices), drawn engine first (``engine_mix``) so the few flite and festival voices are not
  drowned by espeak's 777, at a random speed and pitch;
* **light noise**: white noise at a random SNR on half of the utterances.

The test split holds out **whole voices** (``held_out``: an accent of espeak-ng with all its variants, a flite
voice, a festival voice) and the corpus's *test* sentences (unseen templates and invented names): WER there
is what the encoder does on speakers and sentences it never heard. Everything is drawn from
``(seed, split, index)``, so the same seed gives the same shards.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..config import configclass
from ..data import content
from ..data import lexicon as lx
from ..data.schema import ASR, SPEECH, ShardWriter
from ..data.synth import weighted
from ..data.voices import SAMPLE_RATE, Voice, encode_flac, english_voices, speak

TEXT_KINDS = ("corpus", "words", "names")


@configclass()
class SpeechCorpusConfig:
    """How much speech, in which voices and conditions."""

    seed: int = 0
    world_seed: int = 0  # the corpus pools and world whose train part is read and whose test part is held out
    train_utterances: int = 5000  # ~3 h at ~2.2 s an utterance
    test_utterances_per_voice: int = 30  # per held-out voice group (see held_out)
    # held-out voices, as glob patterns over Voice.key ("engine/name"); each pattern is one test group
    held_out: tuple[str, ...] = ("espeak-ng/en-gb-x-gbclan*", "flite/rms", "festival/kal_diphone")
    engine_mix: dict[str, float] = field(default_factory=lambda: {"espeak-ng": 0.75, "flite": 0.17, "festival": 0.08})
    text_mix: dict[str, float] = field(default_factory=lambda: {"corpus": 0.45, "words": 0.3, "names": 0.25})
    speed_range: tuple[int, int] = (130, 200)  # words per minute
    pitch_range: tuple[int, int] = (25, 75)  # 0..99
    noise_prob: float = 0.5  # share of utterances with white noise added
    snr_db_range: tuple[float, float] = (15.0, 40.0)
    workers: int = 2  # parallel synthesizer processes
    rows_per_shard: int = 1000

    def __post_init__(self) -> None:
        for name, mix, known in (("text_mix", self.text_mix, TEXT_KINDS), ("engine_mix", self.engine_mix, None)):
            if not mix or any(w < 0 for w in mix.values()) or (known and set(mix) - set(known)):
                raise ValueError(f"{name} {mix} must give non-negative weights to names in {known or 'ENGINES'}")


# --------------------------------------------------------------------------------------------- voices

def split_voices(cfg: SpeechCorpusConfig, voices: tuple[Voice, ...] | None = None
                 ) -> tuple[list[Voice], dict[str, list[Voice]]]:
    """(training voices, held-out pattern -> its voices). A pattern matching no installed voice is an error:
    the test would silently lose a group."""
    voices = english_voices() if voices is None else voices
    held = {p: [v for v in voices if fnmatch(v.key, p)] for p in cfg.held_out}
    empty = [p for p, vs in held.items() if not vs]
    if empty:
        raise ValueError(f"held-out voice pattern(s) {empty} match no installed voice "
                         f"(engines here: {sorted({v.engine for v in voices})})")
    out = {v for vs in held.values() for v in vs}
    return [v for v in voices if v not in out], held


# ---------------------------------------------------------------------------------------------- texts

def dictionary_words() -> list[str]:
    """The CMU pronouncing dictionary's plain words (letters and apostrophes, 2-12 letters), sorted."""
    import pocketsphinx

    path = Path(pocketsphinx.__file__).parent / "model" / "en-us" / "cmudict-en-us.dict"
    words = set()
    for line in path.read_text(errors="replace").splitlines():
        w = line.split(" ", 1)[0]
        if "(" not in w and 2 <= len(w) <= 12 and all(c.isalpha() or c == "'" for c in w) and w[0].isalpha():
            words.add(w.lower())
    return sorted(words)


class Texts:
    """Draws the three kinds of text; the test split reads the corpus's test sentences only."""

    def __init__(self, cfg: SpeechCorpusConfig):
        self.cfg = cfg
        self.pools, self.world = content.pools_and_world(cfg.world_seed)
        self.words = dictionary_words()
        held = {n for s in ("validation", "test") for n in self.pools[s].people + self.pools[s].towns}
        held_words = {w for n in held for w in n.split()}
        rng = random.Random(f"deepomni-encoder-names-{cfg.seed}")
        people, towns = lx.invented_names(rng, 3000, 1500)
        self.people = [p for p in people if p not in held and not set(p.split()) & held_words]
        self.towns = [t for t in towns if t not in held]

    def corpus(self, rng: random.Random) -> str:
        r = rng.random()
        train = self.pools["train"]
        if r < 0.5:
            return content.sentence(train, rng).question_text
        if r < 0.8:
            family = rng.choice(content.KNOWLEDGE_FAMILIES)
            fact = rng.choice(self.world.facts[family])
            item = content.knowledge_item(self.world, family, fact, "train", rng, self.cfg.world_seed)
            return item.question_text if rng.random() < 0.7 else item.answer_text
        item = content.skill_item(train, rng.choice(content.SKILL_FAMILIES), rng)
        return item.question_text

    def random_words(self, rng: random.Random) -> str:
        return " ".join(rng.choice(self.words) for _ in range(rng.randint(3, 9)))

    def names(self, rng: random.Random) -> str:
        person, town = rng.choice(self.people), rng.choice(self.towns)
        carriers = ("{p} lives in {t}.", "{p} went to {t} on {d}.", "Ask {p} about {t}.", "{p} and {q} met in {t}.",
                    "The road from {t} to {u} is long.", "{p} wrote to {q} from {t}.", "Is {p} still in {t}?")
        return rng.choice(carriers).format(p=person, q=rng.choice(self.people), t=town, u=rng.choice(self.towns),
                                           d=rng.choice(lx.DAYS))

    def draw(self, kind: str, rng: random.Random) -> str:
        return {"corpus": self.corpus, "words": self.random_words, "names": self.names}[kind](rng)


# ----------------------------------------------------------------------------------------------- plan

def plan(cfg: SpeechCorpusConfig, voices: tuple[Voice, ...] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every utterance to render: ``{"split", "index", "text", "kind", "voice", "snr_db"}``."""
    train_voices, held = split_voices(cfg, voices)
    by_engine = {e: [v for v in train_voices if v.engine == e] for e in cfg.engine_mix}
    engine_mix = {e: w for e, w in cfg.engine_mix.items() if by_engine.get(e)}
    texts = Texts(cfg)

    def draw_voice(rng: random.Random, pool: list[Voice]) -> Voice:
        v = rng.choice(pool)
        return Voice(v.name, rng.randint(*cfg.speed_range), rng.randint(*cfg.pitch_range), v.engine)

    def noise(rng: random.Random) -> float | None:
        return round(rng.uniform(*cfg.snr_db_range), 1) if rng.random() < cfg.noise_prob else None

    jobs: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for i in range(cfg.train_utterances):
        rng = random.Random(f"deepomni-encoder-corpus/{cfg.seed}/train/{i}")
        kind = weighted(rng, cfg.text_mix)
        voice = draw_voice(rng, by_engine[weighted(rng, engine_mix)])
        jobs["train"].append({"split": "train", "index": i, "text": texts.draw(kind, rng), "kind": kind,
                              "voice": voice, "snr_db": noise(rng), "group": None})
    i = 0
    for pattern, pool in held.items():
        for _ in range(cfg.test_utterances_per_voice):
            rng = random.Random(f"deepomni-encoder-corpus/{cfg.seed}/test/{i}")
            jobs["test"].append({"split": "test", "index": i, "text": content.sentence(texts.pools["test"], rng).question_text,
                                 "kind": "corpus", "voice": draw_voice(rng, pool), "snr_db": noise(rng), "group": pattern})
            i += 1
    return jobs


# --------------------------------------------------------------------------------------------- render

def add_noise(x_T: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White noise at ``snr_db`` below the utterance's mean power."""
    power = float(np.mean(x_T.astype(np.float64) ** 2)) or 1e-8
    return (x_T + rng.normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), x_T.shape)).astype(np.float32)


def render(job: dict[str, Any], seed: int) -> dict[str, Any]:
    x_T = speak(job["text"], job["voice"])
    if job["snr_db"] is not None:
        x_T = add_noise(x_T, job["snr_db"], np.random.default_rng([seed, job["index"], job["split"] == "test"]))
    meta = {"source": "encoder-corpus", "seed": seed, "kind": job["kind"], "question_voice": job["voice"].to_dict(),
            "voice_key": job["voice"].key, "snr_db": job["snr_db"], "held_out_group": job["group"]}
    return {"id": f"enc-s{seed}-{job['split']}-{job['index']:06d}", "split": job["split"], "task": ASR,
            "input_modality": SPEECH, "question_text": job["text"], "question_audio": encode_flac(x_T),
            "question_seconds": len(x_T) / SAMPLE_RATE, "answer_text": content.transcript(job["text"]),
            "answer_audio": None, "answer_seconds": None, "meta": json.dumps(meta, sort_keys=True)}


def synthesize_speech_corpus(cfg: SpeechCorpusConfig, out_dir: str | Path, progress: bool = True,
                             voices: tuple[Voice, ...] | None = None) -> dict[str, Any]:
    """Render the corpus to ``<out_dir>/raw/{train,test}``; returns (and writes to ``summary.json``) its
    summary: utterances, hours, voices, engines, held-out groups, wall time."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    jobs = plan(cfg, voices)
    summary: dict[str, Any] = {"utterances": {}, "audio_hours": {}, "voices": {}, "engines": {}}
    with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        with tqdm(total=sum(len(j) for j in jobs.values()), desc="speech corpus", unit="utt", disable=not progress) as bar:
            for split, split_jobs in jobs.items():
                writer = ShardWriter(out / "raw" / split, cfg.rows_per_shard, overwrite=True)
                seconds, engines, voice_names = 0.0, {}, set()
                for row in pool.map(lambda j: render(j, cfg.seed), split_jobs):
                    writer.add(row)
                    seconds += row["question_seconds"]
                    v = json.loads(row["meta"])["question_voice"]
                    engines[v["engine"]] = engines.get(v["engine"], 0) + 1
                    voice_names.add(f"{v['engine']}/{v['name']}")
                    bar.update()
                writer.close()
                summary["utterances"][split] = len(split_jobs)
                summary["audio_hours"][split] = round(seconds / 3600, 3)
                summary["voices"][split] = len(voice_names)
                summary["engines"][split] = dict(sorted(engines.items()))
    summary["held_out"] = list(cfg.held_out)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    summary["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary
