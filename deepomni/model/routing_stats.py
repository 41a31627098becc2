"""Routing statistics: how many routed (token, expert) pairs each MoE layer sent to each expert, per token group.

The one path by which profiling (:mod:`deepomni.train.profile`), the training metrics
(:mod:`deepomni.train.metrics`) and the serving engine (:mod:`deepomni.serve.engine`) learn where tokens
were routed. As in torchtitan, the MoE layer itself accumulates the counts as plain no-grad data: a
non-persistent int64 buffer ``MoE.tokens_per_expert_GE`` ``[groups, experts]``, added to under
``torch.no_grad()`` in the forward (:func:`count_routed`) with one ``scatter_add_``
(no host sync). Nothing is counted, and the forward's only extra work is one ``is None`` test, unless a
counter labels the forward's tokens; no routing tensor (and no autograd graph) is kept on the module.

    counter = ExpertCounter(model, ("speech", "text"))    # zeroed [2, E] counters on every MoE layer
    with counter.count(group_BL):    # group index of every token of the forwards inside (-1: not counted)
        model(tokens_BLC)
    counts = counter.take()          # {"speech": [moe layers, E], "text": ...} int64 on CPU, then zeroed
    counter.close()                  # counting off (the counters are freed)

The consumers' groups: profiling ``(speech, text)`` (positions of neither: -1); training ``(speech, text,
other)`` (every position, so the counts also give all routed pairs); serving ``(text, speech)`` for each
session slot (below).

A model counts for one counter at a time: a new :class:`ExpertCounter` on the same model restarts the
layers' counters from zero at its own number of groups, and an older one that counts again takes them back
(from zero: what was counted meanwhile by the other is lost to both).

The serving engine labels each token with its session too (group ``2 * slot + modality``, a slot per session
holding rows: the same one ``scatter_add_`` a layer, into a larger counter) and takes a session's groups
alone when it leaves (:meth:`ExpertCounter.take_LGE`);
:func:`deepomni.model.modality.expert_share` sums up such counts against the modality expert assignment: the
share of one answer's routed pairs that went to each MoE layer's speech experts and to its text experts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


@torch.no_grad()
def count_routed(moe: nn.Module, experts_TK: torch.Tensor) -> None:
    """The MoE layer's forward: add its routed pairs to ``moe.tokens_per_expert_GE[group, expert]``;
    ``moe.token_group`` is one group index for every token, or each token's (``[B, L]`` or ``[T]``; -1: not
    counted)."""
    G, E = moe.tokens_per_expert_GE.shape
    group = moe.token_group
    if G == 0:
        raise RuntimeError("token_group is set but no ExpertCounter started on this layer")
    if isinstance(group, int):
        group_T1 = torch.full((experts_TK.shape[0], 1), group, device=experts_TK.device)
    else:
        group_T1 = group.reshape(-1, 1).to(experts_TK.device, torch.long)
        if group_T1.shape[0] != experts_TK.shape[0]:
            raise ValueError(f"token_group labels {group_T1.shape[0]} tokens, the forward routes "
                             f"{experts_TK.shape[0]}")
    slot_TK = group_T1.clamp(min=0) * E + experts_TK
    counted_TK = (group_T1 >= 0).long().expand_as(experts_TK)
    moe.tokens_per_expert_GE.view(-1).scatter_add_(0, slot_TK.reshape(-1), counted_TK.reshape(-1))


def _counting_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that count routed tokens (the MoE layers: ``MoE`` registers the buffer; this module is
    imported by ``moe.py``, so it finds them by the buffer), in model order."""
    return [m for m in model.modules() if "tokens_per_expert_GE" in m._buffers]


class ExpertCounter:
    """Counts routed (token, expert) pairs of ``model``'s MoE layers (in model order) per group in ``groups``."""

    def __init__(self, model: nn.Module, groups: Sequence[str] = ("all",)):
        self.groups = tuple(groups)
        if not self.groups or len(set(self.groups)) != len(self.groups):
            raise ValueError(f"groups must be distinct names, at least one: {groups!r}")
        self.layers = _counting_layers(model)
        self._arm()

    def _arm(self) -> None:
        """Make the layers' counters this counter's (``[groups, E]`` zeros), where another took them over."""
        for moe in self.layers:
            if getattr(moe, "counter_id", None) != id(self):
                moe.tokens_per_expert_GE = moe.tokens_per_expert_GE.new_zeros(len(self.groups), moe.num_experts)
                moe.counter_id = id(self)

    @contextmanager
    def count(self, group: torch.Tensor | int = 0) -> Iterator["ExpertCounter"]:
        """Count the forwards inside: ``group`` is the group index of every token (``[B, L]`` or flat, -1: not
        counted) or one index for all of them."""
        if isinstance(group, int) and not 0 <= group < len(self.groups):
            raise ValueError(f"group {group} out of range for groups {self.groups}")
        if isinstance(group, torch.Tensor) and (group.dtype == torch.bool or group.is_floating_point()):
            raise TypeError(f"token groups must be integer indices, got {group.dtype}")
        if isinstance(group, torch.Tensor) and self.layers:  # once here, not in every layer
            group = group.to(self.layers[0].tokens_per_expert_GE.device, torch.long)
        self._arm()  # a counter made since on the same model (another engine, a profiler) took the layers over
        for moe in self.layers:
            moe.token_group = group
        try:
            yield self
        finally:
            for moe in self.layers:
                moe.token_group = None

    def take(self) -> dict[str, torch.Tensor]:
        """Counts since the last take: group -> ``[moe layers, E]`` int64 (CPU); the counters restart at 0."""
        if not self.layers:
            return {g: torch.zeros(0, 0, dtype=torch.long) for g in self.groups}
        counts_LGE = self.take_LGE()
        return {g: counts_LGE[:, i].clone() for i, g in enumerate(self.groups)}

    def take_LGE(self, groups: Sequence[int] | None = None) -> torch.Tensor:
        """Counts since their last take as one int64 CPU tensor ``[moe layers, groups, E]``: of the groups at
        the indices ``groups`` (in that order; None: all), whose counters restart at 0 (the others go on)."""
        G = len(self.groups) if groups is None else len(groups)
        if not self.layers:
            return torch.zeros(0, G, 0, dtype=torch.long)
        self._arm()
        if groups is None:
            counts_LGE = torch.stack([moe.tokens_per_expert_GE for moe in self.layers]).cpu()
            for moe in self.layers:
                moe.tokens_per_expert_GE.zero_()
            return counts_LGE
        idx_G = torch.tensor(list(groups), dtype=torch.long, device=self.layers[0].tokens_per_expert_GE.device)
        counts_LGE = torch.stack([moe.tokens_per_expert_GE.index_select(0, idx_G) for moe in self.layers]).cpu()
        for moe in self.layers:
            moe.tokens_per_expert_GE.index_fill_(0, idx_G, 0)
        return counts_LGE

    def close(self) -> None:
        """Stop counting: the layers' counters go back to ``[0, E]``."""
        for moe in self.layers:
            moe.token_group = None
            moe.tokens_per_expert_GE = moe.tokens_per_expert_GE.new_zeros(0, moe.num_experts)
            moe.counter_id = None
