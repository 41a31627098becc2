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
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .prepack import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in fp32, cast back, then scaled, as the reference (``x * rsqrt(mean(x^2) + eps)``);
        # torch's fused kernel gives the same bits in one op instead of six (forward and backward)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


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
    """Per-layer MLA latents for incremental decoding; every row has the same length. ``select`` keeps a
    subset of batch rows (used when the text item of batch-parallel decoding finishes).

    The cache protocol the model uses (shared with :class:`SlotKVCache`): :meth:`positions` of the new
    tokens, :meth:`update` (append one layer's new entries; returns what attention reads and its mask,
    ``None`` meaning plain causal) and :meth:`advance` once per forward."""

    def __init__(self, num_layers: int):
        self.layers: list[LayerCache | None] = [None] * num_layers

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first.latent_BSR.shape[1]

    def positions(self, B: int, L: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.length, self.length + L, device=device).expand(B, L)

    def update(
        self, idx: int, latent_BLR: torch.Tensor, k_pe_BLP: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        old = self.layers[idx]
        past = 0 if old is None else old.latent_BSR.shape[1]
        L = latent_BLR.shape[1]
        if old is not None:
            latent_BLR = torch.cat([old.latent_BSR, latent_BLR], dim=1)
            k_pe_BLP = torch.cat([old.k_pe_BSP, k_pe_BLP], dim=1)
        self.layers[idx] = LayerCache(latent_BLR, k_pe_BLP)
        if past == 0:
            return latent_BLR, k_pe_BLP, None
        # new queries sit at positions past..past+L-1 and see every key up to their own position
        S, device = past + L, latent_BLR.device
        mask_LS = torch.arange(S, device=device)[None, :] <= torch.arange(past, S, device=device)[:, None]
        return latent_BLR, k_pe_BLP, mask_LS

    def advance(self, L: int) -> None:
        pass  # lengths follow the stored tensors

    def select(self, rows: torch.Tensor | list[int]) -> None:
        rows = torch.as_tensor(rows, dtype=torch.long)
        for i, c in enumerate(self.layers):
            if c is not None:
                r = rows.to(c.latent_BSR.device)
                self.layers[i] = LayerCache(c.latent_BSR[r], c.k_pe_BSP[r])

    def repeated(self, n: int) -> "KVCache":
        """A new cache holding this one-row cache's entries ``n`` times (a stored prefix, for an answer's
        items to continue from); the stored one is left as it is."""
        out = KVCache(len(self.layers))
        out.layers = [None if c is None else LayerCache(c.latent_BSR.expand(n, -1, -1).clone(),
                                                        c.k_pe_BSP.expand(n, -1, -1).clone()) for c in self.layers]
        return out


class SlotKVCache:
    """Preallocated latents for continuous batching: rows ``0..n-1`` are in use, each with its own length.

    A forward over this cache takes the rows of its window (:meth:`window`; by default all ``n``); row
    ``b``'s new tokens go to positions ``lens[b]...`` and attend to its own keys only. :meth:`append` adds the
    rows of a prefilled :class:`KVCache` (a session joining the batch), :meth:`reserve` adds empty rows (a
    session prefilled in place, in chunks), :meth:`keep` drops rows and compacts the rest to ``0..n'-1`` in
    the given order (sessions leaving). Attention reads ``[rows, :max(lens)+L]`` views, so a step costs what
    the longest row of the window needs, not the capacity.

    A window opened with ``ragged=True`` takes right-padded inputs (a batched prefill of prompts of different
    lengths): positions are clamped to the capacity (a padded position past a row's end writes nothing any
    real position reads), and :meth:`advance` leaves the lengths to :meth:`set_lengths`."""

    def __init__(self, num_layers: int, rows: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.capacity, self.max_len = rows, max_len
        self.latent = [torch.zeros(rows, max_len, kv_lora_rank, dtype=dtype, device=device)
                       for _ in range(num_layers)]
        self.k_pe = [torch.zeros(rows, max_len, rope_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lens = torch.zeros(rows, dtype=torch.long, device=device)
        self.n = 0
        self._pos_BL = self._mask_B1LS = torch.zeros(0)
        self._window: tuple[int, int, bool] | None = None  # (first row, end row, ragged); None: all n rows

    @classmethod
    def for_model(cls, model, rows: int, max_len: int) -> "SlotKVCache":
        cfg, w = model.cfg, model.embed.weight
        return cls(len(model.layers), rows, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, w.dtype, w.device)

    @property
    def free_rows(self) -> int:
        return self.capacity - self.n

    def append(self, prefill: KVCache, rows: list[int] | None = None) -> list[int]:
        """Copy ``rows`` of a prefilled cache (all by default) into new slots; returns their row ids."""
        src = list(range(prefill.layers[0].latent_BSR.shape[0])) if rows is None else rows
        S = prefill.length
        if len(src) > self.free_rows:
            raise RuntimeError(f"{len(src)} rows requested, {self.free_rows} free")
        if S > self.max_len:
            raise ValueError(f"prefill of {S} positions exceeds the cache's max_len {self.max_len}")
        dst = list(range(self.n, self.n + len(src)))
        idx = torch.as_tensor(src, dtype=torch.long, device=self.lens.device)
        for i, c in enumerate(prefill.layers):
            self.latent[i][dst[0] : dst[-1] + 1, :S] = c.latent_BSR.index_select(0, idx.to(c.latent_BSR.device))
            self.k_pe[i][dst[0] : dst[-1] + 1, :S] = c.k_pe_BSP.index_select(0, idx.to(c.k_pe_BSP.device))
        self.lens[dst[0] : dst[-1] + 1] = S
        self.n += len(src)
        return dst

    def reserve(self, n: int) -> list[int]:
        """``n`` new empty rows (length 0), to be prefilled in place; returns their row ids."""
        if n > self.free_rows:
            raise RuntimeError(f"{n} rows requested, {self.free_rows} free")
        dst = list(range(self.n, self.n + n))
        self.lens[self.n : self.n + n] = 0
        self.n += n
        return dst

    def set_lengths(self, rows: list[int], lens: list[int]) -> None:
        self.lens[torch.as_tensor(rows, dtype=torch.long, device=self.lens.device)] = torch.as_tensor(
            lens, dtype=torch.long, device=self.lens.device)

    @contextmanager
    def window(self, start: int, end: int, ragged: bool = False):
        """Forwards inside run over rows ``start..end-1`` only (a decode step over the live rows, a prefill
        over the rows being prefilled)."""
        if not 0 <= start <= end <= self.n:
            raise ValueError(f"window [{start}, {end}) outside the {self.n} rows in use")
        self._window = (start, end, ragged)
        try:
            yield self
        finally:
            self._window = None

    def _rows(self) -> tuple[int, int, bool]:
        return self._window if self._window is not None else (0, self.n, False)

    def row(self, r: int) -> KVCache:
        """A copy of row ``r``'s entries as a one-row :class:`KVCache`."""
        S = int(self.lens[r])
        out = KVCache(len(self.latent))
        out.layers = [LayerCache(lat[r : r + 1, :S].clone(), pe[r : r + 1, :S].clone())
                      for lat, pe in zip(self.latent, self.k_pe)]
        return out

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order) as the new rows ``0..len(rows)-1``."""
        if rows == list(range(self.n))[: len(rows)]:
            self.n = len(rows)
            return
        if not rows:
            self.n = 0
            return
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.lens.device)
        S = int(self.lens[idx].max())
        m = len(rows)
        for i in range(len(self.latent)):
            self.latent[i][:m, :S] = self.latent[i][idx, :S]
            self.k_pe[i][:m, :S] = self.k_pe[i][idx, :S]
        self.lens[:m] = self.lens[idx].clone()
        self.n = m

    def positions(self, B: int, L: int, device: torch.device) -> torch.Tensor:
        r0, r1, ragged = self._rows()
        if B != r1 - r0:
            raise ValueError(f"a step over a SlotKVCache takes the {r1 - r0} rows of its window, got {B}")
        lens = self.lens[r0:r1]
        longest = int(lens.max()) if B else 0
        if longest + L > self.max_len and not ragged:
            raise ValueError(f"a row would exceed the cache's max_len {self.max_len}")
        # kept for this forward's layers: where each row writes, what it attends to
        self._pos_BL = lens[:, None] + torch.arange(L, device=self.lens.device)
        if ragged:  # padding past a row's end: clamped, it lands on a slot no real position reads yet
            self._pos_BL = self._pos_BL.clamp(max=self.max_len - 1)
        S = min(longest + L, self.max_len)
        self._mask_B1LS = (torch.arange(S, device=self.lens.device)[None, None, :] <= self._pos_BL[:, :, None]).unsqueeze(1)
        return self._pos_BL

    def update(
        self, idx: int, latent_BLR: torch.Tensor, k_pe_BLP: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, _ = latent_BLR.shape
        pos_BL, mask_B1LS = self._pos_BL, self._mask_B1LS  # set by positions() at the start of the forward
        if pos_BL.shape != (B, L):
            raise RuntimeError("SlotKVCache.update without positions() for this step")
        r0, r1, _ = self._rows()
        rows_BL = torch.arange(r0, r1, device=pos_BL.device)[:, None].expand(B, L)
        self.latent[idx][rows_BL, pos_BL] = latent_BLR.to(self.latent[idx].dtype)
        self.k_pe[idx][rows_BL, pos_BL] = k_pe_BLP.to(self.k_pe[idx].dtype)
        S = mask_B1LS.shape[-1]
        return self.latent[idx][r0:r1, :S], self.k_pe[idx][r0:r1, :S], mask_B1LS

    def advance(self, L: int) -> None:
        r0, r1, ragged = self._rows()
        if not ragged:
            self.lens[r0:r1] += L


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
            self.q_proj = Linear(D, self.H * qk)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.H * qk)
        self.kv_a_proj_with_mqa = Linear(D, self.R + self.P)
        self.kv_a_layernorm = RMSNorm(self.R)  # eps 1e-6 as the reference
        self.kv_b_proj = Linear(self.R, self.H * (self.N + self.V))
        self.o_proj = Linear(self.H * self.V, D)

    def forward(
        self, x_BLD: torch.Tensor, rot: torch.Tensor, softmax_scale: float, cache: KVCache | SlotKVCache | None = None
    ) -> torch.Tensor:
        B, L, _ = x_BLD.shape
        q = self.q_proj(x_BLD) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BLD)))
        q_BHLQ = q.view(B, L, self.H, self.N + self.P).transpose(1, 2)
        q_nope, q_pe = q_BHLQ.split([self.N, self.P], dim=-1)

        latent, k_pe = self.kv_a_proj_with_mqa(x_BLD).split([self.R, self.P], dim=-1)
        latent_BLR = self.kv_a_layernorm(latent)
        q_pe = apply_rotary(q_pe, rot)
        k_pe_BLP = apply_rotary(k_pe.unsqueeze(1), rot).squeeze(1)

        mask = None  # None: plain causal from position 0
        if cache is not None:
            latent_BLR, k_pe_BLP, mask = cache.update(self.layer_idx, latent_BLR, k_pe_BLP)
        S = latent_BLR.shape[1]
        if self.absorb(L, S):
            o = self._attend_absorbed(q_nope, q_pe, latent_BLR, k_pe_BLP, mask, softmax_scale)
            return self.o_proj(o.transpose(1, 2).reshape(B, L, self.H * self.V))

        kv_BSHX = self.kv_b_proj(latent_BLR).view(B, S, self.H, self.N + self.V)
        k_nope, v = kv_BSHX.transpose(1, 2).split([self.N, self.V], dim=-1)
        k_BHSQ = torch.cat([k_nope, k_pe_BLP.unsqueeze(1).expand(B, self.H, S, self.P)], dim=-1)
        q_BHLQ = torch.cat([q_nope, q_pe], dim=-1)
        if mask is None:
            o = F.scaled_dot_product_attention(q_BHLQ, k_BHSQ, v, is_causal=True, scale=softmax_scale)
        else:
            o = F.scaled_dot_product_attention(q_BHLQ, k_BHSQ, v, attn_mask=mask, scale=softmax_scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.H * self.V))

    def absorb(self, L: int, S: int) -> bool:
        """Whether ``L`` new queries over ``S`` keys are cheaper in the latent space (decoding: few queries,
        a long cache). Per key and head the expanded form costs ``R * (N + V)`` once plus ``N + P + V`` per
        query; the absorbed form ``2 * R + P`` per query."""
        return L < S and L * (2 * self.R - self.N - self.V) < self.R * (self.N + self.V)

    def _attend_absorbed(self, q_nope_BHLN: torch.Tensor, q_pe_BHLP: torch.Tensor, latent_BSR: torch.Tensor,
                         k_pe_BSP: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """The same attention with ``kv_b_proj`` absorbed (DeepSeek-V2 sec. 2.1.2): its key half folds into the
        queries and its value half into the output, so the cached latents are read as they are, never
        expanded to per-head keys and values. Returns ``[B, H, L, V]``."""
        B, H, L, _ = q_nope_BHLN.shape
        S, R = latent_BSR.shape[1], self.R
        W_HXR = self.kv_b_proj.weight.view(H, self.N + self.V, R)
        # W_UK absorbed into the queries; einsum runs it as one bmm over heads with the batch folded into
        # its rows (a broadcasting matmul would copy the weight once per batch row)
        q_BHLR = torch.einsum("bhln,hnr->bhlr", q_nope_BHLN, W_HXR[:, : self.N])
        scores = torch.bmm(q_BHLR.reshape(B, H * L, R), latent_BSR.transpose(1, 2))
        scores = scores + torch.bmm(q_pe_BHLP.reshape(B, H * L, self.P), k_pe_BSP.transpose(1, 2))
        scores_BHLS = scores.view(B, H, L, S).float() * scale
        if mask is None:  # plain causal: the new queries are the last L positions
            mask = torch.arange(S, device=scores.device)[None, :] <= torch.arange(S - L, S, device=scores.device)[:, None]
        p_BHLS = scores_BHLS.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(latent_BSR.dtype)
        o_BHLR = torch.bmm(p_BHLS.view(B, H * L, S), latent_BSR).view(B, H, L, R)
        return torch.einsum("bhlr,hvr->bhlv", o_BHLR, W_HXR[:, self.N :])  # W_UV absorbed into the output
