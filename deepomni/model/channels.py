"""Multi-channel tokens: one text channel + K codec channels at every position.

Vocabulary layout (docs/paper.md "Tokens and channels"), in *global* ids of the one extended embedding table:

    [ text block (text_vocab_size) | 64 text specials | codec 0 (codebook + 64) | ... | codec K-1 (...) ]

Data and labels carry *channel-local* ids (text: 0..text_vocab+63, codec i: 0..codebook+63) in a tensor
``tokens_BLC`` with C = K+1 channels (channel 0 = text); the embedding adds each channel's offset.
Input embedding of a position = mean of the embeddings of its channels that are not PAD (a text-only
position is its text row alone: see :meth:`ChannelEmbedding.forward`). The LM head is tied to the same table;
channel c reads only its own slice of rows, so its logits have the channel-local vocabulary.

Delay pattern: codec channel i (0-based) runs i+1 steps behind the text channel, so coarse codes are
predicted before fine ones. :func:`delay_codes` builds it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .prepack import linear

IGNORE = -100  # label value skipped by the loss


class TextSpecial(enum.IntEnum):
    """Offsets of the text channel's special tokens, after the text vocabulary."""

    PAD = 0  # text channel filler once the text has ended but speech goes on (label: IGNORE)
    BOA = 1  # begin of input audio
    EOA = 2  # end of input audio
    AUDIO = 3  # placeholder on the text channel at projected-speech positions
    EOT = 4  # end of the text answer
    BOS = 5
    USER = 6
    ASSISTANT = 7
    SYSTEM = 8
    EOS = 9  # end of turn (after text and speech have both ended)


class CodecSpecial(enum.IntEnum):
    """Offsets of every codec channel's special tokens, after its codebook."""

    PAD = 0  # nothing on this channel here (prompt positions, delay lead-in / tail)
    EOS = 1  # end of speech on this channel


@dataclass(frozen=True)
class VocabLayout:
    text_vocab_size: int
    codebook_size: int
    num_codec_channels: int
    num_special: int = 64

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "VocabLayout":
        return cls(cfg.text_vocab_size, cfg.codebook_size, cfg.num_codec_channels, cfg.num_special_tokens)

    @property
    def num_channels(self) -> int:
        return 1 + self.num_codec_channels

    def channel_size(self, c: int) -> int:
        return self.text_vocab_size + self.num_special if c == 0 else self.codebook_size + self.num_special

    def channel_offset(self, c: int) -> int:
        if c == 0:
            return 0
        return self.channel_size(0) + (c - 1) * self.channel_size(1)

    @property
    def total_size(self) -> int:
        return self.channel_offset(self.num_channels - 1) + self.channel_size(self.num_channels - 1)

    # channel-local ids of the specials
    def text(self, s: TextSpecial) -> int:
        return self.text_vocab_size + int(s)

    def codec(self, s: CodecSpecial) -> int:
        return self.codebook_size + int(s)

    def pads(self, device=None) -> torch.Tensor:
        """Each channel's PAD id (channel-local): the token that says "nothing here"."""
        return torch.tensor([self.text(TextSpecial.PAD)] + [self.codec(CodecSpecial.PAD)] * self.num_codec_channels,
                            device=device)

    def offsets(self, device=None) -> torch.Tensor:
        return torch.tensor([self.channel_offset(c) for c in range(self.num_channels)], device=device)


