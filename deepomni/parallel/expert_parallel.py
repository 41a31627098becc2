"""Expert parallelism: the routed experts of every MoE layer are split over a ``torch.distributed`` group.

Shape legend (as in ``deepomni.model.moe``, plus the expert-parallel sizes):
    T tokens on this rank, D hidden size, E routed experts, k top-k, N routed (token, expert) pairs sent by
    this rank (= T*k), R ranks in the expert-parallel group, X experts owned by one rank (= E/R),
    M rows this rank receives (pairs routed to its experts from all ranks, itself included).

Rank ``r`` owns the contiguous expert slice ``[r*X, (r+1)*X)``. The router, the shared experts and the rest
of the model stay replicated; only steps 2-4 of the MoE layer (dispatch -> compute -> combine) change:

1. **local dispatch**: sort this rank's N (token, expert) pairs by expert (``moe.dispatch``). Because the
   slices are contiguous, the sorted pairs are also grouped by destination rank: ``counts_E`` viewed as
   ``counts_RX`` gives, per destination rank, how many rows go to each of its experts.
2. **exchange counts**: one ``all_to_all_single`` of ``counts_RX`` tells every rank how many rows it will
   receive from each source rank for each of its local experts (``recv_counts_RX``). This is the only
   host sync: the split sizes of the next collective must be Python ints.
3. **send tokens**: ``all_to_all_single`` of the sorted rows with per-rank split sizes. The autograd-aware
   version (``torch.distributed.nn.functional``) is used, so its backward runs the reverse all-to-all and
   the gradients of the received rows go back to the ranks that sent them.
4. **regroup**: received rows arrive ordered by (source rank, local expert); a stable sort by local expert
   makes each expert's rows one contiguous block, as the grouped matmul expects.
5. **compute**: the local ``RoutedExperts`` slice (``deepomni.model.expert_ffn``) over the X blocks.
6. **reverse regroup** back to (source rank, local expert) order, and **all-to-all back** with the split
   sizes swapped, so every rank gets the outputs of exactly the rows it sent, in the order it sent them.
7. **combine** (``moe.combine``): un-permute and take the router-weighted sum of each token's k outputs.

Gradients: the expert weights on rank r receive the full gradient of their experts over the tokens of all
ranks (no reduction needed inside the group); replicated parameters (router, shared experts) only see the
local tokens and must be reduced by data parallelism as usual. Modality masking keeps working: each
sharded ``RoutedExperts`` knows its ``first_expert`` and applies its slice of the layer's ``trainable_E``.

:func:`apply_expert_parallel` installs all of this on a model in place; the single-process math in
``deepomni.model.moe`` stays the reference (``tests/test_expert_parallel.py`` checks parity).
"""

from __future__ import annotations


import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from ..model.moe import MoE, RoutedExperts, Routing, combine, dispatch, permute_tokens


