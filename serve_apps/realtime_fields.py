"""What ``WS /v1/realtime`` accepts in its client events: the field checks of the session, its responses and
its items (``docs/serving.md`` "WS /v1/realtime"). No Ray and no connection, so it is unit-testable.

Supported session fields: ``type`` ("realtime"), ``model`` (deepomni), ``instructions`` (the system text;
unset: the model's own instruction for the task), ``output_modalities`` (["audio"] or ["text"]),
``max_output_tokens`` (decoding steps, 1..max_steps_limit; "inf": the server's max_steps),
``audio.input.format`` and ``audio.output.format`` (audio/pcm at 24000 only), ``audio.input.turn_detection``
(null or server_vad: threshold, prefix_padding_ms, silence_duration_ms, create_response,
interrupt_response), ``tools`` (empty only: this model does not call tools). Accepted and ignored (echoed):
``audio.output.voice`` and ``speed`` (the model has one voice), ``audio.input.transcription`` and
``noise_reduction`` (no input transcription events are sent: the model reads the speech itself),
``turn_detection.idle_timeout_ms``, ``tool_choice``, ``tracing``, ``prompt``, ``truncation`` (the oldest
turns are dropped past the model's context), ``include``, ``parallel_tool_calls``, ``reasoning``. Refused
(``error``): other audio formats, ``semantic_vad``, transcription sessions, tools, unknown fields, and in
``response.create``: ``conversation: "none"``, ``input`` and tools. A ``session.update`` applies from the
next response on. ``response.create`` takes ``instructions``, ``output_modalities``, ``max_output_tokens``,
``audio.output`` (format as above, voice ignored) and ``metadata`` (echoed).

Items: user ``input_text`` / ``input_audio`` (base64 pcm16 24 kHz) parts, assistant ``output_text`` /
``output_audio`` (its ``transcript`` is what the model reads), system ``input_text`` (appended to the
instructions).

Every check raises :class:`~serve_apps.openai_api.OpenAIError` with OpenAI's ``code`` and the field as
``param`` (``session.audio.input.turn_detection.threshold``); the session sends it as an ``error`` event and
the connection stays open. A refused ``session.update`` changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from deepomni.serve.messages import AnswerEnd

from .openai_api import MODEL_ID, OPENAI_SAMPLE_RATE, bad, decode_base64_audio, new_id
from .vad import VAD_AVAILABLE, TurnDetection

RATE = OPENAI_SAMPLE_RATE  # audio/pcm in and out
MAX_INSTRUCTIONS_CHARS = 16_000
PCM_FORMAT = {"type": "audio/pcm", "rate": RATE}
SESSION_FIELDS = {"type", "model", "instructions", "output_modalities", "max_output_tokens", "audio", "tools",
                  "tool_choice", "tracing", "prompt", "truncation", "include", "parallel_tool_calls", "reasoning"}
RESPONSE_FIELDS = {"instructions", "output_modalities", "max_output_tokens", "audio", "conversation", "input",
                   "metadata", "tools", "tool_choice", "prompt", "parallel_tool_calls", "reasoning"}
ITEM_PARTS = {"user": ("input_text", "input_audio"), "assistant": ("output_text", "output_audio"),
              "system": ("input_text",)}  # the content part types each role's items may hold


# ------------------------------------------------------------------------------------------ one field
def object_field(v: Any, param: str) -> dict:
    if not isinstance(v, dict):
        raise bad(f"{param} must be an object", param, "invalid_type")
    return v


def known_fields(d: dict, allowed: set[str], param: str) -> None:
    for k in d:
        if k not in allowed:
            raise bad(f"Unknown parameter: '{param}.{k}'.", f"{param}.{k}", "unknown_parameter")


def number_field(v: Any, param: str, lo: float, hi: float, integer: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not lo <= v <= hi:
        raise bad(f"{param} must be {'an integer' if integer else 'a number'} in [{lo}, {hi}], got {v!r}",
                  param, "invalid_value")
    return v


def flag_field(v: Any, param: str) -> bool:
    if not isinstance(v, bool):
        raise bad(f"{param} must be true or false", param, "invalid_type")
    return v


def text_field(v: Any, param: str, max_chars: int) -> str:
    if not isinstance(v, str) or len(v) > max_chars:
        raise bad(f"{param} must be a string of at most {max_chars} characters", param, "invalid_value")
    return v


def pcm_field(data: Any, param: str) -> bytes:
    """Base64 pcm16 (an empty string: no audio)."""
    pcm = b"" if data == "" else decode_base64_audio(data, param)
    if len(pcm) % 2:
        raise bad(f"{param} must be 16-bit PCM (an even number of bytes), got {len(pcm)} bytes", param, "invalid_value")
    return pcm


def format_field(v: Any, param: str) -> None:
    fmt = object_field(v, param)
    if fmt.get("type", "audio/pcm") != "audio/pcm" or fmt.get("rate", RATE) != RATE:
        raise bad(f"{param} must be {{type: 'audio/pcm', rate: {RATE}}} (16-bit mono PCM at 24 kHz), got {fmt}",
                  f"{param}.type", "invalid_value")


def modalities_field(v: Any, param: str) -> bool:
    """``output_modalities``: True for speech (["audio"]), False for text."""
    if v not in (["audio"], ["text"]):
        raise bad(f"{param} must be ['audio'] or ['text'], got {v!r}", param, "invalid_value")
    return v == ["audio"]


def max_tokens_field(v: Any, param: str, cap: int) -> int | None:
    return None if v == "inf" else int(number_field(v, param, 1, cap, integer=True))


def no_tools(d: dict, param: str) -> None:
    if d.get("tools"):
        raise bad("tools are not supported: this model does not call tools", f"{param}.tools", "unsupported_parameter")


# ------------------------------------------------------------------------------------------ client events
def client_event(text: str | None) -> dict:
    """A text frame as a client event: a JSON object with a string ``type``."""
    if text is None:
        raise bad("send client events as JSON text frames", None, "invalid_json")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise bad(f"the event is not valid JSON: {e}", None, "invalid_json") from e
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise bad("an event is a JSON object with a string 'type'", "type", "invalid_json")
    return data


@dataclass
class ResponseSettings:
    """What one ``response.create`` asks for, the session's settings filling what it leaves out."""

    speech: bool
    max_steps: int | None
    instructions: str | None
    voice: Any
    metadata: Any


