"""Codec frames -> PCM for many answers per call, Ray-free: :class:`CodecVocoder`.

Stateless: each stream's codec state travels in and out of every call (moshi-style,
:class:`~deepomni.serve.messages.VocodeItem` -> :class:`~deepomni.serve.messages.VocodedAudio`), so whoever
holds the codec can decode the next chunk of any stream. One call decodes every item's frames as one batch
(``Codec.stream_step_many``: under load, many answers' frames share the per-step overhead). The answer loop
uses it in-process (:class:`~deepomni.serve.answer_loop.AnswerLoop`'s vocoder); the Serve app's Vocoder
deployment (``serve_apps/vocoder.py``) is this class behind a replica.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import numpy as np
import torch

from .messages import CodecInfo, VocodedAudio, VocodeFailed, VocodeItem

if TYPE_CHECKING:
    from ..codec.base import Codec


class CodecVocoder:
    """``decode(items)``: per item the audio that became final and the next state, or why that item alone
    failed. ``spec`` names the codec in :meth:`info` (``builtin:<dir>`` | ``snac:<dir>``)."""

    def __init__(self, codec: Codec, spec: str = ""):
        self.codec, self.spec = codec, spec

    def warm_up(self) -> None:
        """First-call costs here, not in the first user's answer."""
        self.decode_now([VocodeItem(None, np.zeros((self.codec.num_channels, 2), dtype=np.int64), True)])

    def info(self) -> CodecInfo:
        c = self.codec
        return CodecInfo(codec=self.spec, sample_rate=c.sample_rate, num_channels=c.num_channels,
                         codebook_size=c.codebook_size, frame_rate=c.frame_rate)

    async def decode(self, items: list[VocodeItem]) -> list[VocodedAudio | VocodeFailed]:
        """:meth:`decode_now` in a worker thread (the caller's event loop stays free)."""
        return await asyncio.to_thread(self.decode_now, items)

    @torch.no_grad()
    def decode_now(self, items: list[VocodeItem]) -> list[VocodedAudio | VocodeFailed]:
        """Stream steps of many answers as one batch. A ``state`` of None starts a stream; ``final`` flushes
        it (the returned state is then None). Codes outside the codebook (the model's specials) are refused
        by ``Codec.check_codes``: that item fails, the others go on."""
        results: list[VocodedAudio | VocodeFailed | None] = [None] * len(items)
        states, codes, todo = [], [], []
        for i, item in enumerate(items):
            states.append(self.codec.init_stream_state() if item.state is None else item.state)
            codes.append(None)
            if item.codes_KF is not None and np.asarray(item.codes_KF).size:
                try:
                    codes[i] = self.codec.check_codes(torch.from_numpy(np.asarray(item.codes_KF)))
                    todo.append(i)
                except ValueError as e:
                    results[i] = VocodeFailed(str(e))
        audio = dict(zip(todo, self.codec.stream_step_many([states[i] for i in todo], [codes[i] for i in todo])))
        for i, item in enumerate(items):
            if results[i] is not None:
                continue
            parts = [np.zeros(0, dtype=np.float32), audio.get(i, np.zeros(0, dtype=np.float32))]
            state = states[i]
            if item.final:
                parts.append(self.codec.stream_flush(state))
                state = None
            results[i] = VocodedAudio(pcm=np.concatenate(parts).astype(np.float32, copy=False), state=state)
        return results
