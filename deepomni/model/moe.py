"""The DeepSeek-V2 MoE layer: route -> dispatch -> compute -> combine, plus the modality expert masks.

Shape legend (used in tensor names throughout ``deepomni.model``):
    B batch, L sequence length, T tokens (= B*L), D hidden size, E routed experts, F expert FFN width,
    k experts per token (top-k), N routed (token, expert) pairs (= T*k), G token groups of the routing
    statistics (``deepomni.model.routing_stats``).

The layer, in the paper's terms (``docs/paper.md`` "Backbone", "Routing masks and gradient masks"):
1. **route**: ``scores = softmax(x W_gate^T)`` over the routed experts (fp32); when a routing mode is active
   (``speech`` / ``text`` experts only) the logits of the other experts are set to -inf *before* the
   softmax. Greedy top-k; optional renormalisation of the k weights; times ``routed_scaling_factor``.
   Sequence-level balance loss ``alpha * sum_j f_j P_j`` with ``f_j = E'/(k*L) * count_j`` and
   ``P_j = mean_t score_j``, per sequence, averaged over the batch (E' = number of allowed experts, so a
   balanced router scores ``alpha`` whatever the mask).
2. **dispatch**: sort the N (token, expert) pairs by expert, so each expert's tokens form one contiguous
   block of the permuted input; ``counts_E`` gives the block sizes.
3. **compute**: SwiGLU experts over the stacked weights ``gate_up_E2FD`` / ``down_EDF`` with torch's
   grouped matmul (one kernel for all blocks) where the device supports it, else a loop over the blocks
   (:mod:`deepomni.model.expert_ffn`). Each pair's router weight is applied to the [N, F] activation before
   the down projection (equal to weighting the [N, D] output, and cheaper).
4. **combine**: un-permute and sum the k (weighted) outputs of every token; add the shared experts (one
   SwiGLU MLP of width ``n_shared * F`` applied to every token).

Outside the matmuls the layer is bound by memory traffic, so the permutation (gather forward, per-token
sum backward, and its adjoint for the combine) and the weighted SwiGLU (``expert_ffn.py``) are small autograd Functions rather
than what autograd derives from indexing / ``bmm`` / ``chunk``; ``benchmarks/moe_layer.py`` measures the
layer against transformers' ``DeepseekV2Moe`` and a dense-matmul roofline.

Modality experts: stacked weights cannot be frozen per expert with ``requires_grad``, so the layer keeps a
*gradient mask*: in the forward, the stacked expert weights and the router weight pass through an identity
(:func:`mask_grad_rows`) whose backward zeroes the gradient rows of experts outside ``trainable_E``. With a fresh optimizer per stage and no weight decay on those tensors
(:func:`deepomni.model.modality.param_groups` arranges it), the frozen experts' weights stay bit-identical.
Step 2-4 over several processes (expert parallelism) live in ``deepomni.parallel.expert_parallel``; the
math here is the single-process reference.

Routing statistics: the layer keeps no routing result. While a counter
(:class:`deepomni.model.routing_stats.ExpertCounter`) labels the forward's tokens with groups (``token_group``),
the forward adds its routed pairs per group and expert to the no-grad buffer ``tokens_per_expert_GE``
(:func:`deepomni.model.routing_stats.count_routed`); otherwise it does nothing.

The steps read top to bottom in the order the forward runs them (as torchtitan's ``moe.py``), the expert
computation (step 3) in its own file; expert parallelism reuses the steps from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .expert_ffn import expert_ffn
from .prepack import Linear
from .routing_stats import count_routed


class MLP(nn.Module):
    """SwiGLU feed-forward (dense layers and shared experts); names follow transformers' DeepseekV2MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ------------------------------------------------------------------------------------------ grad mask
