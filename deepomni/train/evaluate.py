"""Held-out evaluation of a checkpoint (docs/paper.md "Evaluation"), on the tokenized split of our own corpus.

    metric                     items                        definition
    text_qa_accuracy           text_qa                      exact match of the greedy text answer: on the
                                                            built-in corpus, closed-book knowledge the base
                                                            learned, asked in held-out phrasings
                                                            (deepomni/data/content.py)
    spoken_qa_accuracy         spoken_qa, speech input      exact match of the greedy text answer to the
                                                            spoken question (the speech answer is decoded too)
    spoken_qa_typed_accuracy   the same spoken_qa rows      the same questions typed: the text-QA skill on
                                                            exactly the spoken items, so the two compare
    asr_wer                    asr                          word error rate of the greedy transcript (jiwer)
    tts_consistency_wer        tts + spoken_qa (speech out) the paper's TTS consistency: the judge
                                                            (pocketsphinx, deepomni/train/judge.py)
                                                            transcribes the generated speech (codec-decoded),
                                                            WER against the generated text
    judge_floor_wer            the same rows                the judge's own floor: its WER on the reference
                                                            answer audio after the codec round trip, against
                                                            the reference text
    codec_accuracy             tts + spoken_qa              teacher-forced: argmax of each codec channel's
                                                            logits vs the reference codes (and EOS)
    text_qa_token_accuracy     text_qa                      teacher-forced: argmax of the text channel vs the
                                                            reference answer's tokens (and EOT)
    text_drop                  with --base                  (base - model) / base of text_qa_accuracy
    text_token_drop            with --base                  the same on text_qa_token_accuracy

Exact match compares :func:`deepomni.train.judge.normalize`-d strings (lower case, punctuation removed,
spaces collapsed). Prompts are built as in training (:func:`deepomni.model.prompt.user_turn` with the
task's instruction on the SYSTEM slot, the question as text ids or as AUDIO placeholders + the encoded
question mel). Decoding is greedy on the text channel, codec channels sampled (top-k, seeded), and
bounded: ``max_steps = 1.5 x`` the reference answer's steps (text ids + EOT, or codec frames + K + 1 under
the delay pattern) ``+ margin``. The judge is the domain judge built on the corpus' own texts (every
question and answer of the data directory): the plain pocketsphinx model barely hears espeak-ng's voice
(WER 0.70 on clean reference audio), so only the domain judge's figures say anything; compare them with
its floor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
import dataclasses
from dataclasses import asdict
from pathlib import Path

import jiwer
import torch

from ..data.schema import SPEECH_OUT_TASKS, TEXT_QA
from ..data.sequences import INSTRUCTIONS
from ..data.tokenized import prepare_summary, read_rows, row_tensors
from ..model.channels import IGNORE
from ..model.generate import Generation, GenerationConfig, generate
from ..model.model import DeepOmniModel
from ..model.prompt import user_turn
from ..text import TextTokenizer, load_tokenizer
from .config import EvalConfig
from .judge import Judge, normalize, wer
from .profile import speech_input

METRICS = ("text_qa_accuracy", "spoken_qa_accuracy", "spoken_qa_typed_accuracy", "asr_wer",
           "tts_consistency_wer", "judge_floor_wer", "codec_accuracy", "text_qa_token_accuracy")
LOWER_IS_BETTER = ("asr_wer", "tts_consistency_wer", "judge_floor_wer")


# ------------------------------------------------------------------------------------- text metrics
def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def word_edits(reference: str, hypothesis: str) -> tuple[int, int]:
    """``(substitutions + deletions + insertions, reference words)`` on normalised words (jiwer)."""
    ref = normalize(reference)
    if not ref:
        raise ValueError(f"reference {reference!r} has no words to score against")
    out = jiwer.process_words(ref, normalize(hypothesis))
    return out.substitutions + out.deletions + out.insertions, len(ref.split())


def relative_drop(base: float | None, model: float | None) -> float | None:
    """``(base - model) / base``; None when either is missing or the base scores 0."""
    if base is None or model is None or base == 0 or math.isnan(base) or math.isnan(model):
        return None
    return (base - model) / base


# ------------------------------------------------------------------------------------------ items
def build_prompt(model: DeepOmniModel, tok: TextTokenizer, row: dict,
                 typed: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """``(prompt_LC, audio)`` of a tokenized row, as training built it (without the answer); ``typed``:
    the question as text even where the row has it spoken."""
    system = tok.encode(INSTRUCTIONS[row["task"]])
    _, _, mel_MT = row_tensors(row)
    audio = None if typed else speech_input(model, row, mel_MT)
    if audio is not None:
        return user_turn(model.layout, audio_positions=int(row["audio_positions"]), system_ids=system), audio
    return user_turn(model.layout, text_ids=tok.encode(row["question_text"]), system_ids=system), None


def step_bound(row: dict, tok: TextTokenizer, num_codec_channels: int, speech: bool, margin: int) -> int:
    steps = len(tok.encode(row["answer_text"])) + 1
    if speech:
        steps = max(steps, int(row.get("answer_frames") or 0) + num_codec_channels + 1)
    return math.ceil(1.5 * steps) + margin


def answer_item(model: DeepOmniModel, tok: TextTokenizer, row: dict, speech: bool, cfg: EvalConfig,
                typed: bool = False) -> Generation:
    """Greedy text answer (and speech sampled among ``cfg.top_k`` codes when ``speech``) to one row's question."""
    prompt_LC, audio = build_prompt(model, tok, row, typed)
    # one step beyond the bound, so that an answer ending exactly at the bound is told from a runaway one
    gcfg = GenerationConfig(max_steps=step_bound(row, tok, model.layout.num_codec_channels, speech, cfg.margin) + 1,
                            speech=speech, seed=cfg.seed, top_k=cfg.top_k)
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


