"""Pretrain a small Whisper-architecture speech encoder (CTC on characters) for the embedded default to freeze.

The paper reads speech with a *pretrained, frozen* Whisper encoder. Nothing can be downloaded here, so the
embedded default trains its own: transformers' ``WhisperEncoder`` (same architecture, same log-mel features
as :class:`deepomni.audio.LogMel`) plus a linear CTC head over characters, on the (audio, transcript) pairs
of the built-in corpus; then the head is dropped and the encoder frozen, exactly as the paper freezes
Whisper. Real runs skip this and point ``speech_encoder.path`` at a local Whisper directory.

The output directory is a local Whisper encoder directory that
``build_whisper_encoder(SpeechEncoderConfig(path=out))`` (or :func:`deepomni.model.speech.speech_encoder_config`)
loads unchanged: ``config.json`` (``WhisperConfig``) and ``model.safetensors`` (``encoder.*``), plus
``ctc_head.safetensors``, ``ctc_vocab.json`` and ``pretrain.json`` (config, loss curve, held-out CER/WER,
wall times, utterances and audio hours).

    deepomni train-encoder --data data/synth --out data/speech_encoder
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jiwer
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..audio import WHISPER_SAMPLE_RATE, LogMel, load_audio
from ..data.content import transcript
from ..model.speech import (CTC_BLANK, CTC_HEAD_FILE, CTC_VOCAB, CTC_VOCAB_FILE, MEL_FRAMES_PER_ENCODER_FRAME,
                            ctc_head_state_dict, encode_frames, whisper_config)
from .config import EncoderPretrainConfig

# CTC output alphabet (deepomni.model.speech, which reads the head with positions="ctc")
BLANK, VOCAB = CTC_BLANK, CTC_VOCAB
CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB)}

# families whose spoken answer is not its answer_text read aloud: the audio spells letter names
# ("C, A, T.") while the text is "c a t"; CTC would learn "see" -> "c", which the question audio contradicts
_SKIP_ANSWER_FAMILIES = ("spell", "letter")

# the architecture fields shared with :class:`deepomni.config.SpeechEncoderConfig` (a preset's encoder)
ARCH_FIELDS = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
               "max_source_positions")


# -------------------------------------------------------------------------------------------- text

def encode_text(text: str) -> list[int]:
    """Transcript-normalised character ids (no blank)."""
    return [CHAR_TO_ID[c] for c in transcript(text)]


def ctc_greedy_decode(logits_BTV: torch.Tensor, lengths_B: list[int]) -> list[str]:
    """Best path: argmax per frame, merge repeats, drop blanks."""
    ids_BT = logits_BTV.argmax(-1).tolist()
    out = []
    for ids, n in zip(ids_BT, lengths_B):
        chars, prev = [], 0
        for i in ids[:n]:
            if i != prev and i != 0:
                chars.append(VOCAB[i])
            prev = i
        out.append(" ".join("".join(chars).split()))
    return out


def error_rates(refs: list[str], hyps: list[str]) -> dict[str, float]:
    """Corpus-level CER and WER (jiwer: sum of edits / sum of reference units)."""
    return {"cer": float(jiwer.cer(refs, hyps)), "wer": float(jiwer.wer(refs, hyps))}


# -------------------------------------------------------------------------------------------- data

@dataclass
class Utterances:
    """Featurised (audio, transcript) pairs, all in memory: ``mel_NMT`` is padded to the encoder window
    (exactly what LogMel gives the model later) and kept in float16 (80 x 800 x 2 bytes = 128 KB per utterance
    at the defaults: 30k utterances in 3.8 GB); :meth:`mel` gives the model float32 rows."""

    mel_NMT: torch.Tensor
    mel_frames: list[int]
    targets: list[list[int]]  # character ids
    texts: list[str]  # normalised transcripts
    seconds: float  # audio in total
    # each utterance's voice group: its held-out group (the speech corpus of deepomni.foundations) or its
    # voice (``engine/name``); evaluation reports CER/WER per group
    groups: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)

    def mel(self, idx: Any, frames: int | None = None) -> torch.Tensor:
        """Rows ``idx`` (an index, slice or list) as float32 ``mel_BMT``, cut to their first ``frames``."""
        return self.mel_NMT[idx, :, :frames].float()


def _voice_group(meta: dict) -> str:
    voice = meta.get("question_voice") or {}
    return meta.get("held_out_group") or f"{voice.get('engine', 'espeak-ng')}/{voice.get('name', '?')}"


def _pairs(data_dir: str | Path, split: str, cfg: EncoderPretrainConfig, train: bool,
           max_items: int | None) -> list[tuple[bytes, str, str]]:
    """(encoded audio, text, voice group) triples of one split's rows."""
    from ..data.schema import read_raw

    table = read_raw(Path(data_dir) / "raw" / split)
    if max_items is not None:
        table = table.slice(0, max_items)
    cols = ["task", "question_text", "question_audio", "answer_text", "answer_audio", "meta"]
    pairs = []
    for r in table.select(cols).to_pylist():
        meta = json.loads(r["meta"])
        if not train:
            if r["task"] in cfg.eval_tasks and r["question_audio"] is not None:
                pairs.append((r["question_audio"], r["question_text"], _voice_group(meta)))
            continue
        if cfg.use_question_audio and r["question_audio"] is not None:
            pairs.append((r["question_audio"], r["question_text"], _voice_group(meta)))
        if (cfg.use_answer_audio and r["answer_audio"] is not None
                and meta.get("family") not in _SKIP_ANSWER_FAMILIES):
            voice = meta.get("answer_voice") or {}
            pairs.append((r["answer_audio"], r["answer_text"], f"{voice.get('engine', 'espeak-ng')}/{voice.get('name', '?')}"))
    return pairs


