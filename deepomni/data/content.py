"""The words of the built-in corpus: a small *world* the base LLM learns, templates, entity pools split
by train/validation/test, and the item generators (text only; :mod:`deepomni.data.synth` adds the speech).

Two kinds of question, held out in two different ways:

* **Knowledge** (``KNOWLEDGE_FAMILIES``: where a person lives, their job and pet, arithmetic, what comes
  after a day / month / number, opposites) is closed-book recall of one fixed :class:`World`, shared by all
  splits: the base LLM learns it from text, and that is the text ability the recipe must not destroy
  (docs/paper.md "Evaluation": the paper measures the drop on benchmarks the base does well). What is held out is the
  *phrasing*: every fact has its own test template and validation template, which training never pairs
  with that fact (training asks it in the remaining templates, and asks other facts in the test template).
  So a test question is a known fact in an unseen wording: "Which town is home to Tobi Droostman?" after
  training on "Where does Tobi Droostman live?" and on "Which town is home to <someone else>?".
* **Sentences and skills** (asr / tts sentences; repeat, spell, letter, count): every template list and
  entity pool is partitioned (about 80/10/10, at least one per split), so a test sentence uses phrasings
  and entities (invented people and towns, objects, animals, jobs) that training never showed. Closed
  word classes (number words, days, months, letters) are shared, since the answers are made of them.

Each item's ``entities`` lists its keys (``person:Tobi Droostman``, ``fact:arith:7+5``, ...); knowledge
items also carry ``phrasing:<fact>@<template>``, which the tests check is never in two splits.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable

from . import lexicon as lx
from .schema import SPLITS

# ------------------------------------------------------------------------------------------ items


@dataclass(frozen=True)
class Item:
    """One example's text. ``*_speak`` is what espeak reads when it differs from the text (letters:
    espeak says "c a t" as "see uh tee", "C, A, T." as "see ay tee")."""

    family: str
    template: str  # template id, e.g. "arith.2"
    question_text: str
    answer_text: str
    entities: tuple[str, ...]
    question_speak: str | None = None
    answer_speak: str | None = None


# -------------------------------------------------------------------------------------- templates

# Each family's phrasings; ids are "<family>.<index>". Slots are filled by the family's generator.
TEMPLATES: dict[str, tuple[str, ...]] = {
    # sentences read for asr (speech -> transcript) and tts (text -> speech)
    "sentence": (
        "{person} moved to {town} last {day}.",
        "The {obj} on the table belongs to {person}.",
        "{person} found {a_obj} near the station in {town}.",
        "On {day} {person} will visit {town} with {a_animal}.",
        "{person} works as {a_job} in {town}.",
        "There are {num} houses on the main street of {town}.",
        "My friend {person} keeps {a_animal} and {a_obj}.",
        "We drove {num} miles from {town} to {town2}.",
        "{person} said the {obj} was very {adj}.",
        "In {month} the weather in {town} is {adj}.",
        "{person} and {person2} met in {town} in {month}.",
        "The {job} from {town} lost {a_obj} on {day}.",
        "Please bring {a_obj} to {person} before {day}.",
        "{person} counted {num} sheep before falling asleep in {town}.",
        "The train to {town} leaves at {num} past nine.",
        "{person} painted {a_obj} for the market in {town}.",
        "Every {day} the {job} feeds the {animal} in {town}.",
        "{person} is the only {job} in {town}.",
        "Last {month} {person} wrote a song about {a_animal}.",
        "It took {person} {num} minutes to find the {obj}.",
    ),
    "arith": (
        "What is {a} {op} {b}?",
        "How much is {a} {op} {b}?",
        "Calculate {a} {op} {b}.",
        "Tell me what {a} {op} {b} makes.",
        "What do you get from {a} {op} {b}?",
        "Work out {a} {op} {b}.",
    ),
    "fact_town": ("Where does {person} live?", "In which town does {person} live?", "What town is {person} from?",
                  "Where is the home of {person}?", "Which town is home to {person}?", "Where does {person} have a home?"),
    "fact_job": ("What does {person} do for a living?", "What is the job of {person}?", "What work does {person} do?",
                 "What is {person} by trade?", "What job does {person} have?", "How does {person} earn a living?"),
    "fact_pet": ("What pet does {person} have?", "Which animal does {person} keep?",
                 "What kind of pet does {person} own?", "What animal lives with {person}?",
                 "Does {person} have a pet, and what is it?", "Which pet belongs to {person}?"),
    "repeat": ("Say the word {w} {times}.", "Repeat the word {w} {times}.", "Please say {w} {times}.",
               "Can you say {w} {times}?", "Say {w}, {times}.", "I would like to hear {w} {times}."),
    "spell": ("Spell the word {w}.", "How do you spell {w}?", "Spell {w} for me.", "Spell {w} letter by letter.",
              "What are the letters of {w}?", "Can you spell {w}?"),
    "letter": ("What is the first letter of {w}?", "Which letter does {w} start with?",
               "What letter begins the word {w}?", "Tell me the first letter of {w}.",
               "Name the first letter in the word {w}.", "With which letter does {w} begin?"),
    "next": ("What comes after {x}?", "What follows {x}?", "Which one comes right after {x}?",
             "Tell me what comes after {x}.", "What is next after {x}?", "Name the one that follows {x}."),
    "opposite": ("What is the opposite of {w}?", "Give me the opposite of {w}.",
                 "What word means the opposite of {w}?", "Name the opposite of {w}.",
                 "What is the reverse of {w}?", "Tell me a word that means the opposite of {w}."),
    "count": ("Count from {a} to {b}.", "Please count from {a} up to {b}.", "List the numbers from {a} to {b}.",
              "Say the numbers from {a} to {b}.", "Count up from {a} to {b}.", "Can you count from {a} to {b}?"),
}
KNOWLEDGE_FAMILIES = ("arith", "fact_town", "fact_job", "fact_pet", "next", "opposite")  # closed-book, of the World
SKILL_FAMILIES = ("repeat", "spell", "letter", "count")  # held-out instances, from the split's pools
QA_FAMILIES = KNOWLEDGE_FAMILIES + SKILL_FAMILIES

_OPS = {"plus": ("+", lambda a, b: a + b), "minus": ("-", lambda a, b: a - b), "times": ("*", lambda a, b: a * b)}


# ---------------------------------------------------------------------------------- split partition

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
NUM_PEOPLE, NUM_TOWNS = 400, 160


def partition(items: list, rng: random.Random, fractions: tuple[float, ...] = SPLIT_FRACTIONS) -> list[list]:
    """Shuffle ``items`` and cut them into len(fractions) disjoint parts, each non-empty when there are
    at least as many items as parts (the held-out parts get at least one)."""
    items = list(items)
    rng.shuffle(items)
    n = len(items)
    sizes = [int(f * n) for f in fractions[1:]]
    if n >= len(fractions):
        sizes = [max(1, s) for s in sizes]
    cuts, start = [], n - sum(sizes)
    parts = [items[:start]]
    for s in sizes:
        parts.append(items[start:start + s])
        start += s
    return parts


@dataclass
class SplitPools:
    """What one split's sentences and skill questions draw from; no entity or template is in two splits."""

    split: str
    templates: dict[str, list[int]]  # family -> template indices (sentence and SKILL_FAMILIES)
    people: list[str]
    towns: list[str]
    objects: list[str]
    animals: list[str]
    jobs: list[str]
    opposites: list[tuple[str, str]]
    counts: list[tuple[int, int]]


