"""Server VAD (``turn_detection: server_vad``) of ``WS /v1/realtime``: where speech starts and stops in a
session's input audio.

Silero VAD (the ``silero-vad`` package, actively maintained) on its TorchScript model, which ships inside
the wheel (no download at run time) and needs only torch, already here (not torchaudio, nor onnxruntime);
it gives a speech probability per window, onto which OpenAI's ``threshold`` maps directly (webrtcvad has
only four aggressiveness modes). Without it, ``server_vad`` is an ``error`` and sessions start with
``turn_detection: null``. Speech starts at a 32 ms window whose speech probability is at least
``threshold`` and stops after ``silence_duration_ms`` below ``threshold - 0.15``; the committed item holds
``prefix_padding_ms`` of audio before the start. While no speech is heard the buffer keeps only that
padding.

:class:`SpeechDetector` decides, one window at a time, and says so (:class:`SpeechStarted`,
:class:`SpeechStopped`); the session (``realtime.py``) acts on it: the ``input_audio_buffer.speech_started``
/ ``speech_stopped`` events, barge-in, committing the turn. Times are milliseconds of the audio appended to
the session since it began.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
from dataclasses import dataclass

import numpy as np

from .openai_api import OPENAI_SAMPLE_RATE, new_id
from .protocol import pcm_s16le_to_float

VAD_AVAILABLE = importlib.util.find_spec("silero_vad") is not None
VAD_RATE = 16000  # Silero's
WINDOW_MS = 32  # SileroVad.WINDOW samples at VAD_RATE
STOP_MARGIN = 0.15  # speech stops below threshold - STOP_MARGIN: a hysteresis, so a dip does not end a turn


@dataclass
class TurnDetection:
    """``audio.input.turn_detection`` of type ``server_vad``: the detector's settings, as OpenAI names them."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None  # echoed, not acted on

    def body(self) -> dict:
        return {"type": "server_vad", **dataclasses.asdict(self)}


class SileroVad:
    """Speech probabilities of 32 ms windows (512 samples at 16 kHz) of a stream of 24 kHz pcm16 chunks."""

    WINDOW = 512

    def __init__(self):
        import soxr
        from silero_vad import load_silero_vad

        self.model = load_silero_vad(onnx=False)  # the TorchScript model inside the wheel
        self.resample = soxr.ResampleStream(OPENAI_SAMPLE_RATE, VAD_RATE, 1, dtype="float32")
        self.pending = np.zeros(0, dtype=np.float32)

    def probs(self, pcm: bytes) -> list[float]:
        import torch

        x = self.resample.resample_chunk(pcm_s16le_to_float(pcm))
        self.pending = np.concatenate([self.pending, x]) if len(self.pending) else x
        n = len(self.pending) // self.WINDOW
        out = []
        with torch.no_grad():
            for i in range(n):
                w = torch.from_numpy(np.ascontiguousarray(self.pending[i * self.WINDOW:(i + 1) * self.WINDOW]))
                out.append(float(self.model(w, VAD_RATE).item()))
        self.pending = self.pending[n * self.WINDOW:]
        return out


@dataclass
class SpeechStarted:
    start_ms: int  # where the turn's audio begins: the first speech window less the prefix padding
    item_id: str  # the item the turn will be committed as


@dataclass
class SpeechStopped:
    start_ms: int
    end_ms: int
    item_id: str


class SpeechDetector:
    """One session's server VAD: the speech probabilities of its input audio, and where speech starts and
    stops (see the module docstring). A fresh one each time server VAD is switched on."""

    def __init__(self, vad: SileroVad, at_ms: int):
        self.vad = vad
        self.heard_ms = at_ms  # the audio judged so far ends here
        self.start_ms: int | None = None  # the pending speech's start (with its padding); None: no speech
        self.silence_ms = 0
        self.item_id: str | None = None

    @classmethod
    async def load(cls, at_ms: int) -> SpeechDetector:
        """A detector whose first window begins at ``at_ms`` (the model loads in a thread)."""
        return cls(await asyncio.to_thread(SileroVad), at_ms)

    async def probs(self, pcm: bytes) -> list[float]:
        """The speech probabilities of the whole windows this chunk completes (in a thread)."""
        return await asyncio.to_thread(self.vad.probs, pcm)

    def step(self, p: float, td: TurnDetection, kept_ms: int, appended_ms: int
             ) -> SpeechStarted | SpeechStopped | None:
        """The next window, of speech probability ``p``: did speech start or stop there? ``kept_ms`` is where
        the session's buffer begins (the padding cannot reach before it), ``appended_ms`` where it ends."""
        self.heard_ms += WINDOW_MS
        if self.start_ms is None and p >= td.threshold:
            self.start_ms = max(kept_ms, self.heard_ms - WINDOW_MS - td.prefix_padding_ms)
            self.silence_ms, self.item_id = 0, new_id("item")
            return SpeechStarted(self.start_ms, self.item_id)
        if self.start_ms is not None:
            self.silence_ms = self.silence_ms + WINDOW_MS if p < max(td.threshold - STOP_MARGIN, 0.01) else 0
            if self.silence_ms >= td.silence_duration_ms:
                start, self.start_ms = self.start_ms, None
                return SpeechStopped(start, min(self.heard_ms, appended_ms), self.item_id)
        return None

    def forget(self) -> None:
        """The buffer was committed or cleared by the client: the pending speech went with it."""
        self.start_ms = None

    def padding_from_ms(self, td: TurnDetection) -> int:
        """Where the audio that the next start's padding may need begins (what is before it may go while no
        speech is heard)."""
        return max(0, self.heard_ms - td.prefix_padding_ms)
