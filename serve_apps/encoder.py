"""The SpeechEncoder deployment: audio bytes -> the projected speech the backbone reads.

Audio bytes (a file, or raw ``pcm_s16le`` at a given rate) -> checked 16 kHz mono
(``deepomni.audio.load_audio``) -> log-mel -> Whisper encoder + projector -> the projected speech ``[n, D]``
the backbone reads at its AUDIO positions (:class:`~deepomni.serve.messages.EncodedSpeech`). Turns that arrive
while a batch is being encoded are encoded together next (:class:`~serve_apps.batching.CallBatcher`). Bad
audio is *returned* as :class:`~deepomni.serve.messages.AudioRejected`, not raised: the ingress turns it into a
422. Replicas and autoscaling: ``config.yaml``.

The encoding itself is :class:`SpeechEncoding` (no Ray: ``benchmarks/serve_latency.py`` runs it in process):
an encoder that reads each utterance's own frames gets features up to the batch's longest question only and
encodes buckets of similar lengths (``deepomni.model.speech.SpeechInput.encode``), so a burst of short
questions costs their audio, not one encoder window each.
"""

from __future__ import annotations

import numpy as np
import torch
from ray import serve

from deepomni.serve.messages import AudioRejected, EncodedSpeech, EncoderInfo
from deepomni.serve.config import AppConfig

from .batching import CallBatcher
from .loading import load_serving_model
from .protocol import audio_reason, pcm_s16le_to_float

MAX_ENCODE_BATCH = 16  # turns encoded together


@serve.deployment(name="SpeechEncoder")
class SpeechEncoder:
    def __init__(self, cfg: AppConfig):
        cfg.setup_torch(cfg.encoder_threads)
        # the frozen encoder + projector, nothing of the LLM (deepomni.checkpoint.load_part)
        self.encoding = SpeechEncoding(load_serving_model(cfg, "speech"), cfg.torch_device())
        self.hidden_size = cfg.model_config().hidden_size
        self._batch: CallBatcher[tuple[bytes, int | None], EncodedSpeech | AudioRejected] = \
            CallBatcher(self.encoding.encode_many, MAX_ENCODE_BATCH)
        tone = (3000 * np.sin(np.arange(3200) * 0.1)).astype(np.int16).tobytes()
        self.encoding.encode_many([(tone, 16000)])  # first-call costs here, not in the first user's turn

    def info(self) -> EncoderInfo:
        return EncoderInfo(max_seconds=self.encoding.max_seconds, hidden_size=self.hidden_size)

    async def encode(self, audio: bytes, pcm_sample_rate: int | None = None) -> EncodedSpeech | AudioRejected:
        """Encoded audio (or raw ``pcm_s16le`` at ``pcm_sample_rate``) -> the projected speech and the input's
        duration, or why the audio was refused."""
        return await self._batch((audio, pcm_sample_rate))


class SpeechEncoding:
    """Audio bytes of several turns -> their projected speech, as one batch: what a SpeechEncoder replica
    runs, with no Ray. ``speech``: a :class:`deepomni.model.speech.SpeechInput` (frozen encoder + projector)."""

    def __init__(self, speech, device: torch.device):
        from deepomni.audio import LogMel

        self.speech, self.device = speech, device
        self.logmel = LogMel.from_config(speech.cfg)
        self.max_seconds = self.logmel.max_seconds

    def _load(self, audio: bytes, pcm_sample_rate: int | None) -> np.ndarray | AudioRejected:
        from deepomni.audio import AudioError, load_audio

        try:
            if pcm_sample_rate is not None:
                return load_audio(pcm_s16le_to_float(audio), sample_rate=pcm_sample_rate, max_seconds=self.max_seconds)
            return load_audio(audio, max_seconds=self.max_seconds)
        except AudioError as e:
            return AudioRejected(reason=audio_reason(str(e)), message=str(e))
        except (ValueError, TypeError) as e:
            return AudioRejected(reason="bad_audio", message=str(e))

    @torch.no_grad()
    def encode_many(self, items: list[tuple[bytes, int | None]]) -> list[EncodedSpeech | AudioRejected]:
        """``(audio bytes, pcm_sample_rate or None)`` per turn -> its :class:`EncodedSpeech`, or why it was refused
        (a bad turn does not fail the others)."""
        from deepomni.audio import WHISPER_SAMPLE_RATE

        out: list = [self._load(*item) for item in items]
        ok = [i for i, w in enumerate(out) if isinstance(w, np.ndarray)]
        if ok:
            wavs = [out[i] for i in ok]
            mel, frames = self.logmel(wavs)
            for i, wav, audio_ND in zip(ok, wavs, self.speech(mel.to(self.device), frames)):
                out[i] = EncodedSpeech(audio_ND=audio_ND.float().cpu().numpy(), seconds=len(wav) / WHISPER_SAMPLE_RATE)
        return out
