"""The OpenAI-compatible surfaces' requests and responses (``docs/serving.md`` "OpenAI-compatible API").

Parsing and shaping only; no Ray, so it is unit-testable. The ingress routes
(``/v1/chat/completions``, ``/v1/audio/transcriptions``, ``/v1/audio/speech``, ``/v1/models``) turn a
request into a :class:`ChatRequest` (a conversation and answer options), run it like every other answer,
and shape what comes back with the helpers here. Errors are :class:`OpenAIError`: ``{"error": {message,
type, param, code}}`` with a 4xx (5xx for our own faults), the shape OpenAI's clients raise from.

What we take and what we ignore is listed in :data:`IGNORED_CHAT_FIELDS` and :data:`REFUSED_CHAT_FIELDS`
(and in the docs' table): a field that would change the answer in a way we cannot honour is refused; one
that only tunes what OpenAI's own models do is ignored.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .protocol import Rejection, http_headers

MODEL_ID = "deepomni"  # the one model a server holds (``GET /v1/models``)
OPENAI_SAMPLE_RATE = 24000  # audio out (and Realtime audio in): OpenAI's clients assume 24 kHz PCM
CHAT_AUDIO_FORMATS = ("wav", "pcm16", "flac", "mp3", "opus")  # chat completions' audio.format
SPEECH_FORMATS = ("wav", "pcm", "flac", "mp3", "opus")  # /v1/audio/speech response_format
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")
# fields accepted and ignored: sampling knobs of OpenAI's text models (our text is greedy), bookkeeping
IGNORED_CHAT_FIELDS = ("top_p", "presence_penalty", "frequency_penalty", "logit_bias", "stop", "user",
                       "metadata", "store", "service_tier", "parallel_tool_calls", "reasoning_effort",
                       "prediction", "prompt_cache_key", "safety_identifier", "verbosity", "top_logprobs",
                       "web_search_options", "response_format")
# fields refused when set: the answer could not be what the client asked for
REFUSED_CHAT_FIELDS = ("tools", "functions", "tool_choice", "function_call")

# our rejection reasons whose OpenAI error code is another word (the rest are their own code)
OPENAI_CODES = {"unauthorized": "invalid_api_key", "overloaded": "server_overloaded",
                "unavailable": "service_unavailable"}


class OpenAIError(Exception):
    """An error as OpenAI's API answers it. ``reason`` is our rejection reason (the metrics' tag): ``code``
    unless it says otherwise (``unauthorized`` is OpenAI's ``invalid_api_key``, ``overloaded`` its
    ``server_overloaded``). ``retry_after_s`` goes out as ``Retry-After``, which OpenAI's clients honour."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 type: str | None = None, reason: str | None = None, retry_after_s: int | None = None):
        super().__init__(status, message, code, param)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.reason = reason or code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return http_headers(self.status, self.retry_after_s)

    @classmethod
    def from_rejection(cls, e: Rejection, param: str | None = None) -> OpenAIError:
        return cls(e.status, e.message, OPENAI_CODES.get(e.reason, e.reason), param, reason=e.reason,
                   retry_after_s=e.retry_after_s)


def bad(message: str, param: str | None = None, code: str = "bad_request", status: int = 400) -> OpenAIError:
    return OpenAIError(status, message, code, param)


# ------------------------------------------------------------------------------------------ requests
@dataclass
class ChatMessage:
    """One turn: the user's text and/or audio file bytes, or the assistant's text."""

    role: str  # "user" | "assistant"
    text: str | None = None
    audio: bytes | None = None  # a user's input_audio, still encoded (wav / mp3 / ...)


@dataclass
class ChatRequest:
    messages: list[ChatMessage]  # user and assistant turns, in order, ending with the user's
    system: str | None = None  # system / developer messages, joined
    speech: bool = False  # modalities has "audio"
    audio_format: str = "wav"
    stream: bool = False
    include_usage: bool = False
    max_steps: int | None = None
    seed: int | None = None
    temperature: float | None = None


def _int_field(data: dict, name: str, lo: int, hi: int) -> int | None:
    v = data.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad(f"{name} must be an integer in [{lo}, {hi}], got {v!r}", name)
    return v


def _string(v: Any, param: str, max_chars: int) -> str:
    if not isinstance(v, str):
        raise bad(f"{param} must be a string", param)
    if len(v) > max_chars:
        raise bad(f"{param} is over {max_chars} characters", param)
    return v


