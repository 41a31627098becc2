"""Running the recipe (``stages.RECIPE`` and ``stages.BASELINES``) end to end in one directory: the driver
side of ``deepomni pipeline`` (``jobs.pipeline``) and ``benchmarks/recipe_table.py``.

    <out>/data/            the corpus (raw/), its tokenized shards and the built-in codec (codec/)
    <out>/encoder/         without foundations only: the speech encoder pretrained with CTC here (a local
                           Whisper directory), when the preset has no Whisper directory of its own
    <out>/runs/<run>/final every training step's model;  <out>/profile/<run>/ every profiling step's output
    <out>/pairs/<run>/     every preference-pair step's pairs.parquet and summary.json
    <out>/eval/<model>/    every evaluated model's eval.json / eval.md / items.jsonl

Each step is skipped when its output exists, so a re-run continues where the last one stopped.

**Foundations** (the default, ``--foundations small``): the recipe starts, as a real run does, from a
pretrained base LLM and a pretrained speech encoder, the set shipped under ``deepomni/foundations/``
(:mod:`deepomni.foundations`): the ``base`` step copies that base (encoder included) to ``runs/base/final``,
the corpus is drawn in the set's world (``SynthConfig.world_seed``), and prepared for its model. With
``--foundations none`` the pipeline builds both from the corpus first, in minutes (the old embedded default:
an encoder that hears little and a base that cannot read, docs/train.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from ..config import configclass
from ..weights import has_weights
from .config import SPEECH_EXPERTS, ProfileConfig
from .stages import BASELINES, MODELS, STAGES, Step, all_steps

# the table's columns: (header, eval.json metric); definitions in deepomni/train/evaluate.py
COLUMNS = (("text QA exact", "text_qa_accuracy"), ("relative text drop", "text_drop"),
           ("spoken QA exact", "spoken_qa_accuracy"), ("same questions typed", "spoken_qa_typed_accuracy"),
           ("ASR WER", "asr_wer"), ("TTS-consistency WER", "tts_consistency_wer"),
           ("judge floor WER", "judge_floor_wer"), ("codec acc", "codec_accuracy"))


@configclass()
class PipelineConfig:
    """``deepomni pipeline``: the whole recipe and its baselines in one working directory."""

    out: str = "runs/pipeline"  # working directory: data/, encoder/, runs/, profile/, eval/, summary.md
    config: str = "small"  # training preset or TrainConfig file, for every stage
    # the pretrained base LLM and speech encoder to start from: a shipped set's name or a set's directory
    # (deepomni/foundations/); "none": pretrain both here on the corpus first (minutes, and much weaker)
    foundations: str = "small"
    train_items: int = 1500  # items in the train split of the built-in corpus
    eval_items: int = 40  # held-out items per task
    steps_scale: float = 1.0  # multiply every stage's steps
    encoder_steps: int | None = None  # CTC pretraining steps of the speech encoder (None: its default)
    n_speech: str = SPEECH_EXPERTS  # speech experts per layer: a count or a percentage of the routed experts
    baselines: tuple[str, ...] = tuple(BASELINES)  # baselines to run besides the recipe (names or a,b,c)
    seed: int = 0  # seeds the corpus, the models and the random assignment

    def __post_init__(self) -> None:
        if self.foundations.lower() != "none":
            from ..foundations import locate

            locate(self.foundations)  # a wrong name fails now, naming the shipped sets
        self.baselines = tuple(b.strip() for item in self.baselines for b in item.split(",") if b.strip())
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"baselines: unknown {unknown}; expected some of {list(BASELINES)}")


class Pipeline:
    """The steps of one :class:`PipelineConfig` (``self.cfg``), each skipped when done before."""

    def __init__(self, cfg: PipelineConfig, progress: bool = True):
        from ..foundations import locate

        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out).resolve()
        self.foundations = None if cfg.foundations.lower() == "none" else locate(cfg.foundations)
        self.data, self.encoder = self.out / "data", self.out / "encoder"
        self.times: dict[str, float] = {}

    # ------------------------------------------------------------------------------------- plumbing
    def step(self, name: str, done: bool, fn: Callable[[], object]) -> None:
        if done:
            print(f"[pipeline] {name}: done before, skipped", flush=True)
            return
        t0 = time.perf_counter()
        print(f"[pipeline] {name} ...", flush=True)
        fn()
        self.times[name] = round(time.perf_counter() - t0, 1)
        print(f"[pipeline] {name}: {self.times[name]:.0f} s", flush=True)

    def final(self, run: str) -> Path:
        return self.out / "runs" / run / "final"

    def experts(self, profile_run: str) -> Path:
        return self.out / "profile" / profile_run / "experts.json"

    def pairs(self, pairs_run: str) -> Path:
        return self.out / "pairs" / pairs_run

    def train_config(self, stage: str, overrides: dict | None = None):
        from .config import TrainConfig

        cfg = TrainConfig.load(self.cfg.config, {"stage": stage, "seed": self.cfg.seed, **(overrides or {})})
        cfg.max_steps = max(1, round((cfg.max_steps or STAGES[stage].steps) * self.cfg.steps_scale))
        return cfg

    def runs(self, baselines: tuple[str, ...]) -> set[str]:
        return {s.run for s in all_steps(baselines)}

    def models(self, baselines: tuple[str, ...]) -> list[str]:
        """The table's models (:data:`MODELS`) that the recipe and ``baselines`` train."""
        runs = self.runs(baselines)
        return [m for m, run in MODELS.items() if run in runs]

    # ----------------------------------------------------------------------------------------- data
    def own_encoder_arch(self):
        """The preset's speech-encoder config when we pretrain the encoder here (no foundations, and the
        preset names no Whisper directory), else None."""
        from ..config import load_preset

        if self.foundations is not None:
            return None
        arch = load_preset(self.train_config("text_pretrain").preset).speech_encoder
        return arch if arch.path is None else None

    def model_preset(self) -> str:
        """The model config the data is prepared for: the foundation base's, else the training preset's."""
        if self.foundations is not None:
            return str(self.foundations / "base" / "config.json")
        return self.train_config("text_pretrain").preset

    def world_seed(self) -> int:
        if self.foundations is not None:
            from ..foundations import manifest

            return int(manifest(str(self.foundations))["world_seed"])
        return self.cfg.seed

    def prepare_data(self) -> None:
        from ..config import DataConfig
        from ..data.pipeline import prepare
        from ..data.synth import SynthConfig, synthesize

        # the test split holds ~eval_items items of each of asr / text_qa / spoken_qa (tts is 1/10 of items)
        c = self.cfg
        sizes = {"train": c.train_items, "validation": c.eval_items // 2, "test": c.eval_items * 10 // 3}
        self.step("synth", (self.data / "summary.json").exists(),
                  lambda: synthesize(SynthConfig(seed=c.seed, world_seed=self.world_seed(), sizes=sizes), self.data,
                                     progress=False))
        self.step("prepare", (self.data / "prepare_summary.json").exists(),
                  lambda: prepare(self.data / "raw", self.data,
                                  DataConfig(preset=self.model_preset(), seed=c.seed, codec_fit_items=100)))
        arch = self.own_encoder_arch()
        if arch is not None:
            from .encoder import ARCH_FIELDS, EncoderPretrainConfig, pretrain_encoder

            cfg = EncoderPretrainConfig(seed=c.seed, **{f: getattr(arch, f) for f in ARCH_FIELDS})
            if c.encoder_steps is not None:
                cfg.steps = c.encoder_steps
            self.step("pretrain speech encoder (CTC)", (self.encoder / "pretrain.json").exists(),
                      lambda: pretrain_encoder(cfg, self.data, self.encoder, progress=self.progress))

    # ------------------------------------------------------------------------------------- training
    def install_base(self) -> None:
        """The foundation base (its encoder read in) as this run's ``base`` checkpoint."""
        from ..checkpoint import load_model, save_model

        model, _ = load_model(self.foundations / "base")
        save_model(model, self.final("base"))

    def run_step(self, s: Step) -> None:
        from . import profile
        from .loop import fit

        if s.init is None and self.foundations is not None:
            self.step(f"base: the pretrained base LLM of {self.foundations}", has_weights(self.final(s.run)),
                      self.install_base)
            return

        if s.pairs:
            from .preference import PreferenceConfig, build_pairs

            self.step(f"preference pairs {s.run} (from {s.init})", (self.pairs(s.run) / "summary.json").exists(),
                      lambda: build_pairs(self.final(s.init), self.data, self.pairs(s.run),
                                          PreferenceConfig(seed=self.cfg.seed), progress=self.progress))
            return

        if s.is_profile:
            out = self.experts(s.run).parent
            how = "random" if s.random_assignment else "load" if s.score == "paper" else f"load, score {s.score}"
            self.step(f"profile {s.run} ({how})", self.experts(s.run).exists(),
                      lambda: profile.run(self.final(s.init), self.data, out, ProfileConfig(
                          n_speech=self.cfg.n_speech, random=s.random_assignment, seed=self.cfg.seed, score=s.score)))
            return

        def go():
            overrides = {"run_name": s.run, "storage_path": str(self.out / "runs"), "data": str(self.data),
                         "init": str(self.final(s.init)) if s.init else None,
                         "assignment": str(self.experts(s.assignment)) if s.assignment else None,
                         "pairs": str(self.pairs(s.preference)) if s.preference else None,
                         "new_experts": self.cfg.n_speech}  # MoExtend adds the share the recipe gives speech
            if s.init is None and self.own_encoder_arch() is not None:
                overrides["speech_encoder"] = str(self.encoder)
            cfg = self.train_config(s.stage, overrides)
            if s.steps_of:  # compute-matched: as many optimizer steps as those runs together
                cfg.max_steps = sum(self.train_config(self.stage_of(r)).max_steps for r in s.steps_of)
            result = fit(cfg, progress=self.progress)
            if result.error is not None:
                raise RuntimeError(f"step {s.run} (stage {s.stage}) failed: {result.error}")

        self.step(f"train {s.run} ({s.stage})", has_weights(self.final(s.run)), go)

    @staticmethod
    def stage_of(run: str) -> str:
        return next(s.stage for s in all_steps() if s.run == run)

    def train_all(self, baselines: tuple[str, ...]) -> None:
        for s in all_steps(baselines):
            self.run_step(s)

    # ----------------------------------------------------------------------------------- evaluation
    def evaluate_all(self, models: list[str]) -> dict[str, dict]:
        from . import evaluate

        base = self.final(MODELS["base"])
        cfg = evaluate.EvalConfig(max_items=self.cfg.eval_items, seed=self.cfg.seed)
        judge = None
        results = {}
        for name in ["base"] + [m for m in models if m != "base"]:  # the base first: the others' drop needs it
            ckpt, ev = self.final(MODELS[name]), self.out / "eval" / name
            if not (ev / "eval.json").exists() and judge is None:
                judge = evaluate.corpus_judge(self.data)  # built once, for every model
            self.step(f"evaluate {name}", (ev / "eval.json").exists(),
                      lambda: evaluate.run(ckpt, self.data, ev, base=None if name == "base" else base, cfg=cfg,
                                           judge=judge, base_metrics=None if name == "base" else results["base"]))
            results[name] = json.loads((ev / "eval.json").read_text())["metrics"]
        return {m: results[m] for m in models}

    @staticmethod
    def table(results: dict[str, dict]) -> str:
        """One Markdown row per model, the columns of :data:`COLUMNS`."""
        lines = ["| model | " + " | ".join(c for c, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for name, m in results.items():
            lines.append(f"| {name} | " + " | ".join("-" if m.get(k) is None else f"{m[k]:.3f}" for _, k in COLUMNS)
                         + " |")
        return "\n".join(lines)


def run_pipeline(cfg: PipelineConfig) -> str:
    """Every step of the recipe and the baselines (skipping those done before), then the evaluation table,
    written with the wall times to ``<out>/summary.md``; returns the table."""
    pipe = Pipeline(cfg)
    t_start = time.perf_counter()
    pipe.prepare_data()
    pipe.train_all(cfg.baselines)
    results = pipe.evaluate_all(pipe.models(cfg.baselines))
    wall = time.perf_counter() - t_start
    table = pipe.table(results)
    seeds = (f"One seed ({cfg.seed}), {cfg.eval_items} held-out items a task: differences between rows can be "
             "noise. The table over seeds with mean and spread, every baseline at full steps: "
             "benchmarks/results/recipe_table.md (made by `python -m benchmarks.recipe_table`).")
    (pipe.out / "summary.md").write_text(f"{table}\n\n{seeds}\n\nwall time {wall:.0f} s; steps: "
                                         f"{json.dumps(pipe.times)}\n")
    print(table)
    print(seeds)
    print(f"[pipeline] wall time {wall:.0f} s ({wall / 60:.1f} min); summary in {pipe.out / 'summary.md'}")
    return table