def load_utterances(data_dir: str | Path, split: str, cfg: EncoderPretrainConfig, train: bool = True,
                    max_items: int | None = None) -> tuple[Utterances, int]:
    """Decode and featurise a split's pairs with the project's :class:`LogMel` -> (utterances, number
    skipped because they are longer than the encoder window or have an empty transcript)."""
    logmel = LogMel(cfg.num_mel_bins, cfg.max_source_positions)
    mels, frames, texts, groups, seconds, skipped = [], [], [], [], 0.0, 0
    wavs: list[np.ndarray] = []

    def featurise() -> None:  # bounded extractor batches: never all the waveforms in memory at once
        mel_BMT, n = logmel(wavs)
        mels.append(mel_BMT.half())
        frames.extend(n)
        wavs.clear()

    for audio, text, group in _pairs(data_dir, split, cfg, train, max_items):
        wav = load_audio(audio, WHISPER_SAMPLE_RATE)
        norm = transcript(text)
        if len(wav) > logmel.max_samples or not norm:
            skipped += 1
            continue
        wavs.append(wav)
        texts.append(norm)
        groups.append(group)
        seconds += len(wav) / WHISPER_SAMPLE_RATE
        if len(wavs) == 64:
            featurise()
    if wavs:
        featurise()
    if not texts:
        raise ValueError(f"no usable (audio, text) pairs in {data_dir}/raw/{split}")
    utts = Utterances(torch.cat(mels), frames, [encode_text(t) for t in texts], texts, seconds, groups)
    return utts, skipped


def _spec_augment(mel_BMT: torch.Tensor, frames: list[int], floor_B: torch.Tensor, cfg: EncoderPretrainConfig,
                  gen: torch.Generator) -> torch.Tensor:
    """Mask random time spans and mel bands of each item (on a copy), filled with its silence level
    ``floor_B`` (LogMel clamps each utterance at its max - 8 in log10 units: the padding's value)."""
    if not (cfg.time_masks or cfg.freq_masks):
        return mel_BMT
    mel_BMT = mel_BMT.clone()
    M = mel_BMT.shape[1]
    for b, n in enumerate(frames):
        fill = floor_B[b]
        for _ in range(cfg.time_masks):
            w = int(torch.randint(0, cfg.time_mask_frames + 1, (1,), generator=gen))
            if 0 < w < n:
                t0 = int(torch.randint(0, n - w, (1,), generator=gen))
                mel_BMT[b, :, t0 : t0 + w] = fill
        for _ in range(cfg.freq_masks):
            w = int(torch.randint(0, cfg.freq_mask_bins + 1, (1,), generator=gen))
            if 0 < w < M:
                f0 = int(torch.randint(0, M - w, (1,), generator=gen))
                mel_BMT[b, f0 : f0 + w, :n] = fill
    return mel_BMT


