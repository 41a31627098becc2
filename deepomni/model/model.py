"""DeepOmni: a DeepSeek-V2 MoE backbone that reads text + speech and writes a text channel plus K codec
channels in parallel.

    tokens_BLC --ChannelEmbedding (mean of channels; speech frames at AUDIO placeholders)--> x_BLD
      -> layer 0..first_k_dense-1: x + MLA(norm x); x + MLP(norm x)
      -> MoE layers:               x + MLA(norm x); x + MoE(norm x)      (shared + routed experts)
      -> norm -> tied head, one logit slice per channel

Parallelism (``deepomni.parallel``) and Ray plumbing (``jobs/``) never appear here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .attention import KVCache, MLAttention, RMSNorm, Rotary, SlotKVCache
from .channels import ChannelEmbedding, TextSpecial, VocabLayout, channel_loss
from .moe import MLP, MoE
from .speech import CTC_VOCAB, CharProjector, SpeechInput, audio_scatter


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BLD, rot, softmax_scale, cache):
        x_BLD = x_BLD + self.self_attn(self.input_layernorm(x_BLD), rot, softmax_scale, cache)
        h = self.mlp(self.post_attention_layernorm(x_BLD))
        if isinstance(h, tuple):
            h, aux = h
        else:
            aux = x_BLD.new_zeros(())
        return x_BLD + h, aux


@dataclass
class Output:
    logits: list[torch.Tensor]  # per channel, [B, L, channel vocab]
    aux_loss: torch.Tensor  # sum over MoE layers of the balance loss (0 in eval mode)
    loss: torch.Tensor | None = None  # channel loss + aux loss, when labels are given
    channel_losses: torch.Tensor | None = None  # [C] per-channel cross-entropy (NaN where absent)


class DeepOmniModel(nn.Module):
    def __init__(self, cfg: ModelConfig, with_speech_input: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.layout = VocabLayout.from_config(cfg)
        self.embed = ChannelEmbedding(self.layout, cfg.hidden_size, cfg.tie_word_embeddings)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        self.speech = SpeechInput(cfg.speech_encoder, cfg.hidden_size) if with_speech_input else None

    # ------------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None, include_encoder: bool = False,
                     prefix: str = "") -> "DeepOmniModel":
        """Random init as the DeepSeek-V2 family (normal, std ``initializer_range``; norms at 1) of the
        parameters whose name starts with ``prefix`` (all by default). The frozen speech encoder keeps its
        own (loaded or random) weights unless ``include_encoder``. Also recomputes the derived buffers, so a
        model built on the meta device can be ``to_empty``-ed and then initialised. Draws happen on each
        parameter's device (one generator per device, from ``seed``)."""
        self.embed.reset_buffers()
        self.rotary.reset_buffers()
        init_parameters([(n, p) for n, p in self.named_parameters()
                         if n.startswith(prefix) and (include_encoder or not n.startswith("speech.encoder."))],
                        seed, self.cfg.initializer_range)
        return self

    @classmethod
    def random(cls, cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               seed: int = 0, with_speech_input: bool = True) -> "DeepOmniModel":
        """A randomly initialised model built directly on ``device`` in ``dtype`` (nothing is materialised
        on the host first: a DeepSeek-V2-Lite-sized model goes straight to a GPU), encoder included."""
        with torch.device("meta"):
            model = cls(cfg, with_speech_input=with_speech_input)
        if dtype is not None:
            model = model.to(dtype)
        model = model.to_empty(device=device)
        return model.init_weights(seed, include_encoder=True)

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.layers if isinstance(b.mlp, MoE)]

    # --------------------------------------------------------------------------------------- forward
    def embed_inputs(self, tokens_BLC: torch.Tensor, audio: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Input embeddings; ``audio`` holds each sequence's projected speech (from :meth:`encode_speech`)."""
        if audio is None:
            return self.embed(tokens_BLC)
        mask_BL = tokens_BLC[..., 0] == self.layout.text(TextSpecial.AUDIO)
        audio_BLD = audio_scatter(audio, mask_BL, self.cfg.hidden_size)
        return self.embed(tokens_BLC, audio_BLD, mask_BL)

    def encode_speech(self, mel_BMT: torch.Tensor, num_mel_frames_B: list[int],
                      segments_B: list | None = None) -> list[torch.Tensor]:
        """Projected speech per utterance (``segments_B``: stored CTC segments, ``SpeechInput.forward``)."""
        if self.speech is None:
            raise RuntimeError("this model was built without speech input (with_speech_input=False)")
        return self.speech(mel_BMT, num_mel_frames_B, segments_B)

    @torch.no_grad()
    def init_projector_from_text(self, tok) -> None:
        """``positions="ctc"``: start the projector from this backbone's text embedding of each CTC symbol
        as ``tok`` encodes it (several ids: their mean), so heard characters first embed as typed ones
        (:meth:`CharProjector.init_from_text`)."""
        if self.speech is None or not isinstance(self.speech.projector, CharProjector):
            raise ValueError("init_projector_from_text needs speech_encoder.positions='ctc'")
        text_rows = self.embed.weight[self.layout.channel_offset(0):]
        chars_VD = torch.zeros_like(self.speech.projector.char_table)
        for v, c in enumerate(CTC_VOCAB[1:], start=1):  # the blank's row stays unused
            ids = tok.encode(c)
            if not ids:
                raise ValueError(f"the tokenizer encodes CTC symbol {c!r} to nothing")
            chars_VD[v] = text_rows[ids].float().mean(0)
        audio_D = text_rows[self.layout.text(TextSpecial.AUDIO)].float()
        self.speech.projector.init_from_text(chars_VD, audio_D, self.layout.num_codec_channels)

    def forward(
        self,
        tokens_BLC: torch.Tensor | None,
        audio: list[torch.Tensor] | None = None,
        labels_BLC: torch.Tensor | None = None,
        cache: KVCache | SlotKVCache | None = None,
        channels: list[int] | None = None,
        inputs_embeds_BLD: torch.Tensor | None = None,
        logits_at_B: torch.Tensor | None = None,
    ) -> Output:
        """Full forward (``cache=None``) or one incremental step appending to ``cache``.

        ``channels`` limits which channels' logits are computed (e.g. ``[0]`` for text-only decoding).
        ``inputs_embeds_BLD`` replaces the channel embedding (``tokens_BLC=None``), e.g. to run the bare
        backbone on text embeddings for parity checks against the released text model. ``logits_at_B``
        computes the logits at one position per row only (``[B, 1, V]`` per channel: a prefill needs the
        last prompt position's, not the whole prompt's)."""
        if (tokens_BLC is None) == (inputs_embeds_BLD is None):
            raise ValueError("pass exactly one of tokens_BLC and inputs_embeds_BLD")
        B, L = (tokens_BLC if tokens_BLC is not None else inputs_embeds_BLD).shape[:2]
        device = (tokens_BLC if tokens_BLC is not None else inputs_embeds_BLD).device
        if cache is None:
            positions_BL = torch.arange(L, device=device).expand(B, L)
        else:
            positions_BL = cache.positions(B, L, device)
        if B and L and int(positions_BL.max()) >= self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {int(positions_BL.max()) + 1} positions exceeds max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        rot = self.rotary(positions_BL)
        x_BLD = self.embed_inputs(tokens_BLC, audio) if inputs_embeds_BLD is None else inputs_embeds_BLD
        aux = x_BLD.new_zeros(())
        for block in self.layers:
            x_BLD, a = block(x_BLD, rot, self.rotary.softmax_scale, cache)
            aux = aux + a
        if cache is not None:
            cache.advance(L)
        if logits_at_B is not None:
            if labels_BLC is not None:
                raise ValueError("labels need the logits of every position (logits_at_B=None)")
            x_BLD = x_BLD[torch.arange(B, device=device), logits_at_B.to(device)].unsqueeze(1)
        h_BLD = self.norm(x_BLD)
        logits = self.embed.logits(h_BLD, channels)
        out = Output(logits, aux)
        if labels_BLC is not None:
            if channels is not None:
                raise ValueError("labels need the logits of every channel (channels=None)")
            ce, per_channel = channel_loss(logits, labels_BLC)
            out.loss, out.channel_losses = ce + aux, per_channel
        return out


@torch.no_grad()
def init_parameters(named: list[tuple[str, nn.Parameter]], seed: int | None, std: float) -> None:
    """:meth:`DeepOmniModel.init_weights` on the given parameters, in order: norms at 1, biases at 0, the rest
    normal(0, ``std``) drawn from one generator per device seeded with ``seed`` (so a part loaded on its own,
    e.g. the projector, draws what it draws inside the whole model). Parameters on the meta device are skipped."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in named:
        if p.device.type == "meta":
            continue
        if name.endswith("norm.weight") or name.endswith("layer_norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            gen = None
            if seed is not None:
                gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32, device=p.device) * std)


# ------------------------------------------------------------------------------------- parameter counts
def count_parameters(cfg: ModelConfig, include_speech_encoder: bool = False) -> dict[str, int]:
    """Parameter counts, computed on the meta device (nothing is allocated).

    ``active`` follows DeepSeek's convention: the parameters a token's forward pass multiplies with —
    everything but the routed experts, plus top-k experts per MoE layer, minus the input-embedding table
    (a lookup, not a matmul) unless that table is also the tied output head. ``backbone_*`` are the same
    counts for the text backbone as released (text vocabulary, embeddings and lm_head untied), which is
    what DeepSeek-V2-Lite's "15.7B total / 2.4B active" refers to."""
    with torch.device("meta"):
        model = DeepOmniModel(cfg, with_speech_input=include_speech_encoder)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(m.experts.gate_up_proj.numel() + m.experts.down_proj.numel() for m in model.moe_layers)
    active_routed = routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    table = model.embed.weight.numel()
    input_lookup = 0 if cfg.tie_word_embeddings else table
    text_table = cfg.text_vocab_size * cfg.hidden_size
    backbone_total = total - table * (1 if cfg.tie_word_embeddings else 2) + 2 * text_table
    if model.speech is not None:
        backbone_total -= sum(p.numel() for p in model.speech.parameters())
    return {
        "total": total,
        "active": total - routed + active_routed - input_lookup,
        "routed_experts": routed,
        "embedding_table": table,
        "backbone_total": backbone_total,
        "backbone_active": backbone_total - routed + active_routed - text_table,
    }