@dataclass
class SessionConfig:
    id: str = field(default_factory=lambda: new_id("sess"))
    instructions: str | None = None
    speech: bool = True  # output_modalities ["audio"]
    max_output_tokens: int | None = None  # None: "inf" (the server's max_steps)
    voice: Any = "alloy"
    speed: float = 1.0
    turn_detection: TurnDetection | None = field(default_factory=lambda: TurnDetection() if VAD_AVAILABLE else None)
    echoed: dict = field(default_factory=dict)  # ignored fields, sent back as set

    def body(self) -> dict:
        td = None if self.turn_detection is None else self.turn_detection.body()
        return {"type": "realtime", "object": "realtime.session", "id": self.id, "model": MODEL_ID,
                "output_modalities": ["audio" if self.speech else "text"], "instructions": self.instructions,
                "max_output_tokens": "inf" if self.max_output_tokens is None else self.max_output_tokens,
                "tools": [], "tool_choice": "auto", "tracing": None, "prompt": None, "truncation": "auto",
                "audio": {"input": {"format": PCM_FORMAT, "transcription": None, "noise_reduction": None,
                                    "turn_detection": td},
                          "output": {"format": PCM_FORMAT, "voice": self.voice, "speed": self.speed}},
                **self.echoed}

    def updated(self, s: dict, cap: int) -> SessionConfig:
        """A copy with ``session.update``'s fields applied (nothing changes when a field is refused)."""
        new = dataclasses.replace(self, echoed=dict(self.echoed))
        if s.get("type") != "realtime":
            raise bad("session.type must be 'realtime' (transcription sessions are not supported)", "session.type",
                      "invalid_value" if "type" in s else "missing_required_parameter")
        known_fields(s, SESSION_FIELDS, "session")
        if s.get("model") not in (None, MODEL_ID):
            raise bad(f"session.model must be {MODEL_ID!r}", "session.model", "invalid_value")
        no_tools(s, "session")
        if "instructions" in s:
            new.instructions = None if s["instructions"] is None else text_field(
                s["instructions"], "session.instructions", MAX_INSTRUCTIONS_CHARS)
        if "output_modalities" in s:
            new.speech = modalities_field(s["output_modalities"], "session.output_modalities")
        if "max_output_tokens" in s:
            new.max_output_tokens = max_tokens_field(s["max_output_tokens"], "session.max_output_tokens", cap)
        for k in ("tool_choice", "tracing", "prompt", "truncation", "include", "parallel_tool_calls", "reasoning"):
            if k in s:
                new.echoed[k] = s[k]
        audio = object_field(s.get("audio") or {}, "session.audio")
        known_fields(audio, {"input", "output"}, "session.audio")
        inp = object_field(audio.get("input") or {}, "session.audio.input")
        known_fields(inp, {"format", "transcription", "noise_reduction", "turn_detection"}, "session.audio.input")
        if inp.get("format") is not None:
            format_field(inp["format"], "session.audio.input.format")
        if "turn_detection" in inp:
            new.turn_detection = self._turn_detection(inp["turn_detection"])
        out = object_field(audio.get("output") or {}, "session.audio.output")
        known_fields(out, {"format", "voice", "speed"}, "session.audio.output")
        if out.get("format") is not None:
            format_field(out["format"], "session.audio.output.format")
        if out.get("voice") is not None:
            new.voice = out["voice"]
        if out.get("speed") is not None:
            new.speed = float(number_field(out["speed"], "session.audio.output.speed", 0.25, 1.5))
        return new

    def _turn_detection(self, v: Any) -> TurnDetection | None:
        p = "session.audio.input.turn_detection"
        if v is None:
            return None
        v = object_field(v, p)
        if v.get("type") != "server_vad":
            raise bad(f"{p}.type must be 'server_vad' (or turn_detection null), got {v.get('type')!r}", f"{p}.type",
                      "invalid_value")
        if not VAD_AVAILABLE:
            raise bad("server_vad is not available on this server (pip install silero-vad); set turn_detection null "
                      "and commit the buffer yourself", p, "unsupported_parameter")
        known_fields(v, {"type", *TurnDetection.__dataclass_fields__}, p)
        td = dataclasses.replace(self.turn_detection or TurnDetection())
        checks = {"threshold": (0.0, 1.0, False), "prefix_padding_ms": (0, 10_000, True),
                  "silence_duration_ms": (0, 10_000, True), "idle_timeout_ms": (0, 10**8, True)}
        for k, (lo, hi, integer) in checks.items():
            if v.get(k) is not None:
                setattr(td, k, number_field(v[k], f"{p}.{k}", lo, hi, integer))
        for k in ("create_response", "interrupt_response"):
            if v.get(k) is not None:
                setattr(td, k, flag_field(v[k], f"{p}.{k}"))
        return td

    def response(self, r: dict, cap: int) -> ResponseSettings:
        """``response.create``'s ``response`` checked, over this session's settings."""
        known_fields(r, RESPONSE_FIELDS, "response")
        no_tools(r, "response")
        if r.get("conversation") not in (None, "auto") or r.get("input") is not None:
            raise bad("out-of-band responses (conversation 'none', input) are not supported: a response answers "
                      "this conversation", "response.conversation", "unsupported_parameter")
        speech = self.speech if r.get("output_modalities") is None else \
            modalities_field(r["output_modalities"], "response.output_modalities")
        max_steps = self.max_output_tokens if r.get("max_output_tokens") is None else \
            max_tokens_field(r["max_output_tokens"], "response.max_output_tokens", cap)
        instructions = self.instructions if r.get("instructions") is None else \
            text_field(r["instructions"], "response.instructions", MAX_INSTRUCTIONS_CHARS)
        out = object_field(object_field(r.get("audio") or {}, "response.audio").get("output") or {},
                           "response.audio.output")
        if out.get("format") is not None:
            format_field(out["format"], "response.audio.output.format")
        return ResponseSettings(speech, max_steps, instructions, out.get("voice") or self.voice, r.get("metadata"))


