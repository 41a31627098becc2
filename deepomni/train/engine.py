"""The optimizer side of a training worker: how gradients are reduced and parameters updated.

Two engines with one interface (``forward``-free: the loop calls the model itself):

* :class:`DeepSpeedEngine` (``ep_size == 1``): DeepSpeed ZeRO (stage 2 by default) over the data-parallel
  world, AdamW (``torch_adam``: torch's implementation, no compiled ops), fp32 on CPU with gloo. The
  optimizer states and gradients are partitioned across workers; DeepSpeed's own checkpoint format.
* :class:`ExpertParallelEngine` (``ep_size > 1``): the routed experts are sharded with
  :func:`deepomni.parallel.expert_parallel.apply_expert_parallel` over groups of ``ep_size`` consecutive
  ranks. Gradient reduction is written out here (DDP-style) because DeepSpeed only recognises expert
  parameters inside its own ``deepspeed.moe.layer.MoE`` modules (``engine.has_moe_layers``); without that,
  ZeRO would average the gradients of *different* expert shards across ranks. The rule:

      replicated params (attention, router, shared experts, ...): all-reduce mean over the world
      expert shards: their gradient already sums every rank of the ep group's tokens (the all-to-all
        backward), so divide by ep_size, then all-reduce mean over the expert-data-parallel group
        (ranks holding the same shard: one per ep group)

  which equals the gradient of the mean of the per-rank losses, as data parallelism gives at ep_size 1.
  Clipping uses the global norm (expert shards' squares summed over the ep group). torch AdamW.

The learning rate follows linear warmup then cosine (:func:`lr_factor`), for both.

Optimizer state loads without arbitrary unpickling (a checkpoint from an untrusted place cannot run code):
``torch.load(weights_only=True)`` (:func:`load_plain`), which builds only tensors, containers, numbers and
strings. The expert-parallel engine's file holds only those (``LambdaLR.state_dict`` stores ``None`` for a
lambda). DeepSpeed's checkpoint engine loads with ``weights_only=False`` and has no option against it; the
DeepSpeed engine swaps in :func:`safe_checkpoint_engine` (DeepSpeed's own checkpoint-engine interface),
which loads the same files with ``weights_only=True`` plus the few plain-data DeepSpeed classes ZeRO-1/2
writes (:func:`deepspeed_safe_globals`).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import RoutedExperts


def lr_factor(step: int, max_steps: int, warmup_ratio: float, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then cosine."""
    warm = max(1, math.ceil(warmup_ratio * max_steps)) if warmup_ratio > 0 else 0
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, max_steps - warm)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def expert_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters()}


def load_plain(path: str | Path, map_location=None, safe_globals: list | tuple = ()) -> object:
    """``torch.load(weights_only=True)``: tensors, dicts, lists, tuples, sets, numbers, strings (and the
    listed ``safe_globals``) only; anything else (a pickle that would call a function) is refused with a
    ValueError and nothing of it runs."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [l.strip() for l in str(e).splitlines() if "WeightsUnpickler error" in l] or [str(e).strip()]
        why = lines[0].removeprefix("WeightsUnpickler error: ").split(". Please use")[0]
        raise ValueError(f"{path}: refused to load, it is not plain tensors and containers "
                         f"(torch.load weights_only=True): {why}") from None


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes a ZeRO-1/2 checkpoint pickles besides plain data: the loss scaler (its
    attributes: numbers), the ZeRO stage enum and the parameter fragment addresses (dataclasses of two ints).
    Unpickling them sets attributes only; no code of the file runs."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_engine(config_params=None):
    """DeepSpeed's torch checkpoint engine (same files), loading with ``weights_only=True``
    (:func:`load_plain` with :func:`deepspeed_safe_globals`). Built on first use: deepspeed is heavy."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_plain(path, map_location, deepspeed_safe_globals())

    return SafeTorchCheckpointEngine(config_params)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# ----------------------------------------------------------------------------------------- DeepSpeed
