"""How DeepOmni models are spread over processes; the model's math stays in ``deepomni.model``."""

from .expert_parallel import AllToAllDispatcher, apply_expert_parallel

__all__ = ["AllToAllDispatcher", "apply_expert_parallel"]
