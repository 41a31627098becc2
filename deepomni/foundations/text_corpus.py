"""The base LLM's pretraining text: the built-in world *and* reading, copying and spelling, as tokenized
rows the trainer reads (``text_pretrain``: text channel only).

A real base LLM knows facts and can read, repeat, spell and rewrite any text it is shown; those abilities
are what the speech stages build on (S1 only teaches a projector, so the frozen LLM must already be able to
write down what it reads). Each row is one chat turn in the project's prompt format
(:func:`deepomni.data.sequences.build_sequence`, text input), with one of the corpus's instructions:

| kind        | instruction (``sequences.INSTRUCTIONS``)   | question                       | answer                     |
|-------------|--------------------------------------------|--------------------------------|----------------------------|
| knowledge   | text_qa / spoken_qa                        | a fact of the world, train phrasings | its answer           |
| skill       | text_qa / spoken_qa                        | repeat / spell / letter / count | the answer                |
| transcribe  | asr ("Transcribe the speech.")             | a sentence, as text            | its transcript (lower case, no punctuation) |
| read        | tts ("Read the text aloud.")               | a sentence                     | the sentence               |

Sentences come from the train pools only, and knowledge is asked in train phrasings only, so the corpus's
held-out tests (unseen phrasings, unseen sentences) stay held out. Every row is drawn from
``(seed, index)``.
"""

from __future__ import annotations

import random
from dataclasses import field
from typing import Any

from ..config import configclass
from ..data import content
from ..data.schema import TEXT, TEXT_QA
from ..data.synth import weighted

KINDS = ("knowledge", "skill", "transcribe", "read")


@configclass()
class TextCorpusConfig:
    seed: int = 0
    world_seed: int = 0  # the world the base learns (SynthConfig.world_seed of every corpus that tests it)
    rows: int = 60_000
    kind_mix: dict[str, float] = field(default_factory=lambda: {"knowledge": 0.45, "skill": 0.15, "transcribe": 0.25,
                                                                "read": 0.15})
    spoken_instruction_prob: float = 0.3  # knowledge / skill rows asked with the spoken_qa instruction

    def __post_init__(self) -> None:
        if not self.kind_mix or set(self.kind_mix) - set(KINDS) or any(w < 0 for w in self.kind_mix.values()):
            raise ValueError(f"kind_mix {self.kind_mix} must give non-negative weights to names in {KINDS}")


def draw_row(cfg: TextCorpusConfig, i: int, pools: dict, world: content.World) -> dict[str, Any]:
    """Row ``i``: ``{"id", "kind", "family", "instruction", "question", "answer"}`` (instruction: a key of
    ``INSTRUCTIONS``)."""
    rng = random.Random(f"deepomni-base-text/{cfg.seed}/{i}")
    kind = weighted(rng, cfg.kind_mix)
    train = pools["train"]
    if kind in ("knowledge", "skill"):
        if kind == "knowledge":
            family = rng.choice(content.KNOWLEDGE_FAMILIES)
            fact = rng.choice(world.facts[family])
            item = content.knowledge_item(world, family, fact, "train", rng, cfg.world_seed)
        else:
            item = content.skill_item(train, rng.choice(content.SKILL_FAMILIES), rng)
        instruction = "spoken_qa" if rng.random() < cfg.spoken_instruction_prob else "text_qa"
        question, answer, family = item.question_text, item.answer_text, item.family
    else:
        text = content.sentence(train, rng).question_text
        instruction = "asr" if kind == "transcribe" else "tts"
        question, answer, family = text, (content.transcript(text) if kind == "transcribe" else text), "sentence"
    return {"id": f"base-s{cfg.seed}-{i:07d}", "kind": kind, "family": family, "instruction": instruction,
            "question": question, "answer": answer}


def tokenized_rows(cfg: TextCorpusConfig, model_cfg, tokenizer: str = "bytes") -> list[dict[str, Any]]:
    """Every row as a tokenized row (``deepomni.data.tokenized`` schema, split train, task text_qa)."""
    from ..data.sequences import INSTRUCTIONS, build_sequence
    from ..model.channels import VocabLayout
    from ..text import load_tokenizer

    layout = VocabLayout.from_config(model_cfg)
    tok = load_tokenizer(tokenizer, model_cfg.text_vocab_size)
    instructions = {k: tok.encode(v) for k, v in INSTRUCTIONS.items()}
    pools, world = content.pools_and_world(cfg.world_seed)
    out = []
    for i in range(cfg.rows):
        r = draw_row(cfg, i, pools, world)
        seq = build_sequence(layout, TEXT_QA, tok.encode(r["answer"]), instructions[r["instruction"]],
                             question_ids=tok.encode(r["question"]))
        out.append({"id": r["id"], "split": "train", "task": TEXT_QA, "input_modality": TEXT,
                    "question_text": r["question"], "answer_text": r["answer"], "length": seq.tokens_LC.shape[0],
                    "num_channels": layout.num_channels, "tokens": seq.tokens_LC.reshape(-1).tolist(),
                    "labels": seq.labels_LC.reshape(-1).tolist(), "audio_positions": 0, "mel": [], "mel_bins": 0,
                    "mel_frames": 0, "answer_frames": 0, "error": None})
    return out
