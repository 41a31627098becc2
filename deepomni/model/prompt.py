"""Chat prompts as channel tokens: ``[BOS] USER <text or BOA AUDIO*n EOA> ASSISTANT`` on the text channel,
codec channels PAD (nothing to say yet). Training data (``deepomni.data``) and decoding share this."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .channels import CodecSpecial, TextSpecial, VocabLayout


def channel_tokens(layout: VocabLayout, text_ids: Sequence[int]) -> torch.Tensor:
    """``[L, C]`` tokens with ``text_ids`` on the text channel and PAD on every codec channel."""
    out = torch.full((len(text_ids), layout.num_channels), layout.codec(CodecSpecial.PAD), dtype=torch.long)
    out[:, 0] = torch.as_tensor(list(text_ids), dtype=torch.long)
    return out


def user_turn(layout: VocabLayout, text_ids: Sequence[int] | None = None, audio_positions: int | None = None,
              system_ids: Sequence[int] | None = None) -> torch.Tensor:
    """A user turn with text or speech input, ready for the assistant's answer: ``[L, C]``."""
    if (text_ids is None) == (audio_positions is None):
        raise ValueError("a user turn has either text_ids or audio_positions")
    t = layout.text
    ids = [t(TextSpecial.BOS)]
    if system_ids:
        ids += [t(TextSpecial.SYSTEM), *system_ids]
    ids.append(t(TextSpecial.USER))
    if text_ids is not None:
        ids += list(text_ids)
    else:
        ids += [t(TextSpecial.BOA)] + [t(TextSpecial.AUDIO)] * audio_positions + [t(TextSpecial.EOA)]
    ids.append(t(TextSpecial.ASSISTANT))
    return channel_tokens(layout, ids)
