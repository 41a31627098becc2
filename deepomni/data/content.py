"""The words of the built-in corpus: templates, entity pools split by train/validation/test, and the
item generators (text only; :mod:`deepomni.data.synth` adds the speech).

Held-out splits really are held out: every template list and every entity pool is partitioned (about
80/10/10, at least one per split), so a test item uses phrasings and entities (invented people and towns,
objects, animals, jobs, opposite pairs, arithmetic problems, "what comes after" questions, counting
ranges) that training never showed. Closed word classes (number words, days, months, letters) are
shared, since the answers are made of them. Each item's ``entities`` lists its partitioned keys
(``person:Tobi Droostman``, ``arith:7+5``, ...), which the tests check for disjointness.

Facts are asked *with their context*: "Tobi Droostman lives in Munby and is a baker. Where does Tobi
Droostman live?" -> "Tobi Droostman lives in Munby." A closed-book question about an invented test person
could not be answered by any model; with the facts in the question, the test split measures reading and
answering. Within a split the knowledge table is consistent (a person always lives in the same town), so
training also rewards memorising it.
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
                  "Where is the home of {person}?", "Which town is home to {person}?", "Where can I find {person}?"),
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
QA_FAMILIES = ("arith", "fact_town", "fact_job", "fact_pet", "repeat", "spell", "letter", "next", "opposite", "count")

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
    """Everything one split may draw from; no entity or template appears in two splits' pools."""

    split: str
    templates: dict[str, list[int]]  # family -> template indices
    people: list[str]
    towns: list[str]
    objects: list[str]
    animals: list[str]
    jobs: list[str]
    opposites: list[tuple[str, str]]
    arith: list[tuple[str, int, int]]  # (op word, a, b)
    successors: list[tuple[str, str]]  # (x, what comes after x)
    counts: list[tuple[int, int]]
    knowledge: dict[str, dict[str, str]] = field(default_factory=dict)  # person -> town / job / animal


def _arith_problems() -> list[tuple[str, int, int]]:
    plus = [("plus", a, b) for a in range(21) for b in range(21)]
    minus = [("minus", a, b) for a in range(21) for b in range(a + 1)]
    times = [("times", a, b) for a in range(11) for b in range(11)]
    return plus + minus + times


def _successor_questions() -> list[tuple[str, str]]:
    days = [(d, lx.DAYS[(i + 1) % 7]) for i, d in enumerate(lx.DAYS)]
    months = [(m, lx.MONTHS[(i + 1) % 12]) for i, m in enumerate(lx.MONTHS)]
    numbers = [(lx.number_to_words(n), lx.number_to_words(n + 1)) for n in range(50)]
    return days + months + numbers


def build_pools(seed: int) -> dict[str, SplitPools]:
    """Partition every template list and entity pool into train/validation/test, deterministically from
    ``seed``, and draw each split's knowledge table (person -> town, job, pet) from its own pools."""
    rng = random.Random(f"deepomni-synth-pools-{seed}")
    people, towns = lx.invented_names(rng, NUM_PEOPLE, NUM_TOWNS)
    parted = {
        "templates": {f: partition(list(range(len(t))), rng) for f, t in TEMPLATES.items()},
        "people": partition(people, rng),
        "towns": partition(towns, rng),
        "objects": partition(list(lx.OBJECTS), rng),
        "animals": partition(list(lx.ANIMALS), rng),
        "jobs": partition(list(lx.JOBS), rng),
        "opposites": partition(list(lx.OPPOSITES), rng),
        "arith": partition(_arith_problems(), rng),
        "successors": partition(_successor_questions(), rng),
        "counts": partition([(a, a + span) for a in range(31) for span in (2, 3, 4)], rng),
    }
    pools = {}
    for k, split in enumerate(SPLITS):
        p = SplitPools(split=split, templates={f: sorted(parts[k]) for f, parts in parted["templates"].items()},
                       **{name: parts[k] for name, parts in parted.items() if name != "templates"})
        p.knowledge = {person: {"town": rng.choice(p.towns), "job": rng.choice(p.jobs), "animal": rng.choice(p.animals)}
                       for person in p.people}
        pools[split] = p
    return pools


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


def _arith(pools: SplitPools, rng: random.Random) -> Item:
    tid, tpl = _template(pools, "arith", rng)
    op, a, b = rng.choice(pools.arith)
    sym, fn = _OPS[op]
    q = tpl.format(a=lx.number_to_words(a), op=op, b=lx.number_to_words(b))
    return Item("arith", tid, q, lx.number_to_words(fn(a, b)), (f"arith:{a}{sym}{b}",))


_FACT_SENTENCE = {"town": "{p} lives in {v}", "job": "{p} is {v}", "animal": "{p} has {v}"}
_FAMILY_ATTR = {"fact_town": "town", "fact_job": "job", "fact_pet": "animal"}


def _fact(family: str) -> Callable[[SplitPools, random.Random], Item]:
    attr = _FAMILY_ATTR[family]

    def gen(pools: SplitPools, rng: random.Random) -> Item:
        tid, tpl = _template(pools, family, rng)
        person = rng.choice(pools.people)
        row = pools.knowledge[person]
        other = rng.choice([k for k in _FACT_SENTENCE if k != attr])

        def said(key: str) -> str:
            v = row[key] if key == "town" else lx.with_article(row[key])
            return _FACT_SENTENCE[key].format(p=person, v=v)

        context = [said(attr), said(other)]
        rng.shuffle(context)
        q = f"{context[0]} and {context[1][len(person) + 1:]}. " + tpl.format(person=person)
        entities = (f"person:{person}",) + tuple(f"{k}:{row[k]}" for k in (attr, other))
        return Item(family, tid, q, said(attr) + ".", tuple(sorted(entities)))

    return gen


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


def _next(pools: SplitPools, rng: random.Random) -> Item:
    tid, tpl = _template(pools, "next", rng)
    x, nxt = rng.choice(pools.successors)
    return Item("next", tid, tpl.format(x=x), nxt, (f"next:{x}",))


def _opposite(pools: SplitPools, rng: random.Random) -> Item:
    tid, tpl = _template(pools, "opposite", rng)
    pair = rng.choice(pools.opposites)
    w, o = pair if rng.random() < 0.5 else pair[::-1]
    return Item("opposite", tid, tpl.format(w=w), o, (f"word:{w}", f"word:{o}"))


def _count(pools: SplitPools, rng: random.Random) -> Item:
    tid, tpl = _template(pools, "count", rng)
    a, b = rng.choice(pools.counts)
    q = tpl.format(a=lx.number_to_words(a), b=lx.number_to_words(b))
    return Item("count", tid, q, " ".join(lx.number_to_words(n) for n in range(a, b + 1)), (f"count:{a}-{b}",))


QA_GENERATORS: dict[str, Callable[[SplitPools, random.Random], Item]] = {
    "arith": _arith, "fact_town": _fact("fact_town"), "fact_job": _fact("fact_job"), "fact_pet": _fact("fact_pet"),
    "repeat": _repeat, "spell": _spell, "letter": _letter, "next": _next, "opposite": _opposite, "count": _count,
}


def qa_item(pools: SplitPools, family: str, rng: random.Random) -> Item:
    """A question of ``family`` (one of QA_FAMILIES) with its short answer, from this split's pools."""
    if family not in QA_GENERATORS:
        raise ValueError(f"unknown QA family {family!r}; expected one of {list(QA_GENERATORS)}")
    return QA_GENERATORS[family](pools, rng)