def reference_codes(row: dict) -> torch.Tensor:
    """The reference answer's codec codes ``[K, frames]``, read back from the row's codec labels (each
    channel's targets are its codes, then EOS)."""
    _, labels_LC, _ = row_tensors(row)
    F = int(row["answer_frames"])
    return torch.stack([labels_LC[labels_LC[:, c] != IGNORE, c][:F] for c in range(1, labels_LC.shape[1])])


# --------------------------------------------------------------------------------------- evaluate
def select_rows(rows: Iterable[dict], tasks: Iterable[str], max_items: int | None) -> list[dict]:
    """Rows of ``tasks``, at most ``max_items`` per task; spoken_qa only where the question is spoken."""
    taken: dict[str, int] = {}
    out = []
    for r in rows:
        t = r["task"]
        if t == "spoken_qa" and r["input_modality"] != "speech":
            continue
        if t in tasks and (max_items is None or taken.get(t, 0) < max_items):
            taken[t] = taken.get(t, 0) + 1
            out.append(r)
    return out


@torch.no_grad()
def evaluate(model: DeepOmniModel, rows: list[dict], cfg: EvalConfig | None = None, codec=None,
             judge: Judge | None = None) -> tuple[dict, list[dict]]:
    """``(metrics, per-item records)`` of ``model`` on tokenized ``rows`` (see the module doc). Speech is
    decoded and judged when ``cfg.speech`` and both a ``codec`` and a ``judge`` are given."""
    cfg = cfg or EvalConfig()
    tok = load_tokenizer(cfg.tokenizer, model.cfg.text_vocab_size)
    model.eval()
    K = model.layout.num_codec_channels
    judged = cfg.speech and K > 0 and codec is not None and judge is not None
    records = []
    for row in select_rows(rows, cfg.tasks, cfg.max_items):
        task = row["task"]
        rec = {"id": row["id"], "task": task, "input_modality": row["input_modality"], "reference": row["answer_text"]}
        speech_out = judged and task in SPEECH_OUT_TASKS and int(row.get("answer_frames") or 0) > 0
        gen = answer_item(model, tok, row, speech_out, cfg)
        rec["prediction"], rec["steps"] = tok.decode(gen.text_ids), gen.steps
        if task == "asr":
            rec["word_edits"], rec["reference_words"] = word_edits(row["answer_text"], rec["prediction"])
        elif task != "tts":
            rec["correct"] = exact_match(rec["prediction"], row["answer_text"])
        if task == "spoken_qa":  # the same question typed
            typed = tok.decode(answer_item(model, tok, row, False, cfg, typed=True).text_ids)
            rec["typed_prediction"], rec["typed_correct"] = typed, exact_match(typed, row["answer_text"])
        if speech_out:
            heard = judge.transcribe(codec.decode(gen.codes_KF), codec.sample_rate) if gen.frames else ""
            floor = judge.transcribe(codec.decode(reference_codes(row)), codec.sample_rate)
            rec.update(frames=len(gen.frames), heard=heard, reference_heard=floor)
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
    sqa = [r for r in records if r["task"] == "spoken_qa"]
    asr = [r for r in records if r["task"] == "asr"]
    codec = [r for r in records if "codec_total" in r]
    spoken = [r for r in records if "heard" in r and normalize(r["prediction"]) and normalize(r["reference"])]
    edits, words = sum(r["word_edits"] for r in asr), sum(r["reference_words"] for r in asr)
    hits, total = sum(r["codec_hits"] for r in codec), sum(r["codec_total"] for r in codec)
    text_tf = [r for r in records if r["task"] == "text_qa" and r.get("text_total")]
    n_text_tf = sum(r["text_total"] for r in text_tf)
    metrics = {
        "text_qa_accuracy": _mean(text),
        "spoken_qa_accuracy": _mean([r["correct"] for r in sqa]),
        "spoken_qa_typed_accuracy": _mean([r["typed_correct"] for r in sqa]),
        "asr_wer": edits / words if words else None,
        # the judge against what the model wrote (its own text); items whose text is empty cannot be scored
        "tts_consistency_wer": wer([r["prediction"] for r in spoken], [r["heard"] for r in spoken]) if spoken else None,
        "judge_floor_wer": wer([r["reference"] for r in spoken], [r["reference_heard"] for r in spoken]) if spoken else None,
        "codec_accuracy": hits / total if total else None,
        "text_qa_token_accuracy": sum(r["text_hits"] for r in text_tf) / n_text_tf if n_text_tf else None,
    }
    counts = {"text_qa_accuracy": len(text), "spoken_qa_accuracy": len(sqa), "spoken_qa_typed_accuracy": len(sqa),
              "asr_wer": len(asr), "tts_consistency_wer": len(spoken), "judge_floor_wer": len(spoken),
              "codec_accuracy": len(codec), "text_qa_token_accuracy": len(text_tf)}
    spoken_out = [r for r in records if "heard" in r]
    return {**metrics, "items": counts, "codec_tokens": total, "asr_reference_words": words,
            "speech_answers": len(spoken_out), "speech_answers_with_text": len(spoken)}


