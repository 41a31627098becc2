"""``deepomni foundations build``: the two things a real run downloads, made here from nothing, reproducibly.

A real DeepTalk run starts from a pretrained LLM (DeepSeek-V2-Lite) and a pretrained Whisper. Nothing can
be downloaded here, so this command builds small stand-ins the way those were built, and the project ships
the result (``deepomni/foundations/<name>/``, :mod:`deepomni.foundations`):

1. **speech corpus** (:mod:`.speech_corpus`): hours of speech, hundreds of voices, held-out voices;
2. **speech encoder**: a Whisper-architecture encoder CTC-pretrained on it (:mod:`deepomni.train.encoder`),
   frozen from then on; its held-out WER per voice group is measured;
3. **base LLM** (:mod:`.text_corpus`): the model preset's backbone trained on text (``text_pretrain`` on
   Ray Train): the built-in world and reading, copying and spelling; its held-out figures are measured
   (knowledge in unseen phrasings, transcribing and copying unseen sentences, spelling unseen words);
4. **export**: both as bf16 safetensors (the base without the encoder, which it reads from ``../encoder``)
   and ``manifest.json``: the command, seed, data summary, sha256 of every file, the figures, the machine
   time of every step.

    deepomni foundations build --out deepomni/foundations/small      # the shipped set (~2 h on 2 cores)
    deepomni foundations verify                                       # sha256 of the shipped files

Intermediate work (corpus, checkpoints) goes to ``--work``; a step whose output is there is skipped, so an
interrupted build continues.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..config import configclass, load_preset
from ..weights import has_weights



@configclass()
class FoundationsConfig:
    """``deepomni foundations build``: what to build and how long to train it."""

    out: str = "runs/foundations/small"  # the foundation set written (the shipped one: deepomni/foundations/small)
    work: str = "runs/foundations/work"  # corpora and training runs (resumable)
    preset: str = "small"  # model preset: the base's backbone and the encoder's architecture
    seed: int = 0
    world_seed: int = 0  # the built-in world the base learns (every corpus that tests it uses the same)
    speech_utterances: int = 30_000  # encoder corpus, train split (~22 h)
    held_out_utterances: int = 40  # encoder corpus, test split, per held-out voice group
    encoder_steps: int = 20_000
    encoder_batch_size: int = 16
    encoder_lr: float = 3e-3
    # the build runs alone: both cores (EncoderPretrainConfig's default of 1 thread is for runs beside others)
    encoder_threads: int = 2
    # SpecAugment masks per training item (EncoderPretrainConfig.time_masks/freq_masks): against learning
    # the training voices and transcripts by heart over many epochs
    encoder_time_masks: int = 2
    encoder_freq_masks: int = 2
    base_rows: int = 60_000  # rows of the base's text corpus
    base_steps: int = 4000
    base_batch_size: int = 16
    base_lr: float = 3e-3
    eval_items: int = 50  # held-out items per base figure (knowledge: every fact)


# ------------------------------------------------------------------------------------------- steps

class Build:
    def __init__(self, cfg: FoundationsConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.work, self.out = Path(cfg.work).resolve(), Path(cfg.out).resolve()
        self.model_cfg = load_preset(cfg.preset)
        self.times: dict[str, float] = {}

    def step(self, name: str, done: bool, fn) -> None:
        """Run ``fn`` unless ``done``; its wall time is kept in ``<work>/times.json``, so a resumed build's
        manifest still has the time of the steps an earlier run did."""
        times_file = self.work / "times.json"
        kept = json.loads(times_file.read_text()) if times_file.exists() else {}
        if done:
            print(f"[foundations] {name}: done before, skipped", flush=True)
            if name in kept:
                self.times[name] = kept[name]
            return
        print(f"[foundations] {name} ...", flush=True)
        t0 = time.perf_counter()
        fn()
        self.times[name] = kept[name] = round(time.perf_counter() - t0, 1)
        times_file.parent.mkdir(parents=True, exist_ok=True)
        times_file.write_text(json.dumps(kept, indent=1) + "\n")
        print(f"[foundations] {name}: {self.times[name]:.0f} s", flush=True)

    # ---- the speech encoder
    def speech_corpus(self) -> None:
        from .speech_corpus import SpeechCorpusConfig, synthesize_speech_corpus

        c = self.cfg
        scfg = SpeechCorpusConfig(seed=c.seed, world_seed=c.world_seed, train_utterances=c.speech_utterances,
                                  test_utterances_per_voice=c.held_out_utterances)
        self.step("speech corpus", (self.work / "speech" / "summary.json").exists(),
                  lambda: synthesize_speech_corpus(scfg, self.work / "speech", progress=self.progress))

    def encoder_config(self):
        from ..train.encoder import ARCH_FIELDS, EncoderPretrainConfig

        arch = self.model_cfg.speech_encoder
        return EncoderPretrainConfig(seed=self.cfg.seed, steps=self.cfg.encoder_steps,
                                     batch_size=self.cfg.encoder_batch_size, lr=self.cfg.encoder_lr,
                                     threads=self.cfg.encoder_threads, time_masks=self.cfg.encoder_time_masks,
                                     freq_masks=self.cfg.encoder_freq_masks, eval_every=max(1, self.cfg.encoder_steps // 10),
                                     warmup_steps=max(1, min(200, self.cfg.encoder_steps // 20)),
                                     **{f: getattr(arch, f) for f in ARCH_FIELDS})

    def encoder(self) -> None:
        from ..train.encoder import pretrain_encoder

        d = self.work / "encoder"
        self.step("speech encoder (CTC)", (d / "pretrain.json").exists(),
                  lambda: pretrain_encoder(self.encoder_config(), self.work / "speech", d, progress=self.progress))

    # ---- the base LLM
    def base(self) -> None:
        import pyarrow as pa
        import ray.data

        from ..data.tokenized import TOKENIZED_SCHEMA
        from ..ray_env import init_ray
        from ..train.config import TrainConfig
        from ..train.loop import fit
        from .text_corpus import TextCorpusConfig, tokenized_rows

        c = self.cfg

        def train():
            rows = tokenized_rows(TextCorpusConfig(seed=c.seed, world_seed=c.world_seed, rows=c.base_rows),
                                  self.model_cfg)
            init_ray()
            tcfg = TrainConfig(run_name="base", storage_path=str(self.work / "runs"), stage="text_pretrain",
                               preset=c.preset, batch_size=c.base_batch_size, max_steps=c.base_steps, lr=c.base_lr,
                               min_lr_ratio=0.05, log_every=20, seed=c.seed)
            result = fit(tcfg, dataset=ray.data.from_arrow(pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)),
                         progress=self.progress)
            if result.error is not None:
                raise RuntimeError(f"base LLM training failed: {result.error}")

        self.step("base LLM (text_pretrain)", has_weights(self.base_final), train)

    @property
    def base_final(self) -> Path:
        return self.work / "runs" / "base" / "final"

    # ---- figures
    def encoder_figures(self) -> dict[str, Any]:
        summary = json.loads((self.work / "encoder" / "pretrain.json").read_text())
        ev = summary["eval"]
        return {"held_out_cer": round(ev["cer"], 4), "held_out_wer": round(ev["wer"], 4),
                "held_out_utterances": ev["utterances"],
                "by_voice_group": {g: {"cer": round(v["cer"], 4), "wer": round(v["wer"], 4), "utterances": v["utterances"]}
                                   for g, v in ev.get("by_group", {}).items()},
                "held_out_curve": summary.get("eval_curve", []),
                "loss_first": summary["loss"]["first"], "loss_last": summary["loss"]["last"],
                "train_audio_hours": summary["data"]["train_audio_hours"], "params": summary["params"],
                "examples": ev["examples"][:3]}

    def base_figures(self) -> dict[str, Any]:
        from ..checkpoint import load_model
        from .evaluate import base_abilities

        model, _ = load_model(self.base_final)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one-row decoding: a second thread gains nothing and stalls beside other work
        try:
            return base_abilities(model, self.cfg.world_seed, self.cfg.eval_items)
        finally:
            torch.set_num_threads(threads)

    # ---- export
    def export(self, figures: dict[str, Any]) -> None:
        from .files import MANIFEST, PARTS, export_set, sha256_files

        export_set(self.work / "encoder", self.base_final, self.out)
        c = self.cfg
        speech = json.loads((self.work / "speech" / "summary.json").read_text())
        manifest = {
            "name": self.out.name,
            "command": "deepomni foundations build " + " ".join(shlex.quote(a) for a in sys.argv[3:])
            if sys.argv[1:3] == ["foundations", "build"] else "deepomni foundations build (from Python)",
            "config": dict(c.__dict__),
            "seed": c.seed,
            "world_seed": c.world_seed,
            "model_preset": c.preset,
            "data": {"speech": {k: speech[k] for k in ("utterances", "audio_hours", "voices", "engines", "held_out")},
                     "text": {"rows": c.base_rows, "kinds": "knowledge, skill, transcribe, read (text_corpus.py)"}},
            "figures": figures,
            "machine": {"seconds": self.times, "total_seconds": round(sum(self.times.values()), 1),
                        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "torch": torch.__version__},
            "files": sha256_files(self.out),
        }
        (self.out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for part in PARTS:  # beside each part's weights: what made them, their sha256 and figures
            files = {rel.split("/", 1)[1]: meta for rel, meta in manifest["files"].items() if rel.startswith(part + "/")}
            summary = {"part_of": f"../{MANIFEST}", "command": manifest["command"], "seed": c.seed,
                       "world_seed": c.world_seed, "figures": figures[part], "files": files}
            (self.out / part / MANIFEST).write_text(json.dumps(summary, indent=1) + "\n")
        print(f"[foundations] wrote {self.out} ({sum(f['bytes'] for f in manifest['files'].values()) / 1e6:.1f} MB)")


def build(cfg: FoundationsConfig, progress: bool = True) -> dict[str, Any]:
    """Every step (skipping those done under ``cfg.work``), then the figures and the export; returns the
    figures."""
    b = Build(cfg, progress)
    b.speech_corpus()
    b.encoder()
    b.base()
    t0 = time.perf_counter()
    figures = {"encoder": b.encoder_figures(), "base": b.base_figures()}
    b.times["figures"] = round(time.perf_counter() - t0, 1)
    b.export(figures)
    print(json.dumps(figures, indent=1))
    return figures