# ------------------------------------------------------------------------------------------- model

class CTCEncoder(nn.Module):
    """WhisperEncoder + a linear CTC head over :data:`VOCAB` (the head is dropped after pretraining)."""

    def __init__(self, cfg: EncoderPretrainConfig):
        super().__init__()
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        hf_cfg = whisper_config(cfg.speech_encoder())
        hf_cfg.dropout = cfg.dropout
        self.encoder = WhisperEncoder(hf_cfg)
        self.head = nn.Linear(cfg.d_model, len(VOCAB))

    def forward(self, mel_BMT: torch.Tensor) -> torch.Tensor:
        """Full window (exactly ``2 * max_source_positions`` mel frames, the stock encoder's forward) or any
        shorter even number of frames (training on cut windows) -> ``logits_BTV`` at 50 Hz."""
        if mel_BMT.shape[-1] == self.encoder.config.max_source_positions * MEL_FRAMES_PER_ENCODER_FRAME:
            return self.head(self.encoder(mel_BMT).last_hidden_state)
        return self.head(encode_frames(self.encoder, mel_BMT))


def encoder_frames(mel_frames: int) -> int:
    return math.ceil(mel_frames / MEL_FRAMES_PER_ENCODER_FRAME)


def ctc_loss(logits_BTV: torch.Tensor, mel_frames: list[int], targets: list[list[int]]) -> torch.Tensor:
    """Mean over items of the CTC loss per target character, on each item's valid encoder frames only."""
    logp_TBV = logits_BTV.float().log_softmax(-1).transpose(0, 1)
    return F.ctc_loss(logp_TBV, torch.tensor([t for ts in targets for t in ts]),
                      torch.tensor([encoder_frames(n) for n in mel_frames]),
                      torch.tensor([len(t) for t in targets]), blank=0, reduction="mean", zero_infinity=True)


@torch.no_grad()
def evaluate(model: CTCEncoder, utts: Utterances, batch_size: int = 32) -> dict[str, Any]:
    """Greedy CTC transcripts of ``utts`` -> CER, WER, loss and a few examples."""
    was_training = model.training
    model.eval()
    hyps, losses = [], []
    for i in range(0, len(utts), batch_size):
        sl = slice(i, i + batch_size)
        logits_BTV = model(utts.mel(sl))
        frames = utts.mel_frames[sl]
        losses.append(float(ctc_loss(logits_BTV, frames, utts.targets[sl])) * len(frames))
        hyps += ctc_greedy_decode(logits_BTV, [encoder_frames(n) for n in frames])
    model.train(was_training)
    by_group: dict[str, dict[str, Any]] = {}
    for g in sorted(set(utts.groups)):
        idx = [i for i, gi in enumerate(utts.groups) if gi == g]
        by_group[g] = {**error_rates([utts.texts[i] for i in idx], [hyps[i] for i in idx]), "utterances": len(idx)}
    return {**error_rates(utts.texts, hyps), "loss": sum(losses) / len(utts), "utterances": len(utts),
            "by_group": by_group if len(by_group) > 1 else {},
            "examples": [{"ref": r, "hyp": h} for r, h in list(zip(utts.texts, hyps))[:5]]}