class AllToAllDispatcher:
    """``MoE.token_dispatcher`` that runs the routed experts of a layer spread over ``group``.

    Called as ``dispatcher(x_TD, routing, experts)`` with ``experts`` this rank's ``RoutedExperts`` slice
    (X experts); returns the routed output ``routed_TD`` of this rank's tokens (before the shared experts).
    A plain object, not an ``nn.Module``, so the model's ``state_dict`` and ``parameters()`` are unchanged.
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(
                f"expert parallelism needs n_routed_experts={num_experts} divisible by the group size "
                f"{self.ep_size}"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size

    def __call__(self, x_TD: torch.Tensor, routing: Routing, experts: RoutedExperts) -> torch.Tensor:
        R, X, E = self.ep_size, self.num_local_experts, self.num_experts
        if experts.num_experts != X or routing.scores_TE.shape[-1] != E:
            raise ValueError(
                f"dispatcher expects {E} routed experts with {X} on this rank, got router width "
                f"{routing.scores_TE.shape[-1]} and {experts.num_experts} local experts"
            )
        # 1. local dispatch: pairs sorted by expert = grouped by destination rank, then by its local expert
        d = dispatch(routing.experts_TK, E)
        x_ND = permute_tokens(x_TD, d)
        counts_RX = d.counts_E.view(R, X)

        # 2. exchange counts: recv_counts_RX[s, x] = rows that rank s sends to our local expert x
        recv_counts_RX = torch.empty_like(counts_RX)
        dist.all_to_all_single(recv_counts_RX, counts_RX, group=self.group)
        send_R, recv_R = torch.stack([counts_RX.sum(1), recv_counts_RX.sum(1)]).tolist()  # the host sync

        # 3. send tokens (autograd-aware: the backward sends the row gradients back to their source rank)
        x_MD = self._all_to_all(x_ND, out_rows=sum(recv_R), out_splits=recv_R, in_splits=send_R)

        # 4. regroup: (source rank, local expert) order -> local expert order, stable within each expert
        local_ids_M = torch.arange(X, device=x_MD.device).repeat(R)
        local_ids_M = local_ids_M.repeat_interleave(recv_counts_RX.flatten(), output_size=x_MD.shape[0])
        regroup_M = torch.argsort(local_ids_M, stable=True)

        # 5. compute on the local slice
        y_MD = self._local_experts(x_MD[regroup_M], recv_counts_RX.sum(0), experts)

        # 6. reverse regroup, then all-to-all back with the split sizes swapped
        y_MD = torch.empty_like(y_MD).index_copy(0, regroup_M, y_MD)
        y_ND = self._all_to_all(y_MD, out_rows=x_ND.shape[0], out_splits=send_R, in_splits=recv_R)

        # 7. combine: un-permute and take the router-weighted sum over each token's k experts
        return combine(y_ND, d, routing.weights_TK)

    def _all_to_all(self, x: torch.Tensor, out_rows: int, out_splits: list[int], in_splits: list[int]):
        out = x.new_empty(out_rows, *x.shape[1:])
        return dist_fn.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)

    @staticmethod
    def _local_experts(x_MD: torch.Tensor, counts_X: torch.Tensor, experts: RoutedExperts) -> torch.Tensor:
        if x_MD.shape[0] == 0:
            # Nothing arrived for any local expert. The result must still depend on the expert weights
            # (and on x) like the non-empty case: the backward of the all-to-all back is a collective, so
            # it has to run on every rank, and the weights should get a zero gradient rather than None.
            return x_MD + 0 * (experts.gate_up_proj.sum() + experts.down_proj.sum()).to(x_MD.dtype)
        return experts(x_MD, counts_X)


# ----------------------------------------------------------------------------------------- apply
def _shard(p: nn.Parameter, lo: int, hi: int) -> nn.Parameter:
    return nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad)


def apply_expert_parallel(module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard the routed experts of every ``MoE`` in ``module`` over ``group`` (default: the world), in place.

    Each MoE keeps rows ``[r*X, (r+1)*X)`` of its stacked expert weights (a new ``RoutedExperts`` of X
    experts, a copy of the slice) and gets an :class:`AllToAllDispatcher`. Call it before building the
    optimizer (the expert parameters are new tensors) and before loading expert-sharded checkpoints.
    """
    ep_size, ep_rank = dist.get_world_size(group), dist.get_rank(group)
    moes = [m for m in module.modules() if isinstance(m, MoE)]
    for moe in moes:  # validate all layers before changing any
        if moe.num_experts % ep_size:
            raise ValueError(
                f"expert parallelism needs n_routed_experts={moe.num_experts} divisible by the group size "
                f"{ep_size}"
            )
        if moe.token_dispatcher is not None or moe.experts.num_experts != moe.num_experts:
            raise ValueError("apply_expert_parallel: this MoE already has a token dispatcher / sharded experts")
    for moe in moes:
        old = moe.experts
        X = moe.num_experts // ep_size
        lo, hi = ep_rank * X, (ep_rank + 1) * X
        _, D, F = old.down_proj.shape
        with torch.device("meta"):  # the constructor's torch.empty weights are replaced right below
            new = RoutedExperts(X, D, F, old.impl, first_expert=lo)
        new.gate_up_proj = _shard(old.gate_up_proj, lo, hi)
        new.down_proj = _shard(old.down_proj, lo, hi)
        new.trainable_E = old.trainable_E  # the layer-wide mask; the module applies its own slice
        moe.experts = new
        moe.token_dispatcher = AllToAllDispatcher(moe.num_experts, group)
    return module
