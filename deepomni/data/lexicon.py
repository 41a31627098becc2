"""Words the built-in corpus is made of: number words, closed word classes, open word lists, and a
generator of invented names and towns.

Two kinds of vocabulary, treated differently by the split partition in :mod:`deepomni.data.content`:

- closed classes (numbers, days, months, letters) are *shared* by every split: answers are made of them,
  so a model that never saw "twelve" in training could not answer any test sum;
- open classes (objects, animals, jobs, opposite pairs, invented people and towns) are *entities*: each
  belongs to exactly one split.

The lists are disjoint from each other (checked by the tests), so an entity key like ``word:apple``
names one thing.
"""

from __future__ import annotations

import random

# ----------------------------------------------------------------------------------------- numbers

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_words(n: int) -> str:
    """``142 -> "one hundred forty two"`` (0..999, no hyphens or "and": espeak reads it either way, and
    space-separated words keep the text tokenizer's job simple)."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_to_words supports 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    hundreds, rest = divmod(n, 100)
    return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))


# ------------------------------------------------------------------------------------ closed classes

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")

# ------------------------------------------------------------------------------------- open classes

# everyday nouns; the short ones are also used by the spelling and first-letter instructions
OBJECTS = tuple("""
apple table chair lamp book pen cup plate spoon fork knife bottle box bag coat hat shoe sock glove
clock watch phone key door window bed pillow blanket rug mirror brush comb soap towel bucket ladder
rope drum flute piano guitar kite ball doll train truck boat bike car bus tent map card stamp coin
ring belt scarf jacket shirt skirt dress vase candle basket barrel shovel hammer nail screw saw
bread cake pie soup rice bean carrot onion lemon grape melon peach pear plum cherry olive nut egg
cheese honey jam tea milk juice kettle oven stove fridge sink desk shelf drawer fence gate wall roof
""".split())

ANIMALS = tuple("""
cat dog rabbit parrot hamster goldfish turtle pony goat lizard ferret canary duck hen mouse frog
snake owl donkey sheep pig cow horse gecko
""".split())

JOBS = tuple("""
baker pilot farmer teacher nurse doctor painter plumber tailor gardener dentist chemist sailor
singer writer driver butcher carpenter miner fisher cook potter weaver jeweller barber builder
clerk banker judge vet
""".split())

OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("open", "closed"),
    ("light", "dark"), ("happy", "sad"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
    ("old", "new"), ("wet", "dry"), ("loud", "quiet"), ("tall", "short"), ("rich", "poor"),
    ("clean", "dirty"), ("strong", "weak"), ("thick", "thin"), ("near", "far"), ("wide", "narrow"),
    ("good", "bad"), ("high", "low"), ("sweet", "sour"), ("left", "right"), ("brave", "afraid"),
    ("first", "last"), ("day", "night"), ("black", "white"), ("win", "lose"), ("push", "pull"),
)


# ------------------------------------------------------------------------------- invented names

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kl", "st", "tr", "sh", "ch", "fl", "sl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ee", "oo")
_CODAS = ("b", "d", "k", "l", "m", "n", "r", "s", "t", "lk", "nd", "rn", "st", "sk", "ck", "nt")
_SURNAME_ENDS = ("", "er", "en", "ov", "man", "ley", "son", "ic")
_TOWN_ENDS = ("wick", "ford", "ton", "by", "mere", "dale", "holm", "stead", "bury", "field", "port", "moor")


def _first_name(rng: random.Random) -> str:
    # one consonant between two short vowels reads naturally: Mira, Tovan, Lesel
    s = rng.choice(_ONSETS) + rng.choice(_VOWELS[:5]) + rng.choice(_ONSETS[:15])
    return (s + rng.choice(("a", "o", "i", "an", "el"))).capitalize()


def _surname(rng: random.Random) -> str:
    return (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) + rng.choice(_SURNAME_ENDS)).capitalize()


def _town(rng: random.Random) -> str:
    return (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) + rng.choice(_TOWN_ENDS)).capitalize()


def invented_names(rng: random.Random, people: int, towns: int) -> tuple[list[str], list[str]]:
    """``people`` distinct "First Last" names and ``towns`` distinct town names, pronounceable by espeak,
    none equal to a word of the lists above. Deterministic given the rng state."""
    taken = {w.lower() for w in OBJECTS + ANIMALS + JOBS + DAYS + MONTHS} | {w for p in OPPOSITES for w in p}
    people_out: list[str] = []
    towns_out: list[str] = []
    seen_first: set[str] = set()
    while len(people_out) < people:
        first, last = _first_name(rng), _surname(rng)
        # distinct first names too, so a context sentence never mentions two people sharing one
        if first.lower() in taken or last.lower() in taken or first in seen_first:
            continue
        seen_first.add(first)
        people_out.append(f"{first} {last}")
    while len(towns_out) < towns:
        town = _town(rng)
        if town.lower() not in taken and town not in towns_out:
            towns_out.append(town)
    return people_out, towns_out


def with_article(noun: str) -> str:
    """``"apple" -> "an apple"``: by first letter, which is right for every word in these lists."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun
