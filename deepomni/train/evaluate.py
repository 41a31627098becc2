"""Held-out evaluation of a checkpoint (PAPER.md "Evaluation"), on the tokenized split of our own corpus.

    metric                        items                          definition
    text_qa_accuracy              text_qa                        exact match of the greedy text answer
    spoken_qa_accuracy            spoken_qa, speech input        exact match of the greedy text answer
    spoken_qa_text_input_accuracy spoken_qa, text input          the same, question as text
    asr_wer                       asr                            word error rate of the greedy transcript
                                                                 (sum of word edits / sum of reference words)
    codec_accuracy                tts + spoken_qa                teacher-forced: argmax of each codec channel's
                                                                 logits vs the reference codes (and EOS), over
                                                                 the positions whose codec label is not IGNORE
    speech_length_consistency     spoken_qa with speech output   proxy for "ASR of the speech agrees with the
                                                                 text" (no ASR model here): the fraction of
                                                                 generated answers whose speech ended (codec
                                                                 EOS within the step bound) and whose frames
                                                                 per text character lie within
                                                                 [0.5 x min, 2 x max] of the references' ratio
                                                                 on the same split; necessary, not sufficient
    text_drop                     text_qa, with --base           (base - model) / base of text_qa_accuracy
    text_qa_token_accuracy        text_qa                        teacher-forced: argmax of the text channel vs
                                                                 the reference answer's tokens (and EOT); the
                                                                 text ability a tiny model has measurably (its
                                                                 exact match on unseen templates is ~0)
    spoken_qa_token_accuracy      spoken_qa, speech input        the same on answers to spoken questions
    text_token_drop               text_qa, with --base           (base - model) / base of text_qa_token_accuracy

Exact match compares :func:`normalize`-d strings (lower case, punctuation removed, spaces collapsed).
Prompts are built as in training (:func:`deepomni.model.prompt.user_turn` with the task's instruction on
the SYSTEM slot, the question as text ids or as AUDIO placeholders + the encoded question mel). Decoding
is greedy on the text channel and bounded: ``max_steps = 1.5 x`` the reference answer's steps (text ids +
EOT, or codec frames + K + 1 under the delay pattern) ``+ margin``.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data.sequences import INSTRUCTIONS, SPEECH_OUT_TASKS
from ..data.tokenized import row_tensors
from ..model.channels import IGNORE
from ..model.generate import Generation, GenerationConfig, generate
from ..model.model import DeepOmniModel
from ..model.prompt import user_turn
from ..text import TextTokenizer, load_tokenizer
from .profile import read_rows, speech_input

METRICS = ("text_qa_accuracy", "text_qa_token_accuracy", "spoken_qa_accuracy", "spoken_qa_token_accuracy",
           "spoken_qa_text_input_accuracy", "asr_wer",
           "codec_accuracy", "speech_length_consistency")


@dataclass
class EvalConfig:
    tokenizer: str = "bytes"  # the tokenizer the data was prepared with ("bytes" | "hf:<dir>")
    max_items: int | None = None  # per task (so every metric gets items), in file order
    margin: int = 8  # decoding steps allowed beyond 1.5 x the reference answer
    speech: bool = True  # also decode speech for spoken_qa (for speech_length_consistency)
    tasks: tuple[str, ...] = ("text_qa", "spoken_qa", "asr", "tts")
    seed: int = 0  # codec sampling


# ------------------------------------------------------------------------------------- text metrics
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: ``" Mira  Kolb, lives!" -> "mira kolb lives"``."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def word_edits(reference: str, hypothesis: str) -> tuple[int, int]:
    """``(substitutions + deletions + insertions, reference words)`` on normalised words (Levenshtein)."""
    ref, hyp = normalize(reference).split(), normalize(hypothesis).split()
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1], len(ref)


def wer(references: Iterable[str], hypotheses: Iterable[str]) -> float:
    """Corpus word error rate: total edits / total reference words (can exceed 1)."""
    edits = words = 0
    for r, h in zip(references, hypotheses, strict=True):
        e, n = word_edits(r, h)
        edits, words = edits + e, words + n
    return edits / words if words else math.nan


def relative_drop(base: float | None, model: float | None) -> float | None:
    """``(base - model) / base``; None when either is missing or the base scores 0."""
    if base is None or model is None or base == 0 or math.isnan(base) or math.isnan(model):
        return None
    return (base - model) / base


# ------------------------------------------------------------------------------------------ items
def build_prompt(model: DeepOmniModel, tok: TextTokenizer, row: dict) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """``(prompt_LC, audio)`` of a tokenized row, as training built it (without the answer)."""
    system = tok.encode(INSTRUCTIONS[row["task"]])
    _, _, mel_MT = row_tensors(row)
    audio = speech_input(model, row, mel_MT)
    if audio is not None:
        return user_turn(model.layout, audio_positions=int(row["audio_positions"]), system_ids=system), audio
    return user_turn(model.layout, text_ids=tok.encode(row["question_text"]), system_ids=system), None


def step_bound(row: dict, tok: TextTokenizer, num_codec_channels: int, speech: bool, margin: int) -> int:
    steps = len(tok.encode(row["answer_text"])) + 1
    if speech:
        steps = max(steps, int(row.get("answer_frames") or 0) + num_codec_channels + 1)
    return math.ceil(1.5 * steps) + margin


def answer_item(model: DeepOmniModel, tok: TextTokenizer, row: dict, speech: bool, cfg: EvalConfig) -> Generation:
    """Greedy text answer (and sampled speech when ``speech``) to one row's question."""
    prompt_LC, audio = build_prompt(model, tok, row)
    # one step beyond the bound, so that an answer ending exactly at the bound is told from a runaway one
    gcfg = GenerationConfig(max_steps=step_bound(row, tok, model.layout.num_codec_channels, speech, cfg.margin) + 1,
                            speech=speech, seed=cfg.seed)
    return generate(model, prompt_LC, None if audio is None else audio[0], gcfg)