class ChannelEmbedding(nn.Module):
    """The extended embedding table, the mean-of-channels input embedding and the per-channel head
    (tied to the table by default)."""

    def __init__(self, layout: VocabLayout, hidden_size: int, tied: bool = True):
        super().__init__()
        self.layout = layout
        self.weight = nn.Parameter(torch.empty(layout.total_size, hidden_size))
        # untied: a separate output table with the same layout (see ModelConfig.tie_word_embeddings)
        self.head_weight = None if tied else nn.Parameter(torch.empty(layout.total_size, hidden_size))
        # rows that get gradients (None: all); S1 trains only the rows the extension added (docs/paper.md "Training stages")
        self.trainable_rows: torch.Tensor | None = None
        self.register_buffer("offsets_C", layout.offsets(), persistent=False)
        self.register_buffer("pad_C", layout.pads(), persistent=False)

    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        from .moe import mask_grad_rows

        return w if self.trainable_rows is None else mask_grad_rows(w, self.trainable_rows.to(w.device))

    def codec_rows(self) -> torch.Tensor:
        """True for the rows of every codec block (the speech vocabulary the extension added)."""
        rows = torch.zeros(self.layout.total_size, dtype=torch.bool)
        rows[self.layout.channel_offset(1):] = True
        return rows

    def reset_buffers(self) -> None:
        self.offsets_C = self.layout.offsets(self.offsets_C.device)
        self.pad_C = self.layout.pads(self.pad_C.device)

    def forward(
        self, tokens_BLC: torch.Tensor, audio_BLD: torch.Tensor | None = None, audio_mask_BL: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean of the embeddings of the channels that have something to say.

        A channel holding its PAD token contributes nothing (where every channel is PAD, the text PAD row
        stands), so a text-only position embeds exactly as the source text LLM embeds that token: an
        imported backbone is itself at step 0 whatever K (the paper leaves this open; our choice: docs/paper.md "Tokens and channels"). Where
        ``audio_mask_BL`` is set, the projected speech feature ``audio_BLD`` takes the place of the K codec
        channels (the text channel keeps its AUDIO token): ``(e_text + K * audio) / (K + 1)``."""
        C = tokens_BLC.shape[-1]
        if C != self.layout.num_channels:
            raise ValueError(f"tokens have {C} channels, the model expects {self.layout.num_channels}")
        emb_BLCD = F.embedding(tokens_BLC + self.offsets_C, self._rows(self.weight))
        says_BLC = tokens_BLC != self.pad_C
        says_BLC[..., 0] |= ~says_BLC.any(dim=-1)
        if audio_BLD is None:
            w_BLC = says_BLC.to(emb_BLCD.dtype)
            return (w_BLC.unsqueeze(-1) * emb_BLCD).sum(dim=2) / w_BLC.sum(dim=-1, keepdim=True)
        K, audio_BL1 = C - 1, audio_mask_BL.unsqueeze(-1)
        says_BLC[..., 1:] &= ~audio_BL1  # the speech feature takes the place of the codec channels
        w_BLC = says_BLC.to(emb_BLCD.dtype)
        summed_BLD = (w_BLC.unsqueeze(-1) * emb_BLCD).sum(dim=2) + audio_BL1 * (K * audio_BLD.to(emb_BLCD.dtype))
        return summed_BLD / (w_BLC.sum(dim=-1, keepdim=True) + K * audio_BL1)

    def logits(self, h_BLD: torch.Tensor, channels: list[int] | None = None) -> list[torch.Tensor]:
        """Per-channel logits (channel-local vocabularies) from the tied table."""
        table = self._rows(self.weight if self.head_weight is None else self.head_weight)
        out = []
        for c in range(self.layout.num_channels) if channels is None else channels:
            start = self.layout.channel_offset(c)
            out.append(linear(h_BLD, table[start : start + self.layout.channel_size(c)]))
        return out


def channel_loss(logits: list[torch.Tensor], labels_BLC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the per-channel cross-entropies of the channels that have any label.

    Returns ``(loss, per_channel_C)`` (NaN for channels with no label)."""
    per_channel = []
    for c, lg in enumerate(logits):
        lab = labels_BLC[..., c]
        if (lab != IGNORE).any():
            per_channel.append(F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), lab.reshape(-1), ignore_index=IGNORE))
        else:
            per_channel.append(lg.new_full((), float("nan")))
    stacked = torch.stack(per_channel)
    present = ~torch.isnan(stacked)
    if not present.any():
        raise ValueError("no channel has any label: nothing to learn from this batch")
    return stacked[present].mean(), stacked.detach()


# ------------------------------------------------------------------------------------------ delay
def delay_codes(codes_KF: torch.Tensor, pad: int, eos: int | None = None) -> torch.Tensor:
    """Delay pattern: row i shifted right by i+1 steps; ``[K, F] -> [K, F + K + 1]``.

    Cells before a row starts hold ``pad``; the cell right after its last code holds ``eos`` (if given,
    else ``pad``), later cells ``pad``. Works on a leading batch dimension too (``[B, K, F]``)."""
    *lead, K, Fr = codes_KF.shape
    out = codes_KF.new_full((*lead, K, Fr + K + 1), pad)
    for i in range(K):
        out[..., i, i + 1 : i + 1 + Fr] = codes_KF[..., i, :]
        if eos is not None:
            out[..., i, i + 1 + Fr] = eos
    return out
