"""The training side's configs (all loaded by :func:`deepomni.config.load_config`, flags derived from them):

    TrainConfig             one training stage on Ray Train      deepomni train      presets/train/
    ProfileConfig           modality load and expert choice      deepomni profile
    EvalConfig              held-out evaluation                  deepomni evaluate   presets/eval/
    EncoderPretrainConfig   CTC pretraining of the encoder       deepomni train-encoder

A training preset file holds the shared fields and an optional ``stages`` table of per-stage overrides
(``{"stages": {"s1_align": {"lr": 1e-3, "max_steps": 40}}}``); the stage's own values apply last, then
explicit command-line overrides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

from ..config import SpeechEncoderConfig, configclass, parse_config, read_config_source
from ..data.schema import ASR, SPOKEN_QA, TEXT_QA, TTS, Task

# speech experts per MoE layer, the one default of the recipe's profiling, the pipeline and MoExtend's added
# experts: a count or a percentage of the routed experts (the paper's DeepSeek-V2-Lite split: 16 of 64)
SPEECH_EXPERTS = "25%"
FailMode = Literal["exception", "kill", "hold"]
Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


@configclass()
class FaultInjection:
    """A failure the training job injects into itself, for the tests that exercise Ray Train's FailureConfig
    (:mod:`deepomni.train.fault_injection`; not a user setting): rank 0 fails once per run (a marker file in
    <storage>/<run>) when ``at_step`` steps are done."""

    at_step: int
    # "step": before the next step; "checkpoint": half way through copying that step's checkpoint to storage
    where: Literal["step", "checkpoint"] = "step"
    # "exception" raises, "kill" SIGKILLs its own process, "hold" writes its pid to <storage>/<run>/.held_worker
    # and waits (300 s) to be killed
    mode: FailMode = "exception"


@configclass("train")
class TrainConfig:
    run_name: str = "run"  # Ray Train run name; re-running the same name resumes from its latest checkpoint
    storage_path: str = "/tmp/deepomni-runs"  # Ray Train storage; final model at <storage>/<run>/final
    data: str = "data/synth"  # prepared dataset dir (<data>/tokenized/split=<split>/status=ok/*.parquet)
    split: str = "train"
    stage: str = "text_pretrain"  # deepomni.train.stages.STAGES
    init: str | None = None  # model checkpoint dir to start from; None: fresh model from `preset`
    preset: str = "tiny"  # model preset (only used when init is None)
    # a local Whisper(-encoder) directory whose frozen encoder a fresh model reads speech with (only used
    # when init is None; later stages carry the encoder in their checkpoint). None: the preset's encoder
    speech_encoder: str | None = None
    assignment: str | None = None  # experts.json; None: <init>/experts.json (needed by the S2 stages)
    num_workers: int = 1  # Ray Train workers (data parallel x expert parallel)
    cpus_per_worker: float = 1.0  # on 2-core machines keep <= 1 so Ray Data has room
    use_gpu: bool = False
    # where the workers go (Ray Train's ScalingConfig): the placement group strategy of their bundles (PACK: as
    # few nodes as fit; STRICT_SPREAD: one worker a node, e.g. expert parallelism across nodes) and a Ray label
    # selector every worker's node must match ({"node": "n1"} on cluster/local.sh's nodes; Ray's syntax:
    # "!head", "in(n1,n2)"). Rank r logs where it ran to <storage>/<run>/placement_rank<r>.jsonl
    placement: Placement = "PACK"
    worker_labels: dict[str, str] = field(default_factory=dict)
    ep_size: int = 1  # expert-parallel group size (divides num_workers and n_routed_experts)
    # MoExtend stages (Stage.extend): experts added to every MoE layer, a count or a percentage of the routed
    # experts of the init model (the share the recipe gives speech: the pipeline passes its n_speech)
    new_experts: str = SPEECH_EXPERTS
    # LoRA stages (Stage.lora): adapter rank and scale (peft's r and lora_alpha; the update is alpha/r * B A)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # preference stages (Stage.preference): the directory of pairs.parquet (deepomni.train.preference) and
    # DPO's beta (the release's 0.1)
    pairs: str | None = None
    dpo_beta: float = 0.1
    zero_stage: int = 2  # DeepSpeed ZeRO stage (ep_size == 1 path)
    batch_size: int = 4  # sequences per worker per step
    max_steps: int | None = None  # None: the stage's default
    lr: float | None = None  # None: the stage's (paper) learning rate
    warmup_ratio: float = 0.03  # linear warmup over this fraction of max_steps, then cosine to min_lr_ratio
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    log_every: int = 1  # steps between ray.train.report calls
    seed: int = 0
    max_failures: int = 0  # FailureConfig: worker failures tolerated (the run resumes from its checkpoint)
    max_items: int | None = None  # use only the first N rows of the split (tests, smoke runs)
    # testing only: a failure to inject (FaultInjection), e.g. --inject-fault '{"at_step": 5, "mode": "hold"}'
    inject_fault: FaultInjection | None = None
    # rank r appends {"step", "epoch", "ids", "loss", "time"} per step to <storage>/<run>/samples_rank<r>.jsonl;
    # after a resume the re-run steps appear again (the last record of a step is the one that counts)
    sample_log: bool = False
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-stage overrides (preset files)

    # ---------------------------------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        return parse_config(cls, d)

    @classmethod
    def load(cls, source: str | Path | Mapping[str, Any] | None,
             overrides: Mapping[str, Any] | None = None) -> "TrainConfig":
        """A preset name (``deepomni/presets/train``), a JSON/YAML file or a mapping, then the stage's table,
        then ``overrides`` (None values are skipped)."""
        d = read_config_source(source, cls.preset_kind)
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        stage = overrides.get("stage", d.get("stage", cls.stage))
        stages = d.get("stages", {})
        d.update(stages.get(stage, {}) if isinstance(stages, Mapping) else {})
        d.update(overrides)
        return parse_config(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from .stages import STAGES

        if self.stage not in STAGES:
            raise ValueError(f"stage: unknown stage {self.stage!r}; expected one of {sorted(STAGES)}")
        known = {f.name for f in dataclasses.fields(self)} - {"stages"}
        for name, table in self.stages.items():
            if name not in STAGES or set(table) - known:
                raise ValueError(f"stages.{name}: an unknown stage or fields {sorted(set(table) - known)}")
        if self.num_workers % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide num_workers={self.num_workers}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError("zero_stage must be 0, 1 or 2 (ZeRO-3 would shard the stacked experts)")
        stage = STAGES[self.stage]
        if (stage.lora or stage.extend) and self.ep_size > 1:
            raise ValueError(f"stage {self.stage} runs with ep_size 1 only (its experts change shape or are wrapped)")
        if stage.preference and not self.pairs:
            raise ValueError(f"stage {self.stage} trains on preference pairs: set pairs (a `deepomni pairs` output)")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, not {self.lora_rank}")


@configclass()
class ProfileConfig:
    """``deepomni profile``: measure modality load and choose the speech experts (deepomni.train.profile)."""

    n_speech: str = SPEECH_EXPERTS  # speech experts per layer: a count or a percentage of the routed experts
    split: str = "train"  # the split of the data directory to profile on
    max_items: int | None = None  # profile only the first N rows of the split
    random: bool = False  # draw the speech experts at random (the ablation); the load is still measured
    # the score experts are ranked by (deepomni.model.modality.SCORES): "paper" rho_A * (1 - rho_T), or
    # "difference" rho_A - rho_T (weighs the text load as much as the speech load)
    score: Literal["paper", "difference"] = "paper"
    seed: int = 0  # seed of random


@configclass("eval")
class EvalConfig:
    """``deepomni evaluate``: what to evaluate and how to decode (deepomni.train.evaluate)."""

    tokenizer: str = "bytes"  # the tokenizer the data was prepared with ("bytes" | "hf:<dir>")
    max_items: int | None = None  # per task (so every metric gets items), in file order
    margin: int = 8  # decoding steps allowed beyond 1.5 x the reference answer
    speech: bool = True  # decode and judge the speech of tts / spoken_qa answers (needs the data's codec)
    tasks: tuple[Task, ...] = (TEXT_QA, SPOKEN_QA, ASR, TTS)  # the tasks to evaluate, in this order
    seed: int = 0  # codec sampling
    # codec tokens are sampled among the top_k most likely (GenerationConfig.top_k); 1 is greedy, as the
    # official release decodes speech (docs/paper.md "The official release, tried")
    top_k: int = 20


@configclass()
class EncoderPretrainConfig:
    """Architecture, optimisation and data of one encoder pretraining run.

    The defaults were measured for a ~100 s training budget on a 2-core CPU with the built-in corpus
    (1200 items: ~950 utterances, 0.66 h): a small encoder taking many small steps beat wider or deeper
    ones taking fewer, larger steps (at a fixed time budget the number of updates is what CTC needs most).
    Twice the steps or twice the data left held-out CER where it was (~0.29): the bound is the corpus's
    vocabulary (test sentences use unseen templates and invented names), not compute."""

    # ---- architecture (transformers WhisperConfig encoder fields)
    num_mel_bins: int = 80
    d_model: int = 128
    encoder_layers: int = 3
    encoder_attention_heads: int = 4
    encoder_ffn_dim: int = 512
    # encoder window in 20 ms frames: WhisperEncoder only takes exactly 2 * this many mel frames, and every
    # speech item is padded to it in every training step of the whole project, so keep it just above the
    # longest utterance (the built-in corpus's longest question is ~6.2 s): 400 -> 8 s
    max_source_positions: int = 400
    # WhisperConfig.dropout (residual dropout), training only: the frozen encoder runs in eval mode.
    # 0.1 did not help within the budget
    dropout: float = 0.0

    # ---- optimisation
    steps: int = 1200  # ~100 s on one core of the 2-core reference machine (~0.086 s per step)
    batch_size: int = 4  # small batches: more updates per second; 8 and 16 learnt slower per second
    lr: float = 5e-3  # AdamW peak (3e-3 measured the same)
    warmup_steps: int = 30  # linear warmup, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    seed: int = 0
    # torch intra-op threads. 1, though the machine has 2 cores: with batches this small 2 threads gain
    # little, and when anything else runs on the machine 2 threads stall on each other (measured up to
    # 7x slower per step), while 1 thread degrades gracefully
    threads: int = 1
    # SpecAugment-style masking of the training log-mel (within each item's valid frames), filled with the
    # item's silence level. Off by default: within ~100 s it slowed learning (held-out CER 0.29 -> 0.38)
    # and at twice the steps it did not beat the unmasked run; worth trying for much longer runs
    time_masks: int = 0
    time_mask_frames: int = 10  # max width of one time mask in 10 ms mel frames
    freq_masks: int = 0
    freq_mask_bins: int = 8  # max width of one frequency mask in mel bins
    # speed (steps measured 3.6x faster): run each training batch on a window cut to its longest item
    # instead of the full encoder window. The weights are the same either way (the position table is
    # absolute, so the first T positions are the same rows); held-out evaluation and every later use run
    # the stock WhisperEncoder on the full, silence-padded window, and score the same as on cut windows
    # (CER within 0.01 in every run measured), so the extra silence attended to does not hurt
    crop_to_batch: bool = True
    # length bucketing: draw bucket * batch_size items at random, sort them by length and cut them into
    # batches (1: no bucketing), so a cut window holds little padding
    bucket: int = 8

    # ---- data (raw shards <data>/raw/<split>/part-*.parquet)
    train_split: str = "train"
    eval_split: str = "test"
    # (audio, text) pairs taken from each row: the question audio (asr and speech-input spoken_qa rows:
    # many voices) and the spoken answer (tts / spoken_qa rows: the one assistant voice)
    use_question_audio: bool = True
    use_answer_audio: bool = True
    max_items: int | None = None  # use only the first N rows of the train split (None: all)
    eval_tasks: tuple[Task, ...] = (ASR,)  # held-out rows scored: their question audio vs question text
    eval_max_items: int | None = None
    eval_batch_size: int = 32
    # held-out CER/WER every this many training steps (0: only at the end), kept as pretrain.json's
    # eval_curve: whether more steps still help on voices never heard, or only on the training set
    eval_every: int = 0

    def speech_encoder(self) -> SpeechEncoderConfig:
        return SpeechEncoderConfig(num_mel_bins=self.num_mel_bins, d_model=self.d_model,
                                   encoder_layers=self.encoder_layers,
                                   encoder_attention_heads=self.encoder_attention_heads,
                                   encoder_ffn_dim=self.encoder_ffn_dim,
                                   max_source_positions=self.max_source_positions)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderPretrainConfig:
        return parse_config(cls, d)
