"""The Vocoder deployment: codec frames -> PCM, for many answers per call.

Stateless: the codec's explicit stream state travels in and out of every call (moshi-style,
:class:`~serve_apps.messages.VocodeItem` -> :class:`~serve_apps.messages.VocodedAudio`), so any replica can
decode the next chunk of any stream. The Backbone replicas send one call for all their sessions' new
frames, decoded as one batch (``Codec.stream_step_many``). Replicas and autoscaling: ``config.yaml``.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from ray import serve

from .loading import AppConfig, default_codec_spec
from .messages import CodecInfo, VocodedAudio, VocodeFailed, VocodeItem


@serve.deployment(name="Vocoder")
class Vocoder:
    def __init__(self, cfg: AppConfig):
        from deepomni.codec import load_codec

        cfg.setup_torch()
        model_cfg = cfg.model_config()
        self.spec = cfg.codec or default_codec_spec(model_cfg)
        self.codec = load_codec(self.spec, device=cfg.torch_device())
        if self.codec.num_channels != model_cfg.num_codec_channels or self.codec.codebook_size > model_cfg.codebook_size:
            raise ValueError(f"codec {self.spec!r} has {self.codec.num_channels} channels x {self.codec.codebook_size} "
                             f"codes; the model writes {model_cfg.num_codec_channels} x {model_cfg.codebook_size}")
        # first-call costs here, not in the first user's answer
        self._decode([VocodeItem(None, np.zeros((self.codec.num_channels, 2), dtype=np.int64), True)])

    def info(self) -> CodecInfo:
        c = self.codec
        return CodecInfo(codec=self.spec, sample_rate=c.sample_rate, num_channels=c.num_channels,
                         codebook_size=c.codebook_size, frame_rate=c.frame_rate)

    async def decode(self, items: list[VocodeItem]) -> list[VocodedAudio | VocodeFailed]:
        """Stream steps of many answers as one batch (``Codec.stream_step_many``): per item the audio that
        became final and the next state, or why that item alone failed. A ``state`` of None starts a
        stream; ``final`` flushes it (the returned state is then None). Codes outside the codebook (the
        model's specials) are refused by ``Codec.check_codes``."""
        return await asyncio.to_thread(self._decode, items)

    @torch.no_grad()
    def _decode(self, items: list[VocodeItem]) -> list[VocodedAudio | VocodeFailed]:
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
