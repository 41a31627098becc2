"""RMSNorm, DeepSeek-V2 rotary embeddings and MLA (multi-head latent attention) with a latent KV cache.

Shapes: B batch, L new positions, S cached + new positions, D hidden, H heads, R kv_lora_rank,
P rope dims (qk_rope_head_dim), N nope dims (qk_nope_head_dim), V value head dim.

MLA as in DeepSeek-V2: queries are a plain projection (or a low-rank one when ``q_lora_rank`` is set);
keys and values come from one compressed latent ``c_BLR`` (normed, then up-projected by ``kv_b_proj``)
plus a single rotary key ``k_pe_BLP`` shared by all heads. The cache stores only ``c`` and ``k_pe`` —
``R + P`` numbers per position instead of ``2*H*head_dim`` — which is the point of MLA.

Rotary follows the family's convention: adjacent pairs ``(x[2i], x[2i+1])`` rotate as complex numbers.
Frequencies (and YaRN scaling, when ``rope_scaling`` is set) come from transformers' rope utilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------------------------- rope
def yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(cfg: ModelConfig) -> tuple[torch.Tensor, float, float]:
    """Returns ``(inv_freq_P/2, cos_sin_scale, softmax_scale)``.

    Plain RoPE by default; with ``cfg.rope_scaling`` (e.g. DeepSeek-V2-Lite's YaRN) the frequencies and
    the attention factor come from transformers' own implementation, and the softmax scale gets the
    family's ``mscale_all_dim`` correction.
    """
    P = cfg.qk_rope_head_dim
    softmax_scale = cfg.qk_head_dim**-0.5
    if not cfg.rope_scaling:
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, P, 2, dtype=torch.float32) / P))
        return inv_freq, 1.0, softmax_scale
    from transformers import DeepseekV2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_theta": cfg.rope_theta, **cfg.rope_scaling}
    params.setdefault("rope_type", params.pop("type", "default"))
    hf = DeepseekV2Config(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        qk_rope_head_dim=P,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=params,
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf)
    mscale_all_dim = params.get("mscale_all_dim", 0)
    if mscale_all_dim:
        softmax_scale *= yarn_mscale(params["factor"], mscale_all_dim) ** 2
    return inv_freq.float(), float(attention_factor), softmax_scale


class Rotary(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        inv_freq, self.cos_sin_scale, self.softmax_scale = rope_parameters(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the frequencies (after ``to_empty`` from the meta device)."""
        self.inv_freq = rope_parameters(self.cfg)[0].to(self.inv_freq.device)

    def forward(self, positions_BL: torch.Tensor) -> torch.Tensor:
        """Complex rotations ``[B, L, P/2]`` for the given absolute positions."""
        freqs = positions_BL[..., None].float() * self.inv_freq
        return torch.polar(torch.full_like(freqs, self.cos_sin_scale), freqs)


def apply_rotary(x_BHLP: torch.Tensor, rot_BLP2: torch.Tensor) -> torch.Tensor:
    x = torch.view_as_complex(x_BHLP.float().reshape(*x_BHLP.shape[:-1], -1, 2))
    return torch.view_as_real(x * rot_BLP2.unsqueeze(1)).flatten(3).type_as(x_BHLP)


# ------------------------------------------------------------------------------------------ kv cache
@dataclass
class LayerCache:
    latent_BSR: torch.Tensor  # normed compressed kv
    k_pe_BSP: torch.Tensor  # rotated shared key


class KVCache:
    """Per-layer MLA latents for incremental decoding. ``select`` keeps a subset of batch rows (used when
    the text item of batch-parallel decoding finishes)."""

    def __init__(self, num_layers: int):
        self.layers: list[LayerCache | None] = [None] * num_layers

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first.latent_BSR.shape[1]

    def update(self, idx: int, latent_BLR: torch.Tensor, k_pe_BLP: torch.Tensor) -> LayerCache:
        old = self.layers[idx]
        if old is not None:
            latent_BLR = torch.cat([old.latent_BSR, latent_BLR], dim=1)
            k_pe_BLP = torch.cat([old.k_pe_BSP, k_pe_BLP], dim=1)
        self.layers[idx] = LayerCache(latent_BLR, k_pe_BLP)
        return self.layers[idx]

    def select(self, rows: torch.Tensor | list[int]) -> None:
        rows = torch.as_tensor(rows, dtype=torch.long)
        for i, c in enumerate(self.layers):
            if c is not None:
                r = rows.to(c.latent_BSR.device)
                self.layers[i] = LayerCache(c.latent_BSR[r], c.k_pe_BSP[r])


# ----------------------------------------------------------------------------------------------- MLA
class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.N, self.P, self.V = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        )
        self.R = cfg.kv_lora_rank
        D, qk = cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, self.H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.R + self.P, bias=False)
        self.kv_a_layernorm = RMSNorm(self.R)  # eps 1e-6 as the reference
        self.kv_b_proj = nn.Linear(self.R, self.H * (self.N + self.V), bias=False)
        self.o_proj = nn.Linear(self.H * self.V, D, bias=False)

    def forward(
        self, x_BLD: torch.Tensor, rot: torch.Tensor, softmax_scale: float, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        q = self.q_proj(x_BLD) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BLD)))
        q_BHLQ = q.view(B, L, self.H, self.N + self.P).transpose(1, 2)
        q_nope, q_pe = q_BHLQ.split([self.N, self.P], dim=-1)

        latent, k_pe = self.kv_a_proj_with_mqa(x_BLD).split([self.R, self.P], dim=-1)
        latent_BLR = self.kv_a_layernorm(latent)
        q_pe = apply_rotary(q_pe, rot)
        k_pe_BLP = apply_rotary(k_pe.unsqueeze(1), rot).squeeze(1)

        past = 0
        if cache is not None:
            old = cache.layers[self.layer_idx]
            past = 0 if old is None else old.latent_BSR.shape[1]
            entry = cache.update(self.layer_idx, latent_BLR, k_pe_BLP)
            latent_BLR, k_pe_BLP = entry.latent_BSR, entry.k_pe_BSP
        S = latent_BLR.shape[1]

        kv_BSHX = self.kv_b_proj(latent_BLR).view(B, S, self.H, self.N + self.V)
        k_nope, v = kv_BSHX.transpose(1, 2).split([self.N, self.V], dim=-1)
        k_BHSQ = torch.cat([k_nope, k_pe_BLP.unsqueeze(1).expand(B, self.H, S, self.P)], dim=-1)
        q_BHLQ = torch.cat([q_nope, q_pe], dim=-1)
        if past == 0:
            o = F.scaled_dot_product_attention(q_BHLQ, k_BHSQ, v, is_causal=True, scale=softmax_scale)
        else:  # new queries sit at positions past..past+L-1 and see every key up to their own position
            qpos = torch.arange(past, past + L, device=x_BLD.device)
            mask_LS = torch.arange(S, device=x_BLD.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(q_BHLQ, k_BHSQ, v, attn_mask=mask_LS, scale=softmax_scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.H * self.V))