class _MaskGradRows(torch.autograd.Function):
    """Identity on a stacked ``[E, ...]`` weight whose backward zeroes the gradient rows of frozen experts.

    Applied in the forward (not as a parameter hook), so it survives anything that replaces parameter
    tensors: materialising from the meta device, ``swap_tensors``, FSDP / ZeRO-3 partitioning, sharding."""

    @staticmethod
    def forward(ctx, w_EX: torch.Tensor, keep_E: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(keep_E)
        return w_EX.view_as(w_EX)

    @staticmethod
    def backward(ctx, grad_EX: torch.Tensor):
        (keep_E,) = ctx.saved_tensors
        mask = keep_E.to(grad_EX.device, grad_EX.dtype).view(-1, *([1] * (grad_EX.dim() - 1)))
        return grad_EX * mask, None


def mask_grad_rows(w_EX: torch.Tensor, keep_E: torch.Tensor | None) -> torch.Tensor:
    """``w_EX`` unchanged, with gradient only for the rows where ``keep_E`` is True (None: all rows)."""
    return w_EX if keep_E is None else _MaskGradRows.apply(w_EX, keep_E)


# ------------------------------------------------------------------------------------------------ route
@dataclass
class Routing:
    weights_TK: torch.Tensor  # router weight of each chosen expert (after renorm / scaling)
    experts_TK: torch.Tensor  # chosen expert ids (int64)
    scores_TE: torch.Tensor  # softmax scores over all experts (0 for masked ones)


class Router(nn.Module):
    """Softmax scores, greedy top-k, optional renormalisation and scaling, modality mask on the logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        # kept in fp32 like the reference implementation: routing decisions are precision sensitive
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        self.trainable_E: torch.Tensor | None = None  # router rows that receive gradient (None: all)

    def forward(self, x_TD: torch.Tensor, allowed_E: torch.Tensor | None = None) -> Routing:
        logits_TE = F.linear(x_TD.float(), mask_grad_rows(self.weight, self.trainable_E).float())
        if allowed_E is not None:
            logits_TE = logits_TE.masked_fill(~allowed_E, float("-inf"))
        scores_TE = logits_TE.softmax(dim=-1)
        weights_TK, experts_TK = torch.topk(scores_TE, k=self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.routed_scaling_factor
        return Routing(weights_TK, experts_TK, scores_TE)


def balance_loss(routing: Routing, batch: int, alpha: float, num_allowed: int) -> torch.Tensor:
    """Sequence-level balance loss (DeepSeek-V2): ``alpha * mean_b sum_j f_j P_j``."""
    T, E = routing.scores_TE.shape
    L = T // batch
    k = routing.experts_TK.shape[-1]
    experts_BN = routing.experts_TK.reshape(batch, L * k)
    counts_BE = torch.zeros(batch, E, device=experts_BN.device, dtype=torch.float32)
    counts_BE.scatter_add_(1, experts_BN, torch.ones_like(experts_BN, dtype=torch.float32))
    f_BE = counts_BE * (num_allowed / (k * L))
    P_BE = routing.scores_TE.reshape(batch, L, E).mean(dim=1)
    return alpha * (f_BE * P_BE).sum(dim=-1).mean()


# ----------------------------------------------------------------------------------------- dispatch
@dataclass
class Dispatch:
    order_N: torch.Tensor  # permutation of the flattened (token, k) pairs that sorts them by expert
    token_N: torch.Tensor  # source token of each permuted pair
    counts_E: torch.Tensor  # pairs per expert (block sizes of the permuted input)
    # position of each flattened (token, k) pair in the permuted order (the inverse of order_N); computed
    # from order_N when not given
    inverse_N: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.inverse_N is None:
            self.inverse_N = torch.empty_like(self.order_N)
            self.inverse_N[self.order_N] = torch.arange(self.order_N.numel(), device=self.order_N.device)


def dispatch(experts_TK: torch.Tensor, num_experts: int) -> Dispatch:
    flat_N = experts_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    token_N = order_N // experts_TK.shape[-1]
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    return Dispatch(order_N, token_N, counts_E)


def _sum_rows(src_ND: torch.Tensor, d: Dispatch, num_tokens: int) -> torch.Tensor:
    """``out_TD[t] = sum of src_ND[n] over the pairs n of token t`` (the adjoint of ``x_TD[token_N]``).

    fp32 on CPU: ``index_add_`` into a [T, D] buffer (deterministic there, and it never materialises an
    [N, D] tensor). Elsewhere: gather each token's k rows with ``inverse_N`` and sum them in fp32, which
    is deterministic on GPU (no atomics) and accumulates low-precision outputs in fp32.
    """
    if src_ND.device.type == "cpu" and src_ND.dtype == torch.float32:
        out_TD = src_ND.new_zeros(num_tokens, src_ND.shape[-1])
        return out_TD.index_add_(0, d.token_N, src_ND)
    k = src_ND.shape[0] // max(num_tokens, 1)
    rows_TKD = src_ND.index_select(0, d.inverse_N).view(num_tokens, k, -1)
    return rows_TKD.sum(dim=1, dtype=torch.float32).to(src_ND.dtype)


class _PermuteTokens(torch.autograd.Function):
    """``x_ND = x_TD[token_N]`` whose backward sums each token's k row gradients with :func:`_sum_rows`
    (autograd's own backward of the indexing is a slower accumulating ``index_put_``)."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, d: Dispatch) -> torch.Tensor:
        ctx.d, ctx.num_tokens = d, x_TD.shape[0]
        return x_TD.index_select(0, d.token_N)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        return _sum_rows(grad_ND, ctx.d, ctx.num_tokens), None


class _UnpermuteSum(torch.autograd.Function):
    """``out_TD = sum over each token's k rows of y_ND``: the adjoint of :class:`_PermuteTokens`, so its
    backward is the plain gather ``grad_TD[token_N]``."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, d: Dispatch, num_tokens: int) -> torch.Tensor:
        ctx.d = d
        return _sum_rows(y_ND, d, num_tokens)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        return grad_TD.index_select(0, ctx.d.token_N), None, None


def permute_tokens(x_TD: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """The dispatched expert input ``x_TD[d.token_N]`` (each token copied to its k pairs, in expert order)."""
    return _PermuteTokens.apply(x_TD, d)


def pair_weights(d: Dispatch, weights_TK: torch.Tensor) -> torch.Tensor:
    """Router weight of every permuted pair (``weights_N``, aligned with ``x_TD[d.token_N]``)."""
    return weights_TK.reshape(-1)[d.order_N]


def combine(
    y_ND: torch.Tensor, d: Dispatch, weights_TK: torch.Tensor, *, weighted: bool = False
) -> torch.Tensor:
    """Undo the permutation and take the router-weighted sum of each token's k expert outputs.

    ``weighted=True``: the rows of ``y_ND`` already carry their router weight (``expert_ffn(...,
    weights_N=...)``), so only un-permute and sum; ``weights_TK`` then only gives the token count.
    """
    T = weights_TK.shape[0]
    if not weighted:
        y_ND = y_ND * pair_weights(d, weights_TK).to(y_ND.dtype).unsqueeze(-1)
    return _UnpermuteSum.apply(y_ND, d, T)


# ------------------------------------------------------------------------------------------ compute
class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked (transformers' layout: ``gate_up_proj`` [E, 2F, D], ``down_proj``
    [E, D, F]), so the HF checkpoint maps 1:1 and the grouped matmul reads them directly.

    Under expert parallelism a module holds experts ``[first_expert, first_expert + num_experts)`` of the
    layer; ``trainable_E`` is the layer-wide gradient mask (None: all train)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, impl: str = "auto",
                 first_expert: int = 0):
        super().__init__()
        self.num_experts = num_experts
        self.first_expert = first_expert
        self.impl = impl
        self.trainable_E: torch.Tensor | None = None
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, weights_N: torch.Tensor | None = None
    ) -> torch.Tensor:
        keep = self.trainable_E
        if keep is not None:
            keep = keep[self.first_expert : self.first_expert + self.num_experts]
        gate_up, down = mask_grad_rows(self.gate_up_proj, keep), mask_grad_rows(self.down_proj, keep)
        return expert_ffn(x_ND, counts_E, gate_up, down, self.impl, weights_N)


# --------------------------------------------------------------------------------------------- layer
class MoE(nn.Module):
    """DeepSeek-V2 MoE block: shared experts + routed experts behind a top-k router (see module doc).

    ``routing_mask_E`` (bool, or None for all experts) restricts which experts the router may pick;
    ``trainable_E`` (bool, or None for all) restricts which experts' weights receive gradient.
    ``token_dispatcher`` may be replaced by an expert-parallel one (``deepomni.parallel``); the default
    runs all experts in this process.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_impl)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )
        self.routing_mask_E: torch.Tensor | None = None
        self.trainable_E: torch.Tensor | None = None
        self.token_dispatcher = None  # set by deepomni.parallel.expert_parallel.apply_expert_parallel
        # routing statistics (deepomni.model.routing_stats): routed pairs per token group and expert, added
        # while ``token_group`` labels the forward's tokens; [0, E] until a counter starts
        self.register_buffer("tokens_per_expert_GE", torch.zeros(0, self.num_experts, dtype=torch.long),
                             persistent=False)
        self.token_group: torch.Tensor | int | None = None

    def set_expert_masks(self, routing_mask_E: torch.Tensor | None, trainable_E: torch.Tensor | None) -> None:
        for name, m in (("routing_mask_E", routing_mask_E), ("trainable_E", trainable_E)):
            if m is not None and (m.dtype != torch.bool or m.shape != (self.num_experts,)):
                raise ValueError(f"{name} must be a bool tensor of shape ({self.num_experts},)")
        if routing_mask_E is not None and int(routing_mask_E.sum()) < self.gate.top_k:
            raise ValueError(
                f"routing mask allows {int(routing_mask_E.sum())} experts, fewer than top-k={self.gate.top_k}"
            )
        self.routing_mask_E = routing_mask_E
        self.trainable_E = self.gate.trainable_E = self.experts.trainable_E = trainable_E

    def forward(self, x_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(output_BLD, balance_loss)``."""
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(-1, D)
        mask = None if self.routing_mask_E is None else self.routing_mask_E.to(x_TD.device)
        routing = self.gate(x_TD, mask)
        if self.token_group is not None:
            count_routed(self, routing.experts_TK)
        if self.token_dispatcher is not None:
            routed_TD = self.token_dispatcher(x_TD, routing, self.experts)
        else:
            d = dispatch(routing.experts_TK, self.num_experts)
            weights_N = pair_weights(d, routing.weights_TK)
            y_ND = self.experts(permute_tokens(x_TD, d), d.counts_E, weights_N)
            routed_TD = combine(y_ND, d, routing.weights_TK, weighted=True)
        out_TD = routed_TD.to(x_TD.dtype)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        num_allowed = self.num_experts if mask is None else int(mask.sum())
        aux = balance_loss(routing, B, self.aux_loss_alpha, num_allowed) if self.training else x_TD.new_zeros(())
        return out_TD.view(B, L, D), aux