class DeepSpeedEngine:
    def __init__(self, model: nn.Module, groups: list[dict], cfg, max_steps: int, lr: float):
        import deepspeed

        # DeepSpeed's CPU shared-memory all-reduce op serves inference_all_reduce only, which training never
        # calls; left compatible, every new machine or venv JIT-compiles it on first use (60-90 s on 2 cores)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(cfg.betas), "eps": 1e-8,
                                                       "weight_decay": cfg.weight_decay, "torch_adam": True}},
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
            opt, lambda s: lr_factor(s, max_steps, cfg.warmup_ratio, cfg.min_lr_ratio))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=ds_config, lr_scheduler=sched)
        self.model = model
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        if type(self.engine.checkpoint_engine) is TorchCheckpointEngine:  # the default: loads with pickle
            self.engine.checkpoint_engine = safe_checkpoint_engine(self.engine._config)

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)  # DeepSpeed's forward bookkeeping, then the model

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # reduce-scatter grads, clip, AdamW on this rank's partition, all-gather, lr step

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, d: Path, step: int) -> None:
        self.engine.save_checkpoint(str(d / "ds"), tag="state", client_state={"step": step}, save_latest=False)

    def load(self, d: Path) -> int:
        _, client = self.engine.load_checkpoint(str(d / "ds"), tag="state")
        return int(client["step"])


# ----------------------------------------------------------------------------------- expert parallel
def expert_parallel_groups(ep_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """(this rank's ep group of consecutive ranks, its expert-data-parallel group or None if size 1).
    Every rank creates every group, as ``new_group`` requires."""
    world, rank = _world(), _rank()
    ep_group = edp_group = None
    for start in range(0, world, ep_size):
        g = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            ep_group = g
    if world > ep_size:
        for offset in range(ep_size):
            g = dist.new_group(list(range(offset, world, ep_size)))
            if rank % ep_size == offset:
                edp_group = g
    return ep_group, edp_group


class ExpertParallelEngine:
    def __init__(self, model: nn.Module, groups: list[dict], cfg, max_steps: int, lr: float,
                 ep_group: dist.ProcessGroup, edp_group: dist.ProcessGroup | None):
        self.model, self.cfg = model, cfg
        self.ep_group, self.edp_group = ep_group, edp_group
        self.ep_size = dist.get_world_size(ep_group)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, max_steps, cfg.warmup_ratio, cfg.min_lr_ratio))
        experts = expert_params(model)
        params = [p for g in groups for p in g["params"]]
        self.expert = [p for p in params if id(p) in experts]
        self.replicated = [p for p in params if id(p) not in experts]

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _reduce(self) -> None:
        world = _world()
        for p in self.replicated + self.expert:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if world > 1 and self.replicated:  # one flat all-reduce for the replicated parameters
            flat = torch.cat([p.grad.reshape(-1) for p in self.replicated]) / world
            dist.all_reduce(flat)
            for p, g in zip(self.replicated, flat.split([p.numel() for p in self.replicated])):
                p.grad.copy_(g.view_as(p))
        for p in self.expert:
            p.grad.div_(self.ep_size)
            if self.edp_group is not None:
                p.grad.div_(dist.get_world_size(self.edp_group))
                dist.all_reduce(p.grad, group=self.edp_group)

    def _clip(self) -> None:
        sq_rep = sum((p.grad.float() ** 2).sum() for p in self.replicated) if self.replicated else torch.zeros(())
        sq_exp = sum((p.grad.float() ** 2).sum() for p in self.expert) if self.expert else torch.zeros(())
        sq_exp = torch.as_tensor(sq_exp, dtype=torch.float32).clone()
        dist.all_reduce(sq_exp, group=self.ep_group)
        norm = float(torch.sqrt(torch.as_tensor(sq_rep) + sq_exp))
        if self.cfg.grad_clip > 0 and norm > self.cfg.grad_clip:
            for p in self.replicated + self.expert:
                p.grad.mul_(self.cfg.grad_clip / (norm + 1e-6))

    def step(self) -> None:
        self._reduce()
        self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, d: Path, step: int) -> None:
        # plain data only (tensors, numbers, strings, containers), so that load() can refuse anything else
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "step": step}, d / f"optim_rank{_rank():03d}.pt")

    def load(self, d: Path) -> int:
        path = d / f"optim_rank{_rank():03d}.pt"
        s = load_plain(path)
        if not isinstance(s, dict) or not {"optimizer", "scheduler", "step"} <= s.keys():
            raise ValueError(f"{path}: not an optimizer state file (optimizer, scheduler, step)")
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        return int(s["step"])
