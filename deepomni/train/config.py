"""``TrainConfig``: one typed config for a training run, from a JSON file (``--config``) plus CLI overrides.

A training preset file holds the shared fields and an optional ``stages`` table of per-stage overrides
(``{"stages": {"s1_align": {"lr": 1e-3, "max_steps": 40}}}``); the stage's own values apply last, then
explicit command-line overrides.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "train"
FAIL_MODES = ("exception", "kill", "hold")


@dataclass
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
    ep_size: int = 1  # expert-parallel group size (divides num_workers and n_routed_experts)
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
    # testing (exercises FailureConfig): rank 0 fails once per run (a marker file in <storage>/<run>) at step
    # fail_at_step (that many steps done), fail_in "step" (before the next step) or "checkpoint" (half way
    # through copying that step's checkpoint to storage); fail_mode "exception" raises, "kill" SIGKILLs its
    # own process, "hold" writes its pid to <storage>/<run>/.held_worker and waits (300 s) to be killed
    fail_at_step: int | None = None
    fail_in: str = "step"
    fail_mode: str = "exception"
    # rank r appends {"step", "epoch", "ids", "loss", "time"} per step to <storage>/<run>/samples_rank<r>.jsonl;
    # after a resume the re-run steps appear again (the last record of a step is the one that counts)
    sample_log: bool = False
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-stage overrides (preset files)

    # ---------------------------------------------------------------------------------------- loading
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """File (a path, or a preset name under ``deepomni/presets/train``), then the stage's table, then
        ``overrides`` (None values are skipped)."""
        d: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file() and (PRESET_DIR / f"{path}.json").is_file():
                p = PRESET_DIR / f"{path}.json"
            d = json.loads(p.read_text())
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        stage = overrides.get("stage", d.get("stage", cls.stage))
        d.update(d.get("stages", {}).get(stage, {}))
        d.update(overrides)
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.num_workers % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide num_workers={self.num_workers}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError("zero_stage must be 0, 1 or 2 (ZeRO-3 would shard the stacked experts)")
        if self.fail_mode not in FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {FAIL_MODES}, not {self.fail_mode!r}")
        if self.fail_in not in ("step", "checkpoint"):
            raise ValueError(f"fail_in must be 'step' or 'checkpoint', not {self.fail_in!r}")