@dataclass(frozen=True)
class WorldConfig:
    """How much the base LLM is asked to know (every fact is taught and tested)."""

    people: int = 16  # people in the knowledge table (each with a town, a job and a pet)
    arith_max: int = 4  # arithmetic facts: a plus b and a minus b (b <= a) for a, b in 0..arith_max
    count_to: int = 10  # "what comes after" numbers 0..count_to (days and months always)
    opposites: int = 12  # opposite pairs, asked both ways


@dataclass
class World:
    """The closed-book knowledge shared by every split: family -> facts, each fact -> (question slots,
    answer). People, towns, jobs and pets are drawn from the *train* pools, so held-out sentences never
    mention them."""

    facts: dict[str, list[str]]  # family -> fact keys, e.g. "Tobi Droostman", "plus:7:5", "Monday"
    slots: dict[str, dict[str, dict[str, str]]]  # family -> fact key -> template slot values
    answers: dict[str, dict[str, str]]  # family -> fact key -> answer text
    knowledge: dict[str, dict[str, str]]  # person -> {"town", "job", "animal"}


_FAMILY_ATTR = {"fact_town": "town", "fact_job": "job", "fact_pet": "animal"}


def build_world(pools: SplitPools, cfg: WorldConfig, seed: int) -> World:
    """The world, deterministically from ``seed``, over ``pools`` (the train split's)."""
    rng = random.Random(f"deepomni-world-{seed}")
    if cfg.people > len(pools.people):
        raise ValueError(f"WorldConfig.people={cfg.people} exceeds the {len(pools.people)} people of the train pool")
    people = rng.sample(pools.people, cfg.people)
    knowledge = {p: {"town": rng.choice(pools.towns), "job": rng.choice(pools.jobs), "animal": rng.choice(pools.animals)}
                 for p in people}
    facts: dict[str, list[str]] = {f: [] for f in KNOWLEDGE_FAMILIES}
    slots: dict[str, dict[str, dict[str, str]]] = {f: {} for f in KNOWLEDGE_FAMILIES}
    answers: dict[str, dict[str, str]] = {f: {} for f in KNOWLEDGE_FAMILIES}

    def add(family: str, key: str, slot_values: dict[str, str], answer: str) -> None:
        facts[family].append(key)
        slots[family][key], answers[family][key] = slot_values, answer

    for person, row in knowledge.items():
        for family, attr in _FAMILY_ATTR.items():
            add(family, person, {"person": person}, row[attr] if attr == "town" else lx.with_article(row[attr]))
    n = range(cfg.arith_max + 1)
    for op, a, b in [("plus", a, b) for a in n for b in n] + [("minus", a, b) for a in n for b in range(a + 1)]:
        add("arith", f"{op}:{a}:{b}", {"a": lx.number_to_words(a), "op": op, "b": lx.number_to_words(b)},
            lx.number_to_words(_OPS[op][1](a, b)))
    successors = ([(d, lx.DAYS[(i + 1) % 7]) for i, d in enumerate(lx.DAYS)]
                  + [(m, lx.MONTHS[(i + 1) % 12]) for i, m in enumerate(lx.MONTHS)]
                  + [(lx.number_to_words(k), lx.number_to_words(k + 1)) for k in range(cfg.count_to + 1)])
    for x, nxt in successors:
        add("next", x, {"x": x}, nxt)
    for w, o in rng.sample(list(lx.OPPOSITES), min(cfg.opposites, len(lx.OPPOSITES))):
        add("opposite", w, {"w": w}, o)
        add("opposite", o, {"w": o}, w)
    return World(facts, slots, answers, knowledge)


