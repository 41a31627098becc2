"""Preference data and loss for speech (DPO), as the DeepTalk paper's RL stage (docs/paper.md "Training stages").

Pairs: for each speech-out item of a split (tts, and spoken_qa with a spoken question) the policy answers
``samples`` times (text greedy, codec sampled top-k, one seed per sample); a sample counts only when its
text exact-matches the reference answer (:func:`deepomni.train.evaluate.exact_match`) and it has speech.
The judge (:func:`deepomni.train.evaluate.corpus_judge`) hears each one's codec-decoded audio; its WER
against the reference answer ranks them:

    chosen    the sample with the lowest WER      rejected   the one with the highest
    kept      when rejected_wer - chosen_wer >= min_gap (else the item is skipped: no preference to learn)

Both answers are rebuilt as training sequences exactly as the data pipeline builds a row
(:func:`deepomni.data.sequences.build_sequence`: the same prompt, the generated text ids, the sampled codes
under the delay pattern), and the frozen reference model (the policy before the stage, eval mode) scores
each: ``log pi_ref(y | x)`` summed per codec channel (:func:`sequence_logps`), stored with the pair.

Loss (per codec channel k, each its own term of weight 1, as the release weights its channel losses):

    m_k   = beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))   summed over channel k's labels
    dpo   = sum_k mean_B -logsigmoid(m_k)                                          beta = 0.1
    total = dpo + cross-entropy of the text channel on the chosen answers           (:func:`preference_loss`)

The text answer is the same (exact match) on both sides, so it carries no preference: it keeps its plain
cross-entropy, so the stage does not drift the text. A batch is ``chosen_rows + rejected_rows``
(:func:`split_pair`), collated by :func:`deepomni.train.loop.collate` into 2B rows: chosen first.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from ..atomic import write_atomic
from ..config import configclass
from ..data.schema import SPEECH_OUT_TASKS, SPOKEN_QA
from ..data.sequences import INSTRUCTIONS, build_sequence
from ..data.tokenized import TOKENIZED_SCHEMA, read_rows, row_tensors
from ..model.channels import IGNORE, VocabLayout
from ..model.generate import Generation, GenerationConfig, generate
from ..model.model import DeepOmniModel
from ..text import TextTokenizer, load_tokenizer
from . import evaluate as ev
from .profile import speech_input


@configclass()
class PreferenceConfig:
    """``build_pairs``: which items are sampled, how, and which pairs are kept (deepomni.train.preference)."""

    samples: int = 4  # sampled answers per item (at least 2 to make a pair)
    max_items: int = 128  # speech-out items of the split used, in file order
    split: str = "train"  # the split of the data directory to sample on
    min_gap: float = 0.2  # least judged WER difference between the chosen and the rejected answer
    top_k: int = 20  # codec tokens sampled among the top_k most likely (text is greedy)
    temperature: float = 1.0  # codec sampling temperature
    margin: int = 8  # decoding steps allowed beyond 1.5 x the reference answer
    seed: int = 0  # codec sampling; sample s of item i uses seed * 1_000_000 + i * samples + s
    tokenizer: str = "bytes"  # the tokenizer the data was prepared with ("bytes" | "hf:<dir>")


# -------------------------------------------------------------------------------------------- loss
def sequence_logps(logits: list[torch.Tensor], labels_BLC: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: per row and channel, the summed log-probability of the labelled tokens (``labels !=
    IGNORE``; labels are already the next-token targets), 0 where a channel has no label. ``logits``:
    the model's per-channel ``[B, L, V_c]``."""
    out = []
    for c, lg_BLV in enumerate(logits):
        lab_BL = labels_BLC[..., c].to(lg_BLV.device)
        keep_BL = lab_BL != IGNORE
        lp_BLV = F.log_softmax(lg_BLV.float(), dim=-1)
        tok_BL = lp_BLV.gather(-1, lab_BL.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append(torch.where(keep_BL, tok_BL, torch.zeros_like(tok_BL)).sum(dim=1))
    return torch.stack(out, dim=1)


def dpo_loss(policy_chosen_BK: torch.Tensor, policy_rejected_BK: torch.Tensor, ref_chosen_BK: torch.Tensor,
             ref_rejected_BK: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Per-channel DPO: ``sum_k mean_b -logsigmoid(beta * ((pc - rc) - (pr - rr)))`` and its stats
    (``dpo_loss``, ``reward_margin``: mean margin over (b, k), ``reward_accuracy``: share of margins > 0)."""
    ref_c, ref_r = ref_chosen_BK.to(policy_chosen_BK), ref_rejected_BK.to(policy_rejected_BK)
    margin_BK = beta * ((policy_chosen_BK - ref_c) - (policy_rejected_BK - ref_r))
    loss = -F.logsigmoid(margin_BK).mean(dim=0).sum()
    stats = {"dpo_loss": float(loss.detach()), "reward_margin": float(margin_BK.detach().mean()),
             "reward_accuracy": float((margin_BK.detach() > 0).float().mean())}
    return loss, stats


def reference_tensors(pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ref_chosen_BK, ref_rejected_BK)``: the stored reference log-probs of a batch of pair rows."""
    return (torch.tensor([p["ref_chosen_logps"] for p in pairs], dtype=torch.float32),
            torch.tensor([p["ref_rejected_logps"] for p in pairs], dtype=torch.float32))


def preference_loss(logits: list[torch.Tensor], labels_BLC: torch.Tensor, ref_chosen_BK: torch.Tensor,
                    ref_rejected_BK: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """The stage's loss on a collated ``chosen_rows + rejected_rows`` batch (2B rows, chosen first): the
    per-channel DPO of the codec channels + the text channel's cross-entropy on the chosen answers."""
    B = labels_BLC.shape[0] // 2
    logps_BC = sequence_logps(logits, labels_BLC)
    dpo, stats = dpo_loss(logps_BC[:B, 1:], logps_BC[B:, 1:], ref_chosen_BK, ref_rejected_BK, beta)
    text_lab_BL = labels_BLC[:B, :, 0].to(logits[0].device)
    text = F.cross_entropy(logits[0][:B].reshape(-1, logits[0].shape[-1]).float(), text_lab_BL.reshape(-1),
                           ignore_index=IGNORE)
    return dpo + text, {**stats, "text_loss": float(text.detach())}


# -------------------------------------------------------------------------------------------- pairs
def answer_sequence(row: dict, layout: VocabLayout, tok: TextTokenizer, text_ids: list[int],
                    codes_KF: torch.Tensor):
    """The training sequence of ``row``'s question with this answer, built as the data pipeline builds it
    (``deepomni.data.pipeline.SequenceStage``: question ids for text input, AUDIO positions for speech)."""
    speech_in = row["input_modality"] == "speech"
    return build_sequence(layout, row["task"], list(text_ids), tok.encode(INSTRUCTIONS[row["task"]]),
                          question_ids=None if speech_in else tok.encode(row["question_text"] or ""),
                          audio_positions=row["audio_positions"] if speech_in else None,
                          answer_codes_KF=codes_KF)


def pair_row(row: dict, layout: VocabLayout, tok: TextTokenizer, chosen: Generation, rejected: Generation,
             **extra) -> dict:
    """A pair row: ``row``'s fields with ``tokens``/``labels``/``length``/``num_channels``/``answer_frames``
    of the chosen answer, ``rejected_*`` of the rejected one, and ``extra`` fields (WERs, reference logps)."""
    out = dict(row)
    for prefix, gen in (("", chosen), ("rejected_", rejected)):
        seq = answer_sequence(row, layout, tok, gen.text_ids, gen.codes_KF)
        out.update({f"{prefix}tokens": seq.tokens_LC.reshape(-1).tolist(),
                    f"{prefix}labels": seq.labels_LC.reshape(-1).tolist(),
                    f"{prefix}length": seq.tokens_LC.shape[0], f"{prefix}answer_frames": len(gen.frames)})
    out["num_channels"] = layout.num_channels
    out.update(extra)
    return out


def split_pair(row: dict) -> tuple[dict, dict]:
    """``(chosen_row, rejected_row)``: two ordinary tokenized rows of a pair row (for ``loop.collate``)."""
    chosen = {k: v for k, v in row.items() if not k.startswith("rejected_")}
    rejected = {**chosen, "tokens": row["rejected_tokens"], "labels": row["rejected_labels"],
                "length": row["rejected_length"], "answer_frames": row["rejected_answer_frames"]}
    return chosen, rejected


@torch.no_grad()
def reference_logps(model: DeepOmniModel, row: dict) -> list[float]:
    """The codec channels' summed log-probs ``[K]`` of a tokenized row's labels under ``model``."""
    tokens_LC, labels_LC, mel_MT = row_tensors(row)
    out = model(tokens_LC.unsqueeze(0).to(model.embed.weight.device), audio=speech_input(model, row, mel_MT))
    return sequence_logps(out.logits, labels_LC.unsqueeze(0))[0, 1:].tolist()


def sample_answers(model: DeepOmniModel, tok: TextTokenizer, row: dict, cfg: PreferenceConfig,
                   item: int) -> list[Generation]:
    """``cfg.samples`` answers to one row: greedy text, codec sampled with one seed per sample."""
    prompt_LC, audio = ev.build_prompt(model, tok, row)
    bound = ev.step_bound(row, tok, model.layout.num_codec_channels, True, cfg.margin) + 1  # as evaluate
    gens = []
    for s in range(cfg.samples):
        gcfg = GenerationConfig(max_steps=bound, speech=True, seed=cfg.seed * 1_000_000 + item * cfg.samples + s,
                                top_k=cfg.top_k, temperature=cfg.temperature)
        gens.append(generate(model, prompt_LC, None if audio is None else audio[0], gcfg))
    return gens


def speech_out_rows(rows: list[dict], max_items: int) -> list[dict]:
    """Rows with a spoken answer (tts, spoken_qa with a spoken question), at most ``max_items``."""
    keep = [r for r in rows if r["task"] in SPEECH_OUT_TASKS and int(r.get("answer_frames") or 0) > 0
            and not (r["task"] == SPOKEN_QA and r["input_modality"] != "speech")]
    return keep[:max_items]


def pairs_schema() -> pa.Schema:
    """The tokenized schema with int64 token lists, float32 mel, and the pair's own fields."""
    wide = {"tokens": pa.list_(pa.int64()), "labels": pa.list_(pa.int64()), "mel": pa.list_(pa.float32())}
    fields = [pa.field(f.name, wide.get(f.name, f.type)) for f in TOKENIZED_SCHEMA]
    return pa.schema(fields + [
        ("rejected_tokens", pa.list_(pa.int64())), ("rejected_labels", pa.list_(pa.int64())),
        ("rejected_length", pa.int32()), ("rejected_answer_frames", pa.int32()),
        ("chosen_wer", pa.float64()), ("rejected_wer", pa.float64()),
        ("chosen_heard", pa.string()), ("rejected_heard", pa.string()),
        ("ref_chosen_logps", pa.list_(pa.float32())), ("ref_rejected_logps", pa.list_(pa.float32())),
    ])


def build_pairs(checkpoint: str | Path, data: str | Path, out: str | Path, cfg: PreferenceConfig | None = None,
                judge=None, codec=None, progress: bool = True) -> dict:
    """Sample, judge and pair answers of ``checkpoint`` on ``data``'s ``cfg.split`` (module doc); write
    ``<out>/pairs.parquet`` then ``<out>/summary.json`` and return the summary. ``codec`` defaults to the
    data's, ``judge`` to the domain judge of its corpus."""
    from tqdm import tqdm

    from ..checkpoint import load_model

    cfg = cfg or PreferenceConfig()
    if cfg.samples < 2:
        raise ValueError(f"samples={cfg.samples}: a pair needs at least 2 sampled answers per item")
    t0 = time.perf_counter()
    model, _ = load_model(checkpoint)
    model.eval()
    if model.layout.num_codec_channels == 0:
        raise ValueError(f"{checkpoint} has no codec channels: no speech to prefer")
    codec = codec if codec is not None else ev.data_codec(data)
    if codec is None:
        raise ValueError(f"{data} records no codec (prepare_summary.json): cannot decode the sampled speech")
    judge = judge if judge is not None else ev.corpus_judge(data)
    tok = load_tokenizer(cfg.tokenizer, model.cfg.text_vocab_size)
    rows = speech_out_rows(read_rows(data, cfg.split), cfg.max_items)
    counts = {"items": len(rows), "samples": 0, "matched": 0, "pairs": 0, "skipped_no_match": 0, "skipped_no_gap": 0}
    pairs = []
    for i, row in enumerate(tqdm(rows, desc="preference pairs", unit="item", disable=not progress)):
        gens = sample_answers(model, tok, row, cfg, i)
        counts["samples"] += len(gens)
        kept = [g for g in gens if g.frames and ev.exact_match(tok.decode(g.text_ids), row["answer_text"])]
        counts["matched"] += len(kept)
        if len(kept) < 2:
            counts["skipped_no_match"] += 1
            continue
        heard = [judge.transcribe(codec.decode(g.codes_KF), codec.sample_rate) for g in kept]
        wers = []
        for h in heard:
            edits, words = ev.word_edits(row["answer_text"], h)
            wers.append(edits / words)
        c = min(range(len(kept)), key=lambda j: wers[j])
        r = max(range(len(kept)), key=lambda j: wers[j])
        if wers[r] - wers[c] < cfg.min_gap:
            counts["skipped_no_gap"] += 1
            continue
        pair = pair_row(row, model.layout, tok, kept[c], kept[r], chosen_wer=wers[c], rejected_wer=wers[r],
                        chosen_heard=heard[c], rejected_heard=heard[r])
        chosen_row, rejected_row = split_pair(pair)
        pair["ref_chosen_logps"] = reference_logps(model, chosen_row)
        pair["ref_rejected_logps"] = reference_logps(model, rejected_row)
        pairs.append(pair)
    counts["pairs"] = len(pairs)
    if not pairs:
        raise ValueError(f"no preference pair could be built from {data} split={cfg.split}: {counts} (items with "
                         f"fewer than 2 samples matching the reference text: {counts['skipped_no_match']}; with a "
                         f"judged WER gap under min_gap={cfg.min_gap}: {counts['skipped_no_gap']})")
    summary = {**counts, "mean_chosen_wer": sum(p["chosen_wer"] for p in pairs) / len(pairs),
               "mean_rejected_wer": sum(p["rejected_wer"] for p in pairs) / len(pairs),
               "checkpoint": str(checkpoint), "data": str(data), "config": asdict(cfg),
               "wall_seconds": time.perf_counter() - t0}
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    tmp = o / f".pairs.parquet.tmp-{os.getpid()}"
    try:
        pq.write_table(pa.Table.from_pylist(pairs, schema=pairs_schema()), tmp)
        os.replace(tmp, o / "pairs.parquet")
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(o / "summary.json", json.dumps(summary, indent=1))  # last: its presence says "done"
    return summary


def read_pairs(directory: str | Path) -> list[dict]:
    """The pair rows of ``<directory>/pairs.parquet``."""
    return pq.read_table(Path(directory) / "pairs.parquet").to_pylist()
