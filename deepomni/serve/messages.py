"""The messages of an answer: plain dataclasses (numpy arrays, numbers, strings), Ray-free.

The answer loop (:class:`deepomni.serve.answer_loop.AnswerLoop`) takes a :class:`Conversation` and
:class:`GenerateOptions` and streams :class:`AnswerChunk`; it hands codec frames to its vocoder as
:class:`VocodeItem` and gets :class:`VocodedAudio` or :class:`VocodeFailed` back. In the Ray Serve app
(``serve_apps/``) the same types cross the deployment boundaries, pickled by Ray:

    Ingress --encode(audio, pcm_sample_rate)--> SpeechEncoder   -> EncodedSpeech | AudioRejected
    Ingress --generate(Conversation, GenerateOptions, *heard)--> Backbone   -> stream of AnswerChunk
             (``heard``: the SpeechEncoder's responses, passed on unopened: Ray hands the Backbone their
              results, EncodedSpeech | AudioRejected, which the turns name by index, ConversationTurn.heard)
    Backbone --decode([VocodeItem, ...])--> Vocoder   -> [VocodedAudio | VocodeFailed, ...], one per item
    info():  SpeechEncoder -> EncoderInfo, Vocoder -> CodecInfo, Backbone -> BackboneInfo (with the CodecInfo)

A refusal the client should hear (bad audio, a prompt too long) is a *result* (:class:`AudioRejected`,
:class:`AnswerError`), not an exception: the ingress turns its ``reason`` into the protocol's status
(``serve_apps/protocol.py``). The JSON the client sees is built by the ingress, never by these types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


# ---------------------------------------------------------------------------------------------- encoder
@dataclass(frozen=True)
class EncoderInfo:
    max_seconds: float  # the speech encoder's window: longer audio is refused (audio_too_long)
    hidden_size: int  # D of the projected speech


@dataclass(frozen=True)
class EncodedSpeech:
    audio_ND: np.ndarray  # float32 [n, D]: the projected speech the backbone reads at its AUDIO positions
    seconds: float  # the input's duration


@dataclass(frozen=True)
class AudioRejected:
    reason: str  # a rejection reason of serve_apps/protocol.py (not_audio, audio_too_long, bad_audio, ...)
    message: str


# ---------------------------------------------------------------------------------------------- backbone
@dataclass(frozen=True)
class ConversationTurn:
    role: str  # "user" | "assistant"
    text: str | None = None  # a user's written words, or an assistant's answer (its transcript)
    audio_ND: np.ndarray | None = None  # a user's speech, projected (EncodedSpeech.audio_ND)
    # an answer's own token ids (AnswerEnd.text_ids): read instead of re-encoding ``text``, so the prompt
    # holds exactly what the answer's text item read (the kept context matches, whatever the tokenizer)
    text_ids: tuple[int, ...] | None = None
    # a user's speech still on its way from the encoder: the index, among the ``heard`` results that travel
    # with the conversation (``Backbone.generate(conv, options, *heard)``: the Ingress passes the SpeechEncoder's
    # responses on unopened, so the features go from encoder to Backbone), of this turn's EncodedSpeech
    heard: int | None = None


@dataclass(frozen=True)
class Conversation:
    """What the model answers: the turns so far (the last the user's). The answer loop turns it into
    the prompt of :func:`deepomni.model.prompt.conversation`; earlier answers count as their text."""

    turns: tuple[ConversationTurn, ...]
    system: str | None = None  # the client's system text; None: the instruction of ``task``
    task: str | None = None  # asr | tts | spoken_qa | text_qa (None: spoken_qa for speech answers or input)
    keep: bool = False  # keep this context cached in the replica for the conversation's next turn

    @classmethod
    def single(cls, audio_ND: np.ndarray | None = None, text: str | None = None, heard: int | None = None,
               **kw) -> Conversation:
        return cls((ConversationTurn("user", text, audio_ND, heard=heard),), **kw)

    def with_heard(self, heard: Sequence[EncodedSpeech | AudioRejected]) -> Conversation | AudioRejected:
        """The turns whose speech is ``heard[turn.heard]`` with it as their ``audio_ND``; the first refusal
        (audio the encoder refused) instead, if any. An index out of range is a ValueError."""
        turns = []
        for t in self.turns:
            if t.heard is not None:
                if not 0 <= t.heard < len(heard):
                    raise ValueError(f"a turn's speech is heard[{t.heard}], but {len(heard)} came with it")
                h = heard[t.heard]
                if isinstance(h, AudioRejected):
                    return h
                t = dataclasses.replace(t, audio_ND=h.audio_ND, heard=None)
            turns.append(t)
        return dataclasses.replace(self, turns=tuple(turns))


@dataclass(frozen=True)
class GenerateOptions:
    speech: bool = True  # False (or a loop without a vocoder): a text answer only
    max_steps: int | None = None  # None: the app's max_steps
    seed: int | None = None  # codec sampling seed (None: random)
    temperature: float | None = None  # codec sampling temperature (None: the model's default); text is greedy


@dataclass(frozen=True)
class AnswerEnd:
    """The last chunk's summary of an answer."""

    text: str  # the whole answer's text
    steps: int  # decoding steps
    text_tokens: int
    frames: int  # codec frames sent to the vocoder
    queue_ms: float | None  # time the session waited for rows in the backbone's batch
    prompt_tokens: int = 0  # prompt positions (the conversation as the model read it)
    cached_tokens: int = 0  # of which came from the conversation's kept context (not run again)
    audio_prompt_tokens: int = 0  # of which are speech frames
    dropped_turns: int = 0  # oldest turns left out to fit max_context
    finish_reason: str = "stop"  # "stop" (the model ended) | "length" (max_steps)
    codec_channels: int = 0  # K: an audio frame is K codec tokens
    text_ids: tuple[int, ...] = ()  # the answer's text token ids (for ConversationTurn.text_ids)
    heard_seconds: float = 0.0  # the duration of the turns' speech that came as ``heard`` (EncodedSpeech.seconds)
    # where the answer's routed (token, expert) pairs went, per MoE layer, as plain JSON (its prompt positions
    # run and its decoding rows; deepomni.model.routing_stats.expert_share): "layers" (model layer of each),
    # "num_experts", "routed", "experts_used", "tokens" {"text", "speech"}, and the shares of each layer's
    # pairs on its "speech" and "text" experts (sum 1; None without the checkpoint's experts.json)
    expert_share: dict | None = None


RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S = 1, 30  # the Retry-After an overloaded server suggests, clamped


@dataclass(frozen=True)
class AnswerError:
    reason: str  # prompt_too_long | overloaded | internal_error | unavailable
    message: str
    retry_after_s: int | None = None  # overloaded / unavailable: when to try again (estimated)


@dataclass(frozen=True)
class AnswerChunk:
    """One item of ``AnswerLoop.generate``'s stream (``Backbone.generate``'s): everything produced since the
    caller last read."""

    text: str = ""  # text delta
    pcm: np.ndarray | None = None  # float32 audio at the codec's sample rate
    end: AnswerEnd | None = None  # set on the last chunk of an answer that ended normally
    error: AnswerError | None = None  # set on the last chunk of an answer that failed
    # nothing new, sent every KEEPALIVE_S while the answer waits (for rows, for the vocoder): the ingress
    # waits at most stall_timeout_s for the next chunk, so a Backbone that stops answering fails the answer
    keepalive: bool = False


# ---------------------------------------------------------------------------------------------- vocoder
@dataclass(frozen=True)
class CodecInfo:
    codec: str  # the codec spec (builtin:<dir> | snac:<dir>)
    sample_rate: int
    num_channels: int
    codebook_size: int
    frame_rate: float


@dataclass(frozen=True)
class BackboneInfo:
    num_codec_channels: int
    codebook_size: int
    hidden_size: int
    max_len: int
    codec: CodecInfo | None  # the vocoder's; None without a vocoder


@dataclass(frozen=True)
class VocodeItem:
    """One stream's step in a batched vocoder call (``Vocoder.decode``)."""

    state: Any  # the codec's stream state from the last call; None starts a stream
    codes_KF: np.ndarray | None  # int64 [K, F] codec frames (None or F == 0: none this time)
    final: bool  # flush the stream: the returned state is then None


@dataclass(frozen=True)
class VocodedAudio:
    pcm: np.ndarray  # float32 audio that became final
    state: Any  # the next call's state (None after a final item)


@dataclass(frozen=True)
class VocodeFailed:
    """That item alone failed (e.g. codes outside the codebook); the others in the call went on."""

    message: str
