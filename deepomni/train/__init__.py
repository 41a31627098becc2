"""Staged training (docs/paper.md "Training stages"): stage table (``stages``), run config (``config``), the Ray
Train loop (``loop``), optimizer engines (``engine``: DeepSpeed ZeRO-2 / expert parallel).
Modality load profiling and expert assignment (``profile``), held-out evaluation (``evaluate``)."""

from .config import TrainConfig
from .stages import STAGES, Stage, get_stage

__all__ = ["STAGES", "Stage", "TrainConfig", "get_stage"]