def _lr_at(step: int, cfg: EncoderPretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ------------------------------------------------------------------------------------------- train

def _epoch_batches(mel_frames: list[int], cfg: EncoderPretrainConfig, gen: torch.Generator) -> list[list[int]]:
    """One epoch of batches (popped from the end), each item once: shuffle, sort each run of
    ``bucket * batch_size`` items by length, cut into batches, shuffle the batches. A last short batch is
    dropped (its items come first in the next epoch's shuffle anyway)."""
    order = torch.randperm(len(mel_frames), generator=gen).tolist()
    B = min(cfg.batch_size, len(order))
    batches = []
    for i in range(0, len(order), B * cfg.bucket):
        group = sorted(order[i : i + B * cfg.bucket], key=lambda j: mel_frames[j])
        batches += [group[k : k + B] for k in range(0, len(group) - B + 1, B)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[p] for p in perm]


def train_ctc(cfg: EncoderPretrainConfig, utts: Utterances, progress: bool = True,
              every: Callable[[int, CTCEncoder], None] | None = None) -> tuple[CTCEncoder, list[float]]:
    """Train a fresh :class:`CTCEncoder` on ``utts`` for ``cfg.steps`` steps -> (model in eval mode, losses).
    ``every(step, model)`` is called after each ``cfg.eval_every``-th step (for a held-out curve)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = CTCEncoder(cfg)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    gen = torch.Generator().manual_seed(cfg.seed)
    window = cfg.max_source_positions * MEL_FRAMES_PER_ENCODER_FRAME
    batches: list[list[int]] = []
    losses: list[float] = []
    model.train()
    from tqdm import tqdm

    with tqdm(total=cfg.steps, desc="encoder ctc", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for step in range(cfg.steps):
            if not batches:
                batches = _epoch_batches(utts.mel_frames, cfg, gen)
            idx = batches.pop()
            frames = [utts.mel_frames[i] for i in idx]
            # cut window: the longest item's frames rounded up to 8 (even, as the stride-2 conv needs)
            T = min(window, -(-max(frames) // 8) * 8) if cfg.crop_to_batch else window
            floor_B = utts.mel_NMT[idx].amin(dim=(1, 2)).float()
            mel_BMT = _spec_augment(utts.mel(idx, T), frames, floor_B, cfg, gen)
            loss = ctc_loss(model(mel_BMT), frames, [utts.targets[i] for i in idx])
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
            if every is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                every(step + 1, model)
    return model.eval(), losses


def save_encoder_dir(model: CTCEncoder, out_dir: str | Path) -> None:
    """Write ``out_dir`` as a local Whisper encoder directory (+ the CTC head and its vocabulary)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.encoder.config.save_pretrained(out)
    enc = {f"encoder.{k}": v.detach().contiguous() for k, v in model.encoder.state_dict().items()}
    save_file(enc, str(out / "model.safetensors"), metadata={"format": "pt"})
    head = {k: v.detach().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, str(out / CTC_HEAD_FILE), metadata={"format": "pt"})
    (out / CTC_VOCAB_FILE).write_text(json.dumps({"blank": 0, "tokens": list(VOCAB)}, indent=1) + "\n")


def load_ctc_encoder(directory: str | Path) -> CTCEncoder:
    """A directory :func:`save_encoder_dir` wrote (encoder + CTC head; bf16 files are read into float32),
    in eval mode: transcribes with :func:`transcribe`."""
    from safetensors.torch import load_file
    from transformers import WhisperConfig

    d = Path(directory)
    hf = WhisperConfig.from_pretrained(d)
    cfg = EncoderPretrainConfig(num_mel_bins=hf.num_mel_bins, d_model=hf.d_model, encoder_layers=hf.encoder_layers,
                                encoder_attention_heads=hf.encoder_attention_heads, encoder_ffn_dim=hf.encoder_ffn_dim,
                                max_source_positions=hf.max_source_positions)
    head = ctc_head_state_dict(str(d))  # checks the vocabulary first
    model = CTCEncoder(cfg)
    enc = {k.removeprefix("encoder."): v.float() for k, v in load_file(str(d / "model.safetensors")).items()}
    model.encoder.load_state_dict(enc, strict=True)
    model.head.load_state_dict(head)
    return model.eval()


@torch.no_grad()
def transcribe(model: CTCEncoder, wavs: list[np.ndarray]) -> list[str]:
    """Greedy CTC transcripts of 16 kHz waveforms (each at most the encoder window)."""
    cfg = model.encoder.config
    mel_BMT, frames = LogMel(cfg.num_mel_bins, cfg.max_source_positions)(wavs)
    return ctc_greedy_decode(model(mel_BMT), [encoder_frames(n) for n in frames])


def _curve(losses: list[float], points: int = 20) -> list[dict[str, float]]:
    """The loss curve at ~``points`` evenly spaced steps, each the mean of the steps since the previous one."""
    edges = sorted({round(i * len(losses) / points) for i in range(points + 1)})
    return [{"step": b, "loss": round(sum(losses[a:b]) / (b - a), 4)} for a, b in zip(edges, edges[1:])]


def pretrain_encoder(cfg: EncoderPretrainConfig, data_dir: str | Path, out_dir: str | Path,
                     progress: bool = True) -> dict[str, Any]:
    """Featurise the corpus, train encoder + CTC head, evaluate held out, write ``out_dir``; returns the
    summary also written to ``out_dir/pretrain.json``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(cfg, data_dir, out_dir, progress)
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: leave it as the caller had it


def _pretrain(cfg: EncoderPretrainConfig, data_dir: str | Path, out_dir: str | Path, progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    train, train_skipped = load_utterances(data_dir, cfg.train_split, cfg, True, cfg.max_items)
    held, held_skipped = load_utterances(data_dir, cfg.eval_split, cfg, False, cfg.eval_max_items)
    t_feat = time.perf_counter()
    longest = max(max(train.mel_frames), max(held.mel_frames)) / 100
    if progress:
        print(f"[encoder] {len(train)} train utterances ({train.seconds / 3600:.3f} h, longest "
              f"{longest:.2f} s of a {cfg.max_source_positions * 2 / 100:g} s window), {len(held)} held out; "
              f"features in {t_feat - t0:.1f} s")
    curve: list[dict[str, Any]] = []  # held-out figures along training: {"step", "cer", "wer", "loss"}

    def point(step: int, r: dict[str, Any]) -> None:
        curve.append({"step": step, **{k: round(r[k], 4) for k in ("cer", "wer", "loss")}})

    def held_out(step: int, model: CTCEncoder) -> None:
        r = evaluate(model, held, cfg.eval_batch_size)
        point(step, r)
        if progress:
            from tqdm import tqdm

            tqdm.write(f"[encoder] step {step}: held-out CER {r['cer']:.3f} WER {r['wer']:.3f}")

    model, losses = train_ctc(cfg, train, progress, every=held_out)
    t_train = time.perf_counter()
    result = evaluate(model, held, cfg.eval_batch_size)
    point(cfg.steps, result)
    t_eval = time.perf_counter()
    save_encoder_dir(model, out_dir)
    k = max(1, min(20, len(losses) // 10))
    summary = {
        "config": dataclasses.asdict(cfg),
        "data": {"dir": str(data_dir), "train_utterances": len(train),
                 "train_audio_hours": round(train.seconds / 3600, 4), "train_skipped": train_skipped, "eval_utterances": len(held),
                 "eval_audio_hours": round(held.seconds / 3600, 4), "eval_skipped": held_skipped,
                 "longest_seconds": longest},
        "loss": {"first": round(sum(losses[:k]) / k, 4), "last": round(sum(losses[-k:]) / k, 4),
                 "curve": _curve(losses)},
        "eval": {"split": cfg.eval_split, "tasks": list(cfg.eval_tasks), **result},
        "eval_curve": curve,
        "params": sum(p.numel() for p in model.encoder.parameters()),
        "wall_seconds": {"features": round(t_feat - t0, 2), "train": round(t_train - t_feat, 2),
                         "eval": round(t_eval - t_train, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    (Path(out_dir) / "pretrain.json").write_text(json.dumps(summary, indent=1) + "\n")
    if progress:
        print(f"[encoder] loss {summary['loss']['first']:.3f} -> {summary['loss']['last']:.3f} in "
              f"{summary['wall_seconds']['train']:.1f} s; held-out CER {result['cer']:.3f} WER {result['wer']:.3f} "
              f"({len(held)} utterances); wrote {out_dir}")
    return summary