def decode_base64_audio(data: Any, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise bad(f"{param} must be a non-empty base64 string", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"{param} is not valid base64: {e}", param, code="bad_base64") from e


def check_model(model: Any, param: str = "model") -> None:
    if not isinstance(model, str) or not model:
        raise bad("model must be a non-empty string (GET /v1/models lists it)", param)
    if model != MODEL_ID:
        raise OpenAIError(404, f"The model {model!r} does not exist: this server serves {MODEL_ID!r}",
                          "model_not_found", param)


def _content(msg: dict, i: int, role: str, max_chars: int, transcript_of: Callable[[str], str | None]
             ) -> ChatMessage:
    content, param = msg.get("content"), f"messages[{i}].content"
    texts, audio = [], None
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            p = f"{param}[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad(f"{p} must be an object with a string 'type'", p)
            kind = part["type"]
            if kind == "text":
                texts.append(_string(part.get("text"), f"{p}.text", max_chars))
            elif kind == "input_audio" and role == "user":
                spec = part.get("input_audio")
                if not isinstance(spec, dict):
                    raise bad(f"{p}.input_audio must be an object {{data, format}}", f"{p}.input_audio")
                if audio is not None:
                    raise bad("one input_audio part per message: send more audio as another message", p)
                audio = decode_base64_audio(spec.get("data"), f"{p}.input_audio.data")
            elif kind == "refusal" and role == "assistant":
                texts.append(_string(part.get("refusal"), f"{p}.refusal", max_chars))
            else:
                raise bad(f"content part type {kind!r} is not supported in a {role} message "
                          f"(text{', input_audio' if role == 'user' else ''})", p, code="unsupported_content")
    elif content is not None:
        raise bad(f"{param} must be a string or a list of content parts", param)
    if role == "assistant" and not texts and isinstance(msg.get("audio"), dict):
        # an earlier spoken answer, referred to by id: its transcript is what the model reads
        aid = msg["audio"].get("id")
        transcript = transcript_of(aid) if isinstance(aid, str) else None
        if transcript is None:
            raise bad(f"messages[{i}].audio.id {aid!r} is unknown or expired: send the answer's transcript as "
                      "content instead", f"messages[{i}].audio.id")
        texts.append(transcript)
    text = "\n".join(t for t in texts if t) or None
    if text is None and audio is None:
        raise bad(f"messages[{i}] has no content", param)
    if text is not None and len(text) > max_chars:
        raise bad(f"{param} is over {max_chars} characters", param)
    return ChatMessage(role, text, audio)


def parse_chat(data: dict, max_steps_limit: int, max_chars: int,
               transcript_of: Callable[[str], str | None] = lambda _id: None) -> ChatRequest:
    """``POST /v1/chat/completions`` body -> :class:`ChatRequest`, or :class:`OpenAIError`."""
    check_model(data.get("model"))
    for name in REFUSED_CHAT_FIELDS:
        if data.get(name):
            raise bad(f"{name} is not supported: this model does not call tools", name, code="unsupported_parameter")
    if data.get("n") not in (None, 1):
        raise bad("n must be 1: one answer per request", "n", code="unsupported_parameter")
    if data.get("logprobs"):
        raise bad("logprobs is not supported", "logprobs", code="unsupported_parameter")
    msgs = data.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list", "messages")
    req = ChatRequest(messages=[])
    system: list[str] = []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = msg.get("role")
        if role in ("system", "developer"):
            system.append(_content(msg, i, "assistant", max_chars, transcript_of).text or "")
            continue
        if role not in ("user", "assistant"):
            raise bad(f"messages[{i}].role {role!r} is not supported (system, developer, user, assistant)",
                      f"messages[{i}].role", code="unsupported_content")
        m = _content(msg, i, role, max_chars, transcript_of)
        prev = req.messages[-1] if req.messages else None
        if prev is not None and prev.role == role:  # consecutive turns of one speaker: one turn
            if prev.audio is not None and m.audio is not None:
                raise bad(f"messages[{i}]: two audio messages in a row; this model reads one audio input per turn",
                          f"messages[{i}]")
            prev.text = "\n".join(t for t in (prev.text, m.text) if t) or None
            prev.audio = prev.audio or m.audio
        else:
            req.messages.append(m)
    if req.messages and req.messages[0].role == "assistant":
        req.messages.insert(0, ChatMessage("user", text=""))  # an answer with no question: an empty question
    if not req.messages or req.messages[-1].role != "user":
        raise bad("the last message must be the user's (the model answers it)", "messages")
    req.system = "\n".join(s for s in system if s) or None

    modalities = data.get("modalities") or ["text"]
    if (not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities)  # set(): hashable only
            or not set(modalities) <= {"text", "audio"} or "text" not in modalities):
        raise bad('modalities must be ["text"] or ["text", "audio"]', "modalities")
    req.speech = "audio" in modalities
    audio = data.get("audio")
    if req.speech:
        if not isinstance(audio, dict):
            raise bad('modalities ["text", "audio"] needs audio: {"voice", "format"}', "audio")
        fmt = audio.get("format", "wav")
        if fmt not in CHAT_AUDIO_FORMATS:
            raise bad(f"audio.format must be one of {list(CHAT_AUDIO_FORMATS)}, got {fmt!r}", "audio.format",
                      code="unsupported_parameter")
        req.audio_format = fmt
    req.stream = bool(data.get("stream"))
    opts = data.get("stream_options") or {}
    req.include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    for name in ("max_completion_tokens", "max_tokens"):
        v = _int_field(data, name, 1, max_steps_limit)
        if v is not None and req.max_steps is None:
            req.max_steps = v
    seed = _int_field(data, "seed", -(2 ** 63), 2 ** 63 - 1)  # OpenAI's seeds are signed 64-bit
    req.seed = None if seed is None else seed % 2 ** 63  # ours are non-negative
    t = data.get("temperature")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 2:
            raise bad(f"temperature must be a number in [0, 2], got {t!r}", "temperature")
        req.temperature = float(t)
    return req


