"""What a base LLM can do, measured on held-out text (the figures of a foundation set's manifest):

| figure            | items                                           | score                                   |
|-------------------|-------------------------------------------------|-----------------------------------------|
| knowledge_exact   | every fact of the world, in its *test* phrasing | exact match (the corpus's text QA)      |
| transcribe_wer    | test-split sentences, "Transcribe the speech."  | WER against the transcript              |
| read_exact        | test-split sentences, "Read the text aloud."    | exact match of the copy                 |
| spell_exact       | test-split words, "Spell the word ..."          | exact match ("c a t")                   |

Greedy decoding of the text channel, bounded at 1.5 x the reference + 8 steps.
"""

from __future__ import annotations

import math
import random
from typing import Any

import jiwer

from ..data import content
from ..data.sequences import INSTRUCTIONS
from ..model.generate import GenerationConfig, generate
from ..model.prompt import user_turn
from ..text import ByteTokenizer
from ..train.judge import normalize


def answer(model, tok, instruction: str, question: str, reference: str) -> str:
    """The model's greedy text answer to ``question`` under ``instruction`` (a key of INSTRUCTIONS)."""
    prompt = user_turn(model.layout, text_ids=tok.encode(question), system_ids=tok.encode(INSTRUCTIONS[instruction]))
    steps = math.ceil(1.5 * (len(tok.encode(reference)) + 1)) + 8
    return tok.decode(generate(model, prompt, None, GenerationConfig(max_steps=steps, speech=False)).text_ids)


def held_out_items(world_seed: int, n: int) -> dict[str, list[tuple[str, str, str]]]:
    """figure -> [(instruction, question, reference)]: the world's facts in their test phrasings (all of
    them), and ``n`` test-split sentences and spelling questions."""
    pools, world = content.pools_and_world(world_seed)
    rng = random.Random(f"deepomni-base-eval/{world_seed}")
    knowledge = []
    for family in content.KNOWLEDGE_FAMILIES:
        for fact in world.facts[family]:
            item = content.knowledge_item(world, family, fact, "test", rng, world_seed)
            knowledge.append(("text_qa", item.question_text, item.answer_text))
    sentences = [content.sentence(pools["test"], rng).question_text for _ in range(n)]
    spells = [content.skill_item(pools["test"], "spell", rng) for _ in range(n)]
    return {"knowledge_exact": knowledge,
            "transcribe_wer": [("asr", s, content.transcript(s)) for s in sentences],
            "read_exact": [("tts", s, s) for s in sentences],
            "spell_exact": [("text_qa", i.question_text, i.answer_text) for i in spells]}


def base_abilities(model, world_seed: int = 0, n: int = 100) -> dict[str, Any]:
    """The figures of the module doc, with a few examples of each."""
    tok = ByteTokenizer()
    model.eval()
    out: dict[str, Any] = {}
    for figure, items in held_out_items(world_seed, n).items():
        preds = [answer(model, tok, ins, q, ref) for ins, q, ref in items]
        refs = [ref for _, _, ref in items]
        if figure == "transcribe_wer":
            score = jiwer.wer([normalize(r) for r in refs], [normalize(p) or "<empty>" for p in preds])
        else:
            score = sum(normalize(p) == normalize(r) for p, r in zip(preds, refs)) / len(refs)
        out[figure] = round(float(score), 4)
        out[f"{figure.rsplit('_', 1)[0]}_items"] = len(items)
        out.setdefault("examples", {})[figure] = [{"q": q, "ref": r, "pred": p}
                                                  for (_, q, r), p in list(zip(items, preds))[:2]]
    return out
