"""The DeepSeek-V2 MoE layer: route -> dispatch -> compute -> combine, plus the modality expert masks.

Shape legend (used in tensor names throughout ``deepomni.model``):
    B batch, L sequence length, T tokens (= B*L), D hidden size, E routed experts, F expert FFN width,
    k experts per token (top-k), N routed (token, expert) pairs (= T*k).

The layer, in the paper's terms (``../shared/PAPER.md``):
1. **route**: ``scores = softmax(x W_gate^T)`` over the routed experts (fp32); when a routing mode is active
   (``speech`` / ``text`` experts only) the logits of the other experts are set to -inf *before* the
   softmax. Greedy top-k; optional renormalisation of the k weights; times ``routed_scaling_factor``.
   Sequence-level balance loss ``alpha * sum_j f_j P_j`` with ``f_j = E'/(k*L) * count_j`` and
   ``P_j = mean_t score_j``, per sequence, averaged over the batch (E' = number of allowed experts, so a
   balanced router scores ``alpha`` whatever the mask).
2. **dispatch**: sort the N (token, expert) pairs by expert, so each expert's tokens form one contiguous
   block of the permuted input; ``counts_E`` gives the block sizes.
3. **compute**: SwiGLU experts over the stacked weights ``gate_up_E2FD`` / ``down_EDF`` with torch's
   grouped matmul (one kernel for all blocks) where the device supports it, else a loop over the blocks.
4. **combine**: un-permute, weight each pair by its router weight and sum the k outputs of every token;
   add the shared experts (one SwiGLU MLP of width ``n_shared * F`` applied to every token).

Modality experts: stacked weights cannot be frozen per expert with ``requires_grad``, so the layer keeps a
*gradient mask*: hooks on the stacked expert weights and on the router weight zero the gradient rows of
experts outside ``trainable_E``. With a fresh optimizer per stage and no weight decay on those tensors
(:func:`deepomni.model.modality.param_groups` arranges it), the frozen experts' weights stay bit-identical.
Step 2-4 over several processes (expert parallelism) live in ``deepomni.parallel.expert_parallel``; the
math here is the single-process reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward (dense layers and shared experts); names follow transformers' DeepseekV2MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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

    def forward(self, x_TD: torch.Tensor, allowed_E: torch.Tensor | None = None) -> Routing:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
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


def dispatch(experts_TK: torch.Tensor, num_experts: int) -> Dispatch:
    flat_N = experts_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    token_N = order_N // experts_TK.shape[-1]
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    return Dispatch(order_N, token_N, counts_E)


def combine(y_ND: torch.Tensor, d: Dispatch, weights_TK: torch.Tensor) -> torch.Tensor:
    """Undo the permutation and take the router-weighted sum of each token's k expert outputs."""
    T, k = weights_TK.shape
    y_TKD = torch.empty_like(y_ND).index_copy(0, d.order_N, y_ND).view(T, k, -1)
    return torch.bmm(weights_TK.unsqueeze(1).to(y_TKD.dtype), y_TKD).squeeze(1)


# ------------------------------------------------------------------------------------------ compute
def grouped_mm_supported(device: torch.device) -> bool:
    """torch's grouped matmul runs on CPU and on CUDA sm90+ (Hopper); elsewhere use the segment loop."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return False


def expert_ffn(
    x_ND: torch.Tensor, counts_E: torch.Tensor, gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor, impl: str
) -> torch.Tensor:
    """SwiGLU of every expert over its contiguous block of ``x_ND`` (blocks sized by ``counts_E``)."""
    if impl == "auto":
        impl = "grouped_mm" if grouped_mm_supported(x_ND.device) else "loop"
    if impl == "grouped_mm":
        offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        h_N2F = torch._grouped_mm(x_ND, gate_up_E2FD.transpose(-2, -1), offs=offs_E)
        gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate_NF) * up_NF, down_EDF.transpose(-2, -1), offs=offs_E)
    if impl != "loop":
        raise ValueError(f"unknown moe_impl {impl!r} (expected auto | grouped_mm | loop)")
    outs = []
    for e, x_block in enumerate(torch.split(x_ND, counts_E.tolist())):
        if x_block.numel() == 0:
            continue
        gate, up = F.linear(x_block, gate_up_E2FD[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, down_EDF[e]))
    return torch.cat(outs) if outs else x_ND.new_zeros(0, down_EDF.shape[1])


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked (transformers' layout: ``gate_up_proj`` [E, 2F, D], ``down_proj``
    [E, D, F]), so the HF checkpoint maps 1:1 and the grouped matmul reads them directly."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, impl: str = "auto"):
        super().__init__()
        self.num_experts = num_experts
        self.impl = impl
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x_ND, counts_E, self.gate_up_proj, self.down_proj, self.impl)


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
        for p in (self.experts.gate_up_proj, self.experts.down_proj, self.gate.weight):
            p.register_hook(self._mask_grad)
        # the most recent forward's routing, for the modality-load profiler and the balance loss
        self.last_routing: Routing | None = None

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self.trainable_E is None:
            return grad
        mask = self.trainable_E.to(grad.device, grad.dtype)
        return grad * mask.view(-1, *([1] * (grad.dim() - 1)))

    def set_expert_masks(self, routing_mask_E: torch.Tensor | None, trainable_E: torch.Tensor | None) -> None:
        for name, m in (("routing_mask_E", routing_mask_E), ("trainable_E", trainable_E)):
            if m is not None and (m.dtype != torch.bool or m.shape != (self.num_experts,)):
                raise ValueError(f"{name} must be a bool tensor of shape ({self.num_experts},)")
        if routing_mask_E is not None and int(routing_mask_E.sum()) < self.gate.top_k:
            raise ValueError(
                f"routing mask allows {int(routing_mask_E.sum())} experts, fewer than top-k={self.gate.top_k}"
            )
        self.routing_mask_E = routing_mask_E
        self.trainable_E = trainable_E

    def forward(self, x_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(output_BLD, balance_loss)``."""
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(-1, D)
        mask = None if self.routing_mask_E is None else self.routing_mask_E.to(x_TD.device)
        routing = self.gate(x_TD, mask)
        self.last_routing = routing
        if self.token_dispatcher is not None:
            routed_TD = self.token_dispatcher(x_TD, routing, self.experts)
        else:
            d = dispatch(routing.experts_TK, self.num_experts)
            y_ND = self.experts(x_TD[d.token_N], d.counts_E)
            routed_TD = combine(y_ND, d, routing.weights_TK)
        out_TD = routed_TD.to(x_TD.dtype)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        num_allowed = self.num_experts if mask is None else int(mask.sum())
        aux = balance_loss(routing, B, self.aux_loss_alpha, num_allowed) if self.training else x_TD.new_zeros(())
        return out_TD.view(B, L, D), aux