# ------------------------------------------------------------------------------------------ audio out
def encode_output_audio(wav: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Float audio at ``sample_rate`` -> ``fmt`` bytes at 24 kHz (``pcm16`` / ``pcm``: raw s16le)."""
    import soxr

    from deepomni.audio import encode_audio

    from .protocol import pcm_s16le

    wav = np.asarray(wav, dtype=np.float32)
    if sample_rate != OPENAI_SAMPLE_RATE and len(wav):
        wav = soxr.resample(wav, sample_rate, OPENAI_SAMPLE_RATE, quality="HQ").astype(np.float32)
    if fmt in ("pcm16", "pcm"):
        return pcm_s16le(wav)
    if not len(wav):
        wav = np.zeros(1, dtype=np.float32)
    if fmt == "opus":
        return encode_audio(wav, OPENAI_SAMPLE_RATE, "OGG", subtype="OPUS")
    return encode_audio(wav, OPENAI_SAMPLE_RATE, fmt.upper(), subtype="PCM_16" if fmt == "wav" else None)


class PcmResampler:
    """Streaming resampling of float chunks to 24 kHz s16le (``soxr.ResampleStream``), for streamed audio."""

    def __init__(self, in_rate: int, out_rate: int = OPENAI_SAMPLE_RATE):
        import soxr

        self.stream = None if in_rate == out_rate else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32")

    def push(self, wav: np.ndarray, last: bool = False) -> bytes:
        from .protocol import pcm_s16le

        wav = np.asarray(wav, dtype=np.float32)
        if self.stream is not None:
            wav = self.stream.resample_chunk(wav, last=last)
        return pcm_s16le(wav) if len(wav) else b""


AUDIO_MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "opus": "audio/ogg",
                     "pcm": "audio/pcm", "pcm16": "audio/pcm"}


# ------------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    audio_prompt_tokens: int = 0  # AUDIO positions of the prompt
    text_tokens: int = 0  # answer text tokens
    audio_tokens: int = 0  # answer codec tokens (frames x channels)

    def body(self) -> dict:
        completion = self.text_tokens + self.audio_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": self.audio_prompt_tokens,
                                          "text_tokens": self.prompt_tokens - self.audio_prompt_tokens},
                "completion_tokens_details": {"text_tokens": self.text_tokens, "audio_tokens": self.audio_tokens,
                                              "reasoning_tokens": 0}}


@dataclass
class ChatShape:
    """The ids and timestamps one chat completion's responses share."""

    id: str = field(default_factory=lambda: new_id("chatcmpl"))
    created: int = field(default_factory=lambda: int(time.time()))
    model: str = MODEL_ID

    def completion(self, text: str, finish_reason: str, usage: Usage, audio: dict | None) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": None if audio else text, "refusal": None}
        if audio is not None:
            message["audio"] = audio
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
                "usage": usage.body()}

    def chunk(self, delta: dict, finish_reason: str | None = None, usage: Usage | None = None,
              choices: bool = True) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
               if choices else []}
        if usage is not None:
            out["usage"] = usage.body()
        return out


def sse_data(obj: dict | str) -> bytes:
    """One ``data:`` server-sent event, as OpenAI streams (``[DONE]`` ends a chat stream)."""
    import json

    text = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def models_list(created: int) -> dict:
    return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": created, "owned_by": "deepomni"}]}
