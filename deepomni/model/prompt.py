"""Chat prompts as channel tokens: ``[BOS] USER <text or BOA AUDIO*n EOA> ASSISTANT`` on the text channel,
codec channels PAD (nothing to say yet). Training data (``deepomni.data``) and decoding share this.

A conversation (:func:`conversation`) continues the same grammar turn after turn:

    [BOS] [SYSTEM <instruction>] USER <q1> ASSISTANT <a1 text> EOT USER <q2> ASSISTANT

An earlier answer is its *text* only (codec channels PAD): that is exactly what the answer's text item
consumed while it was decoded (``deepomni.model.generate``), so the cache of that item is the cache of
this prefix and a next turn prefills only its own tokens (``deepomni.serve.engine``). Training sequences
are single turns; serving longer contexts is our extension (``docs/serving.md`` "Conversation memory").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .channels import CodecSpecial, TextSpecial, VocabLayout


def channel_tokens(layout: VocabLayout, text_ids: Sequence[int]) -> torch.Tensor:
    """``[L, C]`` tokens with ``text_ids`` on the text channel and PAD on every codec channel."""
    out = torch.full((len(text_ids), layout.num_channels), layout.codec(CodecSpecial.PAD), dtype=torch.long)
    out[:, 0] = torch.as_tensor(list(text_ids), dtype=torch.long)
    return out


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation: the user's (text ids, ``audio_positions`` speech frames, or both: text
    first) or the assistant's (its answer's text ids)."""

    role: str  # "user" | "assistant"
    text_ids: tuple[int, ...] | None = None
    audio_positions: int | None = None

    def __post_init__(self):
        if self.role not in ("user", "assistant"):
            raise ValueError(f"a turn's role is 'user' or 'assistant', got {self.role!r}")
        if self.text_ids is None and self.audio_positions is None:
            raise ValueError("a turn has text_ids or audio_positions")
        if self.role == "assistant" and (self.text_ids is None or self.audio_positions is not None):
            raise ValueError("an assistant turn is its answer's text ids")

    def ids(self, layout: VocabLayout) -> list[int]:
        t = layout.text
        if self.role == "assistant":
            return [t(TextSpecial.ASSISTANT), *self.text_ids, t(TextSpecial.EOT)]
        ids = [t(TextSpecial.USER), *(self.text_ids or ())]
        if self.audio_positions is not None:
            ids += [t(TextSpecial.BOA), *[t(TextSpecial.AUDIO)] * self.audio_positions, t(TextSpecial.EOA)]
        return ids


def conversation(layout: VocabLayout, turns: Sequence[Turn], system_ids: Sequence[int] | None = None) -> torch.Tensor:
    """The prompt ``[L, C]`` for the assistant's next answer after ``turns`` (the last one the user's)."""
    if not turns or turns[-1].role != "user":
        raise ValueError("a conversation prompt ends with a user turn")
    t = layout.text
    ids = [t(TextSpecial.BOS)]
    if system_ids:
        ids += [t(TextSpecial.SYSTEM), *system_ids]
    for i, turn in enumerate(turns):
        if turn.role == "assistant" and (i == 0 or turns[i - 1].role != "user"):
            raise ValueError("an assistant turn follows a user turn")
        ids += turn.ids(layout)
        if turn.role == "user" and i + 1 < len(turns) and turns[i + 1].role == "user":
            raise ValueError("two user turns in a row: put them in one turn")
    ids.append(t(TextSpecial.ASSISTANT))
    return channel_tokens(layout, ids)


def prompt_length(layout: VocabLayout, turns: Sequence[Turn], system_ids: Sequence[int] | None = None) -> int:
    """``conversation(layout, turns, system_ids).shape[0]`` without building it."""
    return 2 + (1 + len(system_ids) if system_ids else 0) + sum(len(turn.ids(layout)) for turn in turns)


def fitting_starts(layout: VocabLayout, turns: Sequence[Turn], max_positions: int,
                   system_ids: Sequence[int] | None = None) -> list[int]:
    """The turns a prompt may start from and fit ``max_positions``: indices of user turns, oldest first
    (dropping the turns before one drops whole exchanges; the system slot always stays). Empty when even
    the last user turn alone does not fit."""
    starts = [i for i, turn in enumerate(turns) if turn.role == "user"]
    return [i for i in starts if prompt_length(layout, turns[i:], system_ids) <= max_positions]


def user_turn(layout: VocabLayout, text_ids: Sequence[int] | None = None, audio_positions: int | None = None,
              system_ids: Sequence[int] | None = None) -> torch.Tensor:
    """A user turn with text or speech input, ready for the assistant's answer: ``[L, C]``."""
    if (text_ids is None) == (audio_positions is None):
        raise ValueError("a user turn has either text_ids or audio_positions")
    turn = Turn("user", None if text_ids is None else tuple(text_ids), audio_positions)
    return conversation(layout, [turn], system_ids)