def phrasings(family: str, fact: str, seed: int) -> dict[str, list[int]]:
    """Which templates of ``family`` may ask ``fact`` in each split: one test and one validation template
    of its own (drawn per fact), the rest for training."""
    order = list(range(len(TEMPLATES[family])))
    random.Random(f"deepomni-phrasing-{seed}/{family}/{fact}").shuffle(order)
    return {"test": order[:1], "validation": order[1:2], "train": sorted(order[2:])}


def knowledge_item(world: World, family: str, fact: str, split: str, rng: random.Random, seed: int) -> Item:
    """``fact`` of ``family`` asked in one of the templates ``split`` may use for it (:func:`phrasings`)."""
    i = rng.choice(phrasings(family, fact, seed)[split])
    q = TEMPLATES[family][i].format(**world.slots[family][fact])
    return Item(family, f"{family}.{i}", q[0].upper() + q[1:], world.answers[family][fact],
                (f"fact:{family}:{fact}", f"phrasing:{family}:{fact}@{i}"))


def pools_and_world(world_seed: int, cfg: WorldConfig | None = None) -> tuple[dict[str, SplitPools], World]:
    """The split pools of ``world_seed`` and the world over their train part: what every corpus drawn in
    that world (the built-in corpus, the foundations' speech and text corpora) reads."""
    pools = build_pools(world_seed)
    return pools, build_world(pools["train"], cfg or WorldConfig(), world_seed)


def build_pools(seed: int) -> dict[str, SplitPools]:
    """Partition every sentence / skill template list and entity pool into train/validation/test,
    deterministically from ``seed``."""
    rng = random.Random(f"deepomni-synth-pools-{seed}")
    people, towns = lx.invented_names(rng, NUM_PEOPLE, NUM_TOWNS)
    parted = {
        "templates": {f: partition(list(range(len(TEMPLATES[f]))), rng) for f in ("sentence",) + SKILL_FAMILIES},
        "people": partition(people, rng),
        "towns": partition(towns, rng),
        "objects": partition(list(lx.OBJECTS), rng),
        "animals": partition(list(lx.ANIMALS), rng),
        "jobs": partition(list(lx.JOBS), rng),
        "opposites": partition(list(lx.OPPOSITES), rng),
        "counts": partition([(a, a + span) for a in range(31) for span in (2, 3, 4)], rng),
    }
    return {split: SplitPools(split=split, templates={f: sorted(parts[k]) for f, parts in parted["templates"].items()},
                              **{name: parts[k] for name, parts in parted.items() if name != "templates"})
            for k, split in enumerate(SPLITS)}