@torch.no_grad()
def teacher_forced_hits(model: DeepOmniModel, row: dict) -> dict[str, tuple[int, int]]:
    """Teacher-forced tokens predicted right and counted, over the positions with a label: ``{"text":
    (hits, total) of the text channel, "codec": (hits, total) over the codec channels}``."""
    tokens_LC, labels_LC, mel_MT = row_tensors(row)
    device = model.embed.weight.device
    out = model(tokens_LC.unsqueeze(0).to(device), audio=speech_input(model, row, mel_MT))
    hits = {"text": [0, 0], "codec": [0, 0]}
    for c in range(labels_LC.shape[1]):
        lab = labels_LC[:, c].to(device)
        keep = lab != IGNORE
        h = hits["text" if c == 0 else "codec"]
        h[0] += int((out.logits[c][0].argmax(-1)[keep] == lab[keep]).sum())
        h[1] += int(keep.sum())
    return {k: (v[0], v[1]) for k, v in hits.items()}


def frames_per_char(text: str, frames: int) -> float:
    return frames / max(1, len(normalize(text)))


# --------------------------------------------------------------------------------------- evaluate
def select_rows(rows: Iterable[dict], tasks: Iterable[str], max_items: int | None) -> list[dict]:
    taken: dict[str, int] = {}
    out = []
    for r in rows:
        t = r["task"]
        if t in tasks and (max_items is None or taken.get(t, 0) < max_items):
            taken[t] = taken.get(t, 0) + 1
            out.append(r)
    return out


@torch.no_grad()
def evaluate(model: DeepOmniModel, rows: list[dict], cfg: EvalConfig | None = None) -> tuple[dict, list[dict]]:
    """``(metrics, per-item records)`` of ``model`` on tokenized ``rows`` (see the module doc)."""
    cfg = cfg or EvalConfig()
    tok = load_tokenizer(cfg.tokenizer, model.cfg.text_vocab_size)
    model.eval()
    K = model.layout.num_codec_channels
    rows = select_rows(rows, cfg.tasks, cfg.max_items)
    ref_ratios = [frames_per_char(r["answer_text"], int(r["answer_frames"])) for r in rows
                  if r["task"] in SPEECH_OUT_TASKS and int(r.get("answer_frames") or 0) > 0]
    band = (0.5 * min(ref_ratios), 2 * max(ref_ratios)) if ref_ratios else None

    records = []
    for row in rows:
        task, speech_in = row["task"], row["input_modality"] == "speech"
        rec = {"id": row["id"], "task": task, "input_modality": row["input_modality"], "reference": row["answer_text"]}
        if task in ("text_qa", "spoken_qa", "asr"):
            speech_out = task == "spoken_qa" and cfg.speech and K > 0
            gen = answer_item(model, tok, row, speech_out, cfg)
            rec["prediction"] = tok.decode(gen.text_ids)
            rec["steps"] = gen.steps
            if task == "asr":
                rec["word_edits"], rec["reference_words"] = word_edits(row["answer_text"], rec["prediction"])
            else:
                rec["correct"] = exact_match(rec["prediction"], row["answer_text"])
            if speech_out and band is not None:
                frames = gen.codes_KF.shape[1] if gen.frames else 0
                ended = gen.steps <= step_bound(row, tok, K, True, cfg.margin)
                ratio = frames_per_char(rec["prediction"], frames)
                rec["frames"], rec["speech_ended"] = frames, ended
                rec["length_consistent"] = bool(ended and frames > 0 and rec["prediction"].strip()
                                                and band[0] <= ratio <= band[1])
        tf = teacher_forced_hits(model, row)
        rec["text_hits"], rec["text_total"] = tf["text"]
        if task in SPEECH_OUT_TASKS and K > 0:
            rec["codec_hits"], rec["codec_total"] = tf["codec"]
        records.append(rec)
    return summarize(records), records


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict]) -> dict:
    """Metrics (None where a split has no items for one) and the item counts behind them."""
    text = [r["correct"] for r in records if r["task"] == "text_qa"]
    sqa = [r["correct"] for r in records if r["task"] == "spoken_qa" and r["input_modality"] == "speech"]
    sqa_t = [r["correct"] for r in records if r["task"] == "spoken_qa" and r["input_modality"] == "text"]
    asr = [r for r in records if r["task"] == "asr"]
    codec = [r for r in records if "codec_total" in r]
    cons = [r["length_consistent"] for r in records if "length_consistent" in r]
    edits, words = sum(r["word_edits"] for r in asr), sum(r["reference_words"] for r in asr)
    hits, total = sum(r["codec_hits"] for r in codec), sum(r["codec_total"] for r in codec)
    def token_acc(sel) -> tuple[float | None, int]:
        rs = [r for r in records if sel(r) and r.get("text_total")]
        n = sum(r["text_total"] for r in rs)
        return (sum(r["text_hits"] for r in rs) / n if n else None), len(rs)

    text_tok, n_text_tok = token_acc(lambda r: r["task"] == "text_qa")
    sqa_tok, n_sqa_tok = token_acc(lambda r: r["task"] == "spoken_qa" and r["input_modality"] == "speech")
    metrics = {
        "text_qa_accuracy": _mean(text),
        "text_qa_token_accuracy": text_tok,
        "spoken_qa_token_accuracy": sqa_tok,
        "spoken_qa_accuracy": _mean(sqa),
        "spoken_qa_text_input_accuracy": _mean(sqa_t),
        "asr_wer": edits / words if words else None,
        "codec_accuracy": hits / total if total else None,
        "speech_length_consistency": _mean(cons),
    }
    counts = {"text_qa_accuracy": len(text), "text_qa_token_accuracy": n_text_tok,
              "spoken_qa_token_accuracy": n_sqa_tok, "spoken_qa_accuracy": len(sqa), "spoken_qa_text_input_accuracy": len(sqa_t),
              "asr_wer": len(asr), "codec_accuracy": len(codec), "speech_length_consistency": len(cons)}
    return {**metrics, "items": counts, "codec_tokens": total, "asr_reference_words": words}