def compare(metrics: dict, base: dict | None) -> dict:
    """Add the base's text ability and the relative text drop (docs/paper.md "Evaluation": (base - model) / base)."""
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
        lines.append(f"| {k} | {_fmt(m[k])} | {m['items'][k]} | {'lower' if k in LOWER_IS_BETTER else 'higher'} |")
    if "text_drop" in m:
        lines.append(f"| base_text_qa_accuracy | {_fmt(m['base_text_qa_accuracy'])} | {m['items']['text_qa_accuracy']} | higher |")
        lines.append(f"| text_drop = (base - model) / base | {_fmt(m['text_drop'])} | | lower |")
        lines.append(f"| text_token_drop (same, on token accuracy) | {_fmt(m['text_token_drop'])} | | lower |")
    lines += ["", "Definitions: `deepomni/train/evaluate.py` (module docstring).", ""]
    return "\n".join(lines)


def corpus_judge(data: str | Path) -> Judge:
    """The domain judge on every question and answer text of ``data``'s raw corpus (all splits)."""
    from ..data.schema import read_raw

    table = read_raw(Path(data) / "raw", validate=False)
    texts = [t for c in ("question_text", "answer_text") for t in table.column(c).to_pylist() if t]
    return Judge(vocabulary_texts=texts)


def data_codec(data: str | Path):
    """The codec the data was prepared with (``prepare_summary.json``), or None when it is not recorded."""
    from ..codec import load_codec

    spec = prepare_summary(data).get("codec")
    return load_codec(spec) if spec else None


def run(checkpoint: str | Path, data: str | Path, out: str | Path, base: str | Path | None = None,
        split: str = "test", cfg: EvalConfig | None = None, judge: Judge | None = None,
        base_metrics: dict | None = None) -> dict:
    """Evaluate ``checkpoint`` (and ``base`` on text_qa, unless its ``base_metrics`` are given) and write
    ``eval.json``, ``eval.md``, ``items.jsonl``. Speech answers are decoded with the data's codec and
    judged by ``judge`` (default: :func:`corpus_judge`)."""
    from ..checkpoint import load_model

    cfg = cfg or EvalConfig()
    rows = read_rows(data, split)
    model, _ = load_model(checkpoint)
    codec = data_codec(data) if cfg.speech else None
    if codec is not None and judge is None:
        judge = corpus_judge(data)
    metrics, records = evaluate(model, rows, cfg, codec, judge)
    if base is not None and base_metrics is None:
        base_model, _ = load_model(base)
        base_cfg = dataclasses.replace(cfg, tasks=(TEXT_QA,))
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
