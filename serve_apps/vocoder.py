"""The Vocoder deployment: codec frames -> PCM, for many answers per call.

Stateless: the codec's explicit stream state travels in and out of every call (moshi-style,
:class:`~deepomni.serve.messages.VocodeItem` -> :class:`~deepomni.serve.messages.VocodedAudio`), so any
replica can decode the next chunk of any stream. The Backbone replicas send one call for all their sessions'
new frames, decoded as one batch (``Codec.stream_step_many``). The decoding is
:class:`deepomni.serve.vocoder.CodecVocoder` (Ray-free; the in-process benchmarks use it directly); this
replica loads the codec and serves it. Replicas and autoscaling: ``config.yaml``.
"""

from __future__ import annotations

from ray import serve

from deepomni.serve.messages import CodecInfo, VocodedAudio, VocodeFailed, VocodeItem
from deepomni.serve.vocoder import CodecVocoder
from deepomni.serve.config import AppConfig

from .loading import default_codec_spec


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
        self.vocoder = CodecVocoder(self.codec, self.spec)
        self.vocoder.warm_up()  # first-call costs here, not in the first user's answer

    def info(self) -> CodecInfo:
        return self.vocoder.info()

    async def decode(self, items: list[VocodeItem]) -> list[VocodedAudio | VocodeFailed]:
        """Stream steps of many answers as one batch (``Codec.stream_step_many``): per item the audio that
        became final and the next state, or why that item alone failed. A ``state`` of None starts a
        stream; ``final`` flushes it (the returned state is then None). Codes outside the codebook (the
        model's specials) are refused by ``Codec.check_codes``."""
        return await self.vocoder.decode(items)