def compare(metrics: dict, base: dict | None) -> dict:
    """Add the base's text ability and the relative text drop (PAPER.md: drop = (base - model) / base)."""
    if base is None:
        return metrics
    return {**metrics, "base_text_qa_accuracy": base["text_qa_accuracy"],
            "text_drop": relative_drop(base["text_qa_accuracy"], metrics["text_qa_accuracy"]),
            "base_text_qa_token_accuracy": base["text_qa_token_accuracy"],
            "text_token_drop": relative_drop(base["text_qa_token_accuracy"], metrics["text_qa_token_accuracy"])}


# ------------------------------------------------------------------------------------------ report
def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(result: dict) -> str:
    m = result["metrics"]
    lines = [f"# Evaluation: `{result['checkpoint']}` on split `{result['split']}`", "",
             "| metric | value | items | better |", "|---|---|---|---|"]
    for k in METRICS:
        lines.append(f"| {k} | {_fmt(m[k])} | {m['items'][k]} | {'lower' if k == 'asr_wer' else 'higher'} |")
    if "text_drop" in m:
        lines.append(f"| base_text_qa_accuracy | {_fmt(m['base_text_qa_accuracy'])} | {m['items']['text_qa_accuracy']} | higher |")
        lines.append(f"| text_drop = (base - model) / base | {_fmt(m['text_drop'])} | | lower |")
        lines.append(f"| base_text_qa_token_accuracy | {_fmt(m['base_text_qa_token_accuracy'])} | "
                     f"{m['items']['text_qa_token_accuracy']} | higher |")
        lines.append(f"| text_token_drop (same, on token accuracy) | {_fmt(m['text_token_drop'])} | | lower |")
    lines += ["", "Definitions: `deepomni/train/evaluate.py` (module docstring). "
              "`speech_length_consistency` is a length-plausibility proxy, not an ASR check.", ""]
    return "\n".join(lines)


def run(checkpoint: str | Path, data: str | Path, out: str | Path, base: str | Path | None = None,
        split: str = "test", cfg: EvalConfig | None = None) -> dict:
    """Evaluate ``checkpoint`` (and ``base`` on text_qa) and write ``eval.json``, ``eval.md``, ``items.jsonl``."""
    from ..checkpoint import load_model

    cfg = cfg or EvalConfig()
    rows = read_rows(data, split)
    model, _ = load_model(checkpoint)
    metrics, records = evaluate(model, rows, cfg)
    base_metrics = None
    if base is not None:
        base_model, _ = load_model(base)
        base_cfg = EvalConfig(**{**asdict(cfg), "tasks": ("text_qa",)})
        base_metrics, _ = evaluate(base_model, rows, base_cfg)
    result = {"checkpoint": str(checkpoint), "base": None if base is None else str(base), "data": str(data),
              "split": split, "config": asdict(cfg), "metrics": compare(metrics, base_metrics)}
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    (o / "eval.json").write_text(json.dumps(result, indent=1))
    (o / "eval.md").write_text(markdown(result))
    with open(o / "items.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return result