def response_usage(end: AnswerEnd) -> dict:
    """``response.done``'s ``usage``: the prompt's positions in, text and codec tokens (frames x K) out."""
    audio_out = end.frames * end.codec_channels
    return {"total_tokens": end.prompt_tokens + end.text_tokens + audio_out, "input_tokens": end.prompt_tokens,
            "output_tokens": end.text_tokens + audio_out,
            "input_token_details": {"cached_tokens": end.cached_tokens, "audio_tokens": end.audio_prompt_tokens,
                                    "text_tokens": end.prompt_tokens - end.audio_prompt_tokens, "image_tokens": 0},
            "output_token_details": {"text_tokens": end.text_tokens, "audio_tokens": audio_out}}


# ------------------------------------------------------------------------------------------ items
def item_role(it: dict) -> tuple[str, list]:
    """``conversation.item.create``'s item: a message's role and its (not yet checked) content parts."""
    if it.get("type", "message") != "message":
        raise bad(f"item.type {it.get('type')!r} is not supported: messages only (this model does not call "
                  "tools)", "item.type", "unsupported_item")
    role, content = it.get("role"), it.get("content")
    if role not in ("user", "assistant", "system"):  # a tuple: the JSON value may be unhashable
        raise bad("item.role must be 'user', 'assistant' or 'system'", "item.role", "invalid_value")
    if not isinstance(content, list) or not content:
        raise bad("item.content must be a non-empty list of content parts", "item.content", "invalid_value")
    return role, content


def item_parts(role: str, content: list, max_chars: int) -> tuple[list[str], list[bytes], list[dict]]:
    """A message's content parts: the texts the model reads (an earlier spoken answer as its transcript),
    the pcm16 audio parts, and the parts as the client is shown them (audio left out)."""
    allowed = ITEM_PARTS[role]
    texts, audio, shown = [], [], []
    for j, part in enumerate(content):
        p = f"item.content[{j}]"
        kind = object_field(part, p).get("type")
        if kind not in allowed:
            raise bad(f"{p}.type {kind!r} is not supported in a {role} item ({', '.join(allowed)})", f"{p}.type",
                      "unsupported_content")
        if kind in ("input_text", "output_text"):
            texts.append(text_field(part.get("text"), f"{p}.text", max_chars))
            shown.append({"type": kind, "text": texts[-1]})
        elif kind == "input_audio":
            audio.append(pcm_field(part.get("audio"), f"{p}.audio"))
            shown.append({"type": kind, "transcript": part.get("transcript")})
        else:  # output_audio: the model reads an earlier spoken answer as its transcript
            t = part.get("transcript")
            if not isinstance(t, str):
                raise bad(f"{p}.transcript is needed: the model reads earlier answers as text", f"{p}.transcript",
                          "missing_required_parameter")
            texts.append(text_field(t, f"{p}.transcript", max_chars))
            shown.append({"type": kind, "transcript": t})
    return texts, audio, shown