# ------------------------------------------------------------------------------------- generators

def _template(pools: SplitPools, family: str, rng: random.Random) -> tuple[str, str]:
    i = rng.choice(pools.templates[family])
    return f"{family}.{i}", TEMPLATES[family][i]


def _slots(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def transcript(text: str) -> str:
    """LibriSpeech-style normalisation for asr targets: lower case, no punctuation but apostrophes."""
    keep = set(string.ascii_lowercase + string.digits + "' ")
    return " ".join("".join(c for c in text.lower() if c in keep).split())


def sentence(pools: SplitPools, rng: random.Random) -> Item:
    """A templated statement about this split's entities (for asr and tts)."""
    tid, tpl = _template(pools, "sentence", rng)
    person, person2 = rng.sample(pools.people, 2)
    town, town2 = rng.sample(pools.towns, 2)
    obj, animal, job = rng.choice(pools.objects), rng.choice(pools.animals), rng.choice(pools.jobs)
    adj = rng.choice(rng.choice(pools.opposites))
    values = {"person": person, "person2": person2, "town": town, "town2": town2,
              "obj": obj, "a_obj": lx.with_article(obj), "animal": animal, "a_animal": lx.with_article(animal),
              "job": job, "a_job": lx.with_article(job), "adj": adj, "num": lx.number_to_words(rng.randint(2, 99)),
              "day": rng.choice(lx.DAYS), "month": rng.choice(lx.MONTHS)}
    keys = {"person": f"person:{person}", "person2": f"person:{person2}", "town": f"town:{town}",
            "town2": f"town:{town2}", "obj": f"word:{obj}", "a_obj": f"word:{obj}", "animal": f"animal:{animal}",
            "a_animal": f"animal:{animal}", "job": f"job:{job}", "a_job": f"job:{job}", "adj": f"word:{adj}"}
    text = tpl.format(**values)
    text = text[0].upper() + text[1:]
    return Item("sentence", tid, text, text, tuple(sorted({keys[s] for s in _slots(tpl) if s in keys})))


def _repeat(pools: SplitPools, rng: random.Random) -> Item:
    tid, tpl = _template(pools, "repeat", rng)
    w = rng.choice(pools.objects)
    times, n = rng.choice((("twice", 2), ("three times", 3)))
    return Item("repeat", tid, tpl.format(w=w, times=times), " ".join([w] * n), (f"word:{w}",))


def _spell_words(pools: SplitPools) -> list[str]:
    return [w for w in pools.objects if len(w) <= 5]


def _spell(pools: SplitPools, rng: random.Random) -> Item:
    tid, tpl = _template(pools, "spell", rng)
    w = rng.choice(_spell_words(pools))
    return Item("spell", tid, tpl.format(w=w), " ".join(w), (f"word:{w}",), answer_speak=", ".join(w.upper()) + ".")


def _letter(pools: SplitPools, rng: random.Random) -> Item:
    tid, tpl = _template(pools, "letter", rng)
    w = rng.choice(pools.objects)
    return Item("letter", tid, tpl.format(w=w), w[0], (f"word:{w}",), answer_speak=w[0].upper() + ".")


def _count(pools: SplitPools, rng: random.Random) -> Item:
    tid, tpl = _template(pools, "count", rng)
    a, b = rng.choice(pools.counts)
    q = tpl.format(a=lx.number_to_words(a), b=lx.number_to_words(b))
    return Item("count", tid, q, " ".join(lx.number_to_words(n) for n in range(a, b + 1)), (f"count:{a}-{b}",))


SKILL_GENERATORS: dict[str, Callable[[SplitPools, random.Random], Item]] = {
    "repeat": _repeat, "spell": _spell, "letter": _letter, "count": _count,
}


def skill_item(pools: SplitPools, family: str, rng: random.Random) -> Item:
    """A question of ``family`` (one of SKILL_FAMILIES) with its short answer, from this split's pools."""
    if family not in SKILL_GENERATORS:
        raise ValueError(f"unknown skill family {family!r}; expected one of {list(SKILL_GENERATORS)}")
    return SKILL_GENERATORS[family](pools, rng)
