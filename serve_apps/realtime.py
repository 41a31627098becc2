"""``WS /v1/realtime``: OpenAI's Realtime API (GA event names), as the official ``openai`` client speaks it
(``client.realtime.connect(model="deepomni")``).

One file over 400 lines on purpose: it is one protocol, the event checks, the session / item / response state
and the :class:`RealtimeSession` state machine that changes it; about 60 of its lines are this docstring,
the contract of what it supports.

One connection is one conversation: every response reads the earlier items (an interrupted answer counts as
the text it had sent), and the Backbone's kept context means a next turn prefills only itself. Errors are
``error`` events; the connection stays open.

Client events: ``session.update``, ``input_audio_buffer.append | commit | clear``, ``conversation.item.create
| delete | truncate``, ``response.create``, ``response.cancel``. Server events: ``session.created | updated``,
``input_audio_buffer.committed | cleared | speech_started | speech_stopped``, ``conversation.item.added |
done | deleted | truncated``, ``response.created``, ``response.output_item.added | done``,
``response.content_part.added | done``, ``response.output_audio.delta | done``,
``response.output_audio_transcript.delta | done``, ``response.output_text.delta | done``, ``response.done``,
``error``. Audio in and out is ``audio/pcm`` (16-bit mono) at 24 kHz; the encoder resamples the input to
16 kHz, the codec's output is resampled to 24 kHz. Barge-in: a committed turn, ``response.cancel`` or (server
VAD, ``interrupt_response``) detected speech stops the answer that is playing (``response.done`` cancelled).

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
``response.create``: ``conversation: "none"``, ``input`` and tools. ``conversation.item.retrieve`` and
``output_audio_buffer.clear`` (WebRTC only) are refused too. A ``session.update`` applies from the next
response on. ``response.create`` takes ``instructions``, ``output_modalities``, ``max_output_tokens``,
``audio.output`` (format as above, voice ignored) and ``metadata`` (echoed). ``response.done`` is
``incomplete`` (``max_output_tokens``) when the answer ran to its steps; a cancelled response carries no usage.

Items: user ``input_text`` / ``input_audio`` (base64 pcm16 24 kHz) parts, assistant ``output_text`` /
``output_audio`` (its ``transcript`` is what the model reads), system ``input_text`` (appended to the
instructions). ``conversation.item.truncate`` keeps the share of an assistant answer's transcript that
matches the share of its audio heard (``audio_end_ms`` / the audio's length): text and audio are not aligned
word by word, so this is an approximation.

Server VAD: Silero VAD (the ``silero-vad`` package, actively maintained) on its TorchScript model, which
ships inside the wheel (no download at run time) and needs only torch, already here (not torchaudio, nor
onnxruntime); it gives a speech probability per window, onto which OpenAI's ``threshold`` maps directly
(webrtcvad has only four aggressiveness modes). Without it, ``server_vad`` is an ``error`` and sessions
start with ``turn_detection: null``. Speech starts at a 32 ms window whose speech
probability is at least ``threshold`` and stops after ``silence_duration_ms`` below ``threshold - 0.15``;
the committed item holds ``prefix_padding_ms`` of audio before the start. While no speech is heard the
buffer keeps only that padding.

A wrong ``model`` query parameter gets an ``error`` event (``model_not_found``) and the connection is closed
(1008); a missing one means deepomni. Past ``max_context`` the Backbone leaves the oldest turns out
(``docs/serving.md`` "Conversation memory"); the session then forgets their items too, so what it sends
stays bounded. A committed turn's audio is encoded before the next client event is read (an answer that
is playing keeps streaming meanwhile).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import importlib.util
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect

from .messages import AnswerEnd, Conversation, ConversationTurn, GenerateOptions
from .openai_api import MODEL_ID, OPENAI_SAMPLE_RATE, OpenAIError, PcmResampler, bad, decode_base64_audio, new_id
from .protocol import Rejection, pcm_s16le_to_float

if TYPE_CHECKING:
    from .ingress import Ingress

RATE = OPENAI_SAMPLE_RATE  # audio/pcm in and out
MS = 2 * RATE // 1000  # bytes of pcm16 per millisecond
MIN_COMMIT_MS = 100  # OpenAI refuses to commit less (input_audio_buffer_commit_empty)
MAX_INSTRUCTIONS_CHARS = 16_000
PCM_FORMAT = {"type": "audio/pcm", "rate": RATE}
SESSION_FIELDS = {"type", "model", "instructions", "output_modalities", "max_output_tokens", "audio", "tools",
                  "tool_choice", "tracing", "prompt", "truncation", "include", "parallel_tool_calls", "reasoning"}
RESPONSE_FIELDS = {"instructions", "output_modalities", "max_output_tokens", "audio", "conversation", "input",
                   "metadata", "tools", "tool_choice", "prompt", "parallel_tool_calls", "reasoning"}
VAD_AVAILABLE = importlib.util.find_spec("silero_vad") is not None


# ------------------------------------------------------------------------------------------ field checks
def _obj(v: Any, param: str) -> dict:
    if not isinstance(v, dict):
        raise bad(f"{param} must be an object", param, "invalid_type")
    return v


def _known(d: dict, allowed: set[str], param: str) -> None:
    for k in d:
        if k not in allowed:
            raise bad(f"Unknown parameter: '{param}.{k}'.", f"{param}.{k}", "unknown_parameter")


def _number(v: Any, param: str, lo: float, hi: float, integer: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not lo <= v <= hi:
        raise bad(f"{param} must be {'an integer' if integer else 'a number'} in [{lo}, {hi}], got {v!r}",
                  param, "invalid_value")
    return v


def _flag(v: Any, param: str) -> bool:
    if not isinstance(v, bool):
        raise bad(f"{param} must be true or false", param, "invalid_type")
    return v


def _text(v: Any, param: str, max_chars: int) -> str:
    if not isinstance(v, str) or len(v) > max_chars:
        raise bad(f"{param} must be a string of at most {max_chars} characters", param, "invalid_value")
    return v


def _pcm(data: Any, param: str) -> bytes:
    pcm = b"" if data == "" else decode_base64_audio(data, param)
    if len(pcm) % 2:
        raise bad(f"{param} must be 16-bit PCM (an even number of bytes), got {len(pcm)} bytes", param, "invalid_value")
    return pcm


def _format(v: Any, param: str) -> None:
    fmt = _obj(v, param)
    if fmt.get("type", "audio/pcm") != "audio/pcm" or fmt.get("rate", RATE) != RATE:
        raise bad(f"{param} must be {{type: 'audio/pcm', rate: {RATE}}} (16-bit mono PCM at 24 kHz), got {fmt}",
                  f"{param}.type", "invalid_value")


def _modalities(v: Any, param: str) -> bool:
    if v not in (["audio"], ["text"]):
        raise bad(f"{param} must be ['audio'] or ['text'], got {v!r}", param, "invalid_value")
    return v == ["audio"]


def _max_tokens(v: Any, param: str, cap: int) -> int | None:
    return None if v == "inf" else int(_number(v, param, 1, cap, integer=True))


def _no_tools(d: dict, param: str) -> None:
    if d.get("tools"):
        raise bad("tools are not supported: this model does not call tools", f"{param}.tools", "unsupported_parameter")


# ------------------------------------------------------------------------------------------ state
@dataclass
class TurnDetection:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None  # echoed, not acted on

    def body(self) -> dict:
        return {"type": "server_vad", **dataclasses.asdict(self)}


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
        _known(s, SESSION_FIELDS, "session")
        if s.get("model") not in (None, MODEL_ID):
            raise bad(f"session.model must be {MODEL_ID!r}", "session.model", "invalid_value")
        _no_tools(s, "session")
        if "instructions" in s:
            new.instructions = None if s["instructions"] is None else _text(s["instructions"], "session.instructions",
                                                                           MAX_INSTRUCTIONS_CHARS)
        if "output_modalities" in s:
            new.speech = _modalities(s["output_modalities"], "session.output_modalities")
        if "max_output_tokens" in s:
            new.max_output_tokens = _max_tokens(s["max_output_tokens"], "session.max_output_tokens", cap)
        for k in ("tool_choice", "tracing", "prompt", "truncation", "include", "parallel_tool_calls", "reasoning"):
            if k in s:
                new.echoed[k] = s[k]
        audio = _obj(s.get("audio") or {}, "session.audio")
        _known(audio, {"input", "output"}, "session.audio")
        inp = _obj(audio.get("input") or {}, "session.audio.input")
        _known(inp, {"format", "transcription", "noise_reduction", "turn_detection"}, "session.audio.input")
        if inp.get("format") is not None:
            _format(inp["format"], "session.audio.input.format")
        if "turn_detection" in inp:
            new.turn_detection = self._turn_detection(inp["turn_detection"])
        out = _obj(audio.get("output") or {}, "session.audio.output")
        _known(out, {"format", "voice", "speed"}, "session.audio.output")
        if out.get("format") is not None:
            _format(out["format"], "session.audio.output.format")
        if out.get("voice") is not None:
            new.voice = out["voice"]
        if out.get("speed") is not None:
            new.speed = float(_number(out["speed"], "session.audio.output.speed", 0.25, 1.5))
        return new

    def _turn_detection(self, v: Any) -> TurnDetection | None:
        p = "session.audio.input.turn_detection"
        if v is None:
            return None
        v = _obj(v, p)
        if v.get("type") != "server_vad":
            raise bad(f"{p}.type must be 'server_vad' (or turn_detection null), got {v.get('type')!r}", f"{p}.type",
                      "invalid_value")
        if not VAD_AVAILABLE:
            raise bad("server_vad is not available on this server (pip install silero-vad); set turn_detection null "
                      "and commit the buffer yourself", p, "unsupported_parameter")
        _known(v, {"type", *TurnDetection.__dataclass_fields__}, p)
        td = dataclasses.replace(self.turn_detection or TurnDetection())
        checks = {"threshold": (0.0, 1.0, False), "prefix_padding_ms": (0, 10_000, True),
                  "silence_duration_ms": (0, 10_000, True), "idle_timeout_ms": (0, 10**8, True)}
        for k, (lo, hi, integer) in checks.items():
            if v.get(k) is not None:
                setattr(td, k, _number(v[k], f"{p}.{k}", lo, hi, integer))
        for k in ("create_response", "interrupt_response"):
            if v.get(k) is not None:
                setattr(td, k, _flag(v[k], f"{p}.{k}"))
        return td


@dataclass
class Item:
    """One conversation item: what the model reads (``text``, ``audio_ND``) and what the client is shown."""

    id: str
    role: str  # user | assistant | system
    content: list[dict]  # the parts as the client sees them (audio bytes left out)
    text: str | None = None
    audio_ND: np.ndarray | None = None
    status: str = "completed"
    audio_bytes: int = 0  # an assistant answer's audio sent (for truncate)
    text_ids: tuple[int, ...] | None = None  # a finished answer's own token ids (what the model read)

    def body(self) -> dict:
        return {"id": self.id, "object": "realtime.item", "type": "message", "role": self.role,
                "status": self.status, "content": self.content}


@dataclass
class Response:
    id: str
    speech: bool
    max_steps: int | None
    system: str | None
    voice: Any
    metadata: Any
    task: asyncio.Task | None = None
    finished: bool = False
    cancel_reason: str = "client_cancelled"

    def body(self, status: str, output: list[dict], details: dict | None = None, usage: dict | None = None) -> dict:
        return {"object": "realtime.response", "id": self.id, "status": status, "status_details": details,
                "output": output, "conversation_id": None, "output_modalities": ["audio" if self.speech else "text"],
                "max_output_tokens": "inf" if self.max_steps is None else self.max_steps,
                "audio": {"output": {"format": PCM_FORMAT, "voice": self.voice}},
                "metadata": self.metadata, "usage": usage}


def _usage(end: AnswerEnd) -> dict:
    audio_out = end.frames * end.codec_channels
    return {"total_tokens": end.prompt_tokens + end.text_tokens + audio_out, "input_tokens": end.prompt_tokens,
            "output_tokens": end.text_tokens + audio_out,
            "input_token_details": {"cached_tokens": end.cached_tokens, "audio_tokens": end.audio_prompt_tokens,
                                    "text_tokens": end.prompt_tokens - end.audio_prompt_tokens, "image_tokens": 0},
            "output_token_details": {"text_tokens": end.text_tokens, "audio_tokens": audio_out}}


def _turns(items: list[Item]) -> tuple[ConversationTurn, ...]:
    """User and assistant items as the model reads them: a speaker's consecutive items are one turn; a
    conversation starts and ends with the user's (an empty one where there is none)."""
    turns: list[ConversationTurn] = []
    for it in items:
        if it.role == "system":
            continue
        if turns and turns[-1].role == it.role:
            prev = turns[-1]
            text = "\n".join(t for t in (prev.text, it.text) if t) or None
            parts = [a for a in (prev.audio_ND, it.audio_ND) if a is not None]
            audio = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else None)
            turns[-1] = ConversationTurn(it.role, text if text or audio is not None else "", audio)
        else:
            turns.append(ConversationTurn(it.role, it.text if it.text or it.audio_ND is not None else "", it.audio_ND,
                                          text_ids=it.text_ids))
    if turns and turns[0].role == "assistant":
        turns.insert(0, ConversationTurn("user", ""))
    if not turns or turns[-1].role != "user":
        turns.append(ConversationTurn("user", ""))
    return tuple(turns)


# ------------------------------------------------------------------------------------------ server VAD
class SileroVad:
    """Speech probabilities of 32 ms windows (512 samples at 16 kHz) of a stream of 24 kHz pcm16 chunks."""

    WINDOW = 512

    def __init__(self):
        import soxr
        from silero_vad import load_silero_vad

        self.model = load_silero_vad(onnx=False)  # the TorchScript model inside the wheel
        self.resample = soxr.ResampleStream(RATE, 16000, 1, dtype="float32")
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
                out.append(float(self.model(w, 16000).item()))
        self.pending = self.pending[n * self.WINDOW:]
        return out


# ------------------------------------------------------------------------------------------ the session
class RealtimeSession:
    """One ``/v1/realtime`` connection. The receive loop handles client events in order; a response runs as a
    task (one at a time), so the loop keeps reading while it streams."""

    def __init__(self, ingress: Ingress, ws: WebSocket):
        self.ing, self.ws = ingress, ws
        self.cfg = SessionConfig()
        self.items: list[Item] = []
        self.response: Response | None = None
        self.buf = bytearray()  # the input audio buffer (24 kHz pcm16)
        self.buf_start = 0  # its first byte's offset in all the audio appended this session
        self.vad: SileroVad | None = None
        self.vad_ms = 0  # audio the VAD has judged, from the session's start
        self.speech_start: int | None = None  # ms of the pending speech's start (with its padding)
        self.silence_ms = 0
        self.vad_item: str | None = None

    # ---------------------------------------------------------------------------- plumbing
    async def send(self, type_: str, **fields: Any) -> None:
        await self.ws.send_text(json.dumps({"type": type_, "event_id": new_id("event"), **fields}))

    async def error(self, e: OpenAIError, event_id: str | None = None) -> None:
        self.ing._rejected(e, "realtime")
        await self.send("error", error={"type": e.type, "code": e.code, "message": e.message, "param": e.param,
                                        "event_id": event_id})

    @property
    def active(self) -> bool:
        r = self.response
        return r is not None and not r.finished and (r.task is None or not r.task.done())

    async def run(self) -> None:
        try:
            model = self.ws.query_params.get("model")
            if model not in (None, MODEL_ID):
                await self.error(OpenAIError(404, f"The model {model!r} does not exist: this server serves "
                                                  f"{MODEL_ID!r}", "model_not_found", "model"))
                await self.ws.close(code=1008, reason="model_not_found")
                return
            await self.send("session.created", session=self.cfg.body())
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                event_id = None
                try:
                    if msg.get("text") is None:
                        raise bad("send client events as JSON text frames", None, "invalid_json")
                    try:
                        data = json.loads(msg["text"])
                    except (ValueError, RecursionError) as e:
                        raise bad(f"the event is not valid JSON: {e}", None, "invalid_json") from e
                    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
                        raise bad("an event is a JSON object with a string 'type'", "type", "invalid_json")
                    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
                    await self.handle(data)
                except OpenAIError as e:
                    await self.error(e, event_id)
                except Rejection as e:  # the encoder refused the audio, or the like
                    await self.error(OpenAIError.from_rejection(e), event_id)
        except WebSocketDisconnect:
            pass
        finally:
            await self.cancel_response("client_cancelled", notify=False)

    async def handle(self, ev: dict) -> None:
        kind = ev["type"]
        if kind == "session.update":
            self.set_session(_obj(ev.get("session"), "session"))
            await self.send("session.updated", session=self.cfg.body())
        elif kind == "input_audio_buffer.append":
            await self.append(_pcm(ev.get("audio"), "audio"))
        elif kind == "input_audio_buffer.commit":
            await self.commit(len(self.buf))
        elif kind == "input_audio_buffer.clear":
            self.drop_buffer(len(self.buf))
            self.speech_start = None
            await self.send("input_audio_buffer.cleared")
        elif kind == "conversation.item.create":
            await self.create_item(_obj(ev.get("item"), "item"), ev.get("previous_item_id"))
        elif kind == "conversation.item.delete":
            it = self.find(ev.get("item_id"))
            self.items.remove(it)
            await self.send("conversation.item.deleted", item_id=it.id)
        elif kind == "conversation.item.truncate":
            await self.truncate(ev)
        elif kind == "response.create":
            await self.create_response(_obj(ev.get("response") or {}, "response"))
        elif kind == "response.cancel":
            rid = ev.get("response_id")
            if not self.active or (rid is not None and rid != self.response.id):
                raise bad("There is no active response to cancel" + (f" with id {rid!r}" if rid else ""),
                          "response_id" if rid else None, "response_cancel_not_active")
            await self.cancel_response("client_cancelled")
        elif kind in ("conversation.item.retrieve", "output_audio_buffer.clear"):
            raise bad(f"{kind} is not supported by this server", "type", "unsupported_event")
        else:
            raise bad(f"Invalid value: {kind!r} is not a client event type", "type", "invalid_value")

    def set_session(self, s: dict) -> None:
        new = self.cfg.updated(s, self.ing.cfg.max_steps_limit)
        if (new.turn_detection is None) != (self.cfg.turn_detection is None):
            self.vad, self.speech_start, self.silence_ms = None, None, 0
        self.cfg = new

    # ---------------------------------------------------------------------------- input audio
    async def append(self, pcm: bytes) -> None:
        if len(self.buf) + len(pcm) > self.ing.cfg.max_body_bytes:
            raise bad(f"the input audio buffer would be over {self.ing.cfg.max_body_bytes} bytes: commit or clear it",
                      "audio", "input_audio_buffer_too_large")
        self.buf += pcm
        td = self.cfg.turn_detection
        if td is None or not pcm:
            return
        if self.vad is None:  # a fresh detector whenever server VAD is switched on
            try:
                self.vad = await asyncio.to_thread(SileroVad)
            except Exception as e:  # a broken install: say so, and the session goes on without VAD
                self.cfg.turn_detection = None
                raise bad(f"server VAD could not be loaded ({e}); turn_detection is now null", None,
                          "server_vad_unavailable", status=500) from e
            self.vad_ms, self.speech_start = (self.buf_start + len(self.buf) - len(pcm)) // MS, None
        neg = max(td.threshold - 0.15, 0.01)
        for p in await asyncio.to_thread(self.vad.probs, pcm):
            self.vad_ms += SileroVad.WINDOW * 1000 // 16000
            if self.speech_start is None and p >= td.threshold:
                start = self.vad_ms - 32
                self.speech_start = max(self.buf_start // MS, start - td.prefix_padding_ms)
                self.silence_ms, self.vad_item = 0, new_id("item")
                await self.send("input_audio_buffer.speech_started", audio_start_ms=self.speech_start,
                                item_id=self.vad_item)
                if td.interrupt_response:
                    await self.cancel_response("turn_detected")
            elif self.speech_start is not None:
                self.silence_ms = self.silence_ms + 32 if p < neg else 0
                if self.silence_ms >= td.silence_duration_ms:
                    end = min(self.vad_ms, (self.buf_start + len(self.buf)) // MS)
                    await self.send("input_audio_buffer.speech_stopped", audio_end_ms=end, item_id=self.vad_item)
                    self.drop_buffer(self.speech_start * MS - self.buf_start)
                    self.speech_start = None
                    await self.commit(end * MS - self.buf_start, self.vad_item, auto=True)
        if self.speech_start is None:  # no speech: keep only what the next start's padding may need
            self.drop_buffer(max(0, self.vad_ms - td.prefix_padding_ms) * MS - self.buf_start)

    def drop_buffer(self, n: int) -> None:
        n = max(0, min(n, len(self.buf)))
        del self.buf[:n]
        self.buf_start += n

    async def commit(self, n: int, item_id: str | None = None, auto: bool = False) -> None:
        n = max(0, min(n, len(self.buf)))
        if n // MS < MIN_COMMIT_MS:
            if auto:  # a blip the VAD heard: dropped quietly
                return self.drop_buffer(n)
            raise bad(f"buffer too small. Expected at least {MIN_COMMIT_MS}ms of audio, but buffer only has "
                      f"{n // MS}ms of audio.", None, "input_audio_buffer_commit_empty")
        pcm = bytes(self.buf[:n])
        self.drop_buffer(n)
        td = self.cfg.turn_detection
        if not auto:
            self.speech_start = None
        item = Item(item_id or new_id("item"), "user", [{"type": "input_audio", "transcript": None}])
        if not auto or td is None or td.interrupt_response:
            await self.cancel_response("turn_detected")  # barge-in: a new turn stops the answer that is playing
        prev = self.items[-1].id if self.items else None
        await self.send("input_audio_buffer.committed", item_id=item.id, previous_item_id=prev)
        item.audio_ND = (await self.ing._encode_speech(pcm, RATE)).audio_ND
        await self.add_item(item, prev)
        if auto and td is not None and td.create_response and not self.active:
            await self.create_response({})

    # ---------------------------------------------------------------------------- items
    def find(self, item_id: Any) -> Item:
        for it in self.items:
            if it.id == item_id:
                return it
        raise bad(f"no item with id {item_id!r} in this conversation", "item_id", "item_not_found")

    async def add_item(self, item: Item, previous_item_id: str | None = None) -> None:
        at = {"root": 0, None: len(self.items)}.get(previous_item_id)
        at = self.items.index(self.find(previous_item_id)) + 1 if at is None else at
        self.items.insert(at, item)
        prev = self.items[at - 1].id if at else None
        await self.send("conversation.item.added", item=item.body(), previous_item_id=prev)
        await self.send("conversation.item.done", item=item.body(), previous_item_id=prev)

    async def create_item(self, it: dict, previous_item_id: Any) -> None:
        if it.get("type", "message") != "message":
            raise bad(f"item.type {it.get('type')!r} is not supported: messages only (this model does not call "
                      "tools)", "item.type", "unsupported_item")
        role, content = it.get("role"), it.get("content")
        if role not in ("user", "assistant", "system"):
            raise bad("item.role must be 'user', 'assistant' or 'system'", "item.role", "invalid_value")
        if not isinstance(content, list) or not content:
            raise bad("item.content must be a non-empty list of content parts", "item.content", "invalid_value")
        if previous_item_id is not None and previous_item_id != "root":
            self.find(previous_item_id)
        iid = it.get("id")
        if iid is not None and (not isinstance(iid, str) or not iid or any(x.id == iid for x in self.items)):
            raise bad(f"item.id {iid!r} must be a new non-empty string", "item.id", "invalid_value")
        allowed = {"user": ("input_text", "input_audio"), "assistant": ("output_text", "output_audio"),
                   "system": ("input_text",)}[role]
        texts, audio, shown = [], [], []
        for j, part in enumerate(content):
            p = f"item.content[{j}]"
            kind = _obj(part, p).get("type")
            if kind not in allowed:
                raise bad(f"{p}.type {kind!r} is not supported in a {role} item ({', '.join(allowed)})", f"{p}.type",
                          "unsupported_content")
            if kind in ("input_text", "output_text"):
                texts.append(_text(part.get("text"), f"{p}.text", self.ing.max_text_chars))
                shown.append({"type": kind, "text": texts[-1]})
            elif kind == "input_audio":
                audio.append(_pcm(part.get("audio"), f"{p}.audio"))
                shown.append({"type": kind, "transcript": part.get("transcript")})
            else:  # output_audio: the model reads an earlier spoken answer as its transcript
                t = part.get("transcript")
                if not isinstance(t, str):
                    raise bad(f"{p}.transcript is needed: the model reads earlier answers as text", f"{p}.transcript",
                              "missing_required_parameter")
                texts.append(_text(t, f"{p}.transcript", self.ing.max_text_chars))
                shown.append({"type": kind, "transcript": t})
        item = Item(iid or new_id("item"), role, shown, "\n".join(texts) if texts else None)
        heard = await asyncio.gather(*[self.ing._encode_speech(a, RATE) for a in audio])
        if heard:
            item.audio_ND = np.concatenate([h.audio_ND for h in heard])
        await self.add_item(item, previous_item_id)

    async def truncate(self, ev: dict) -> None:
        it = self.find(ev.get("item_id"))
        if it.role != "assistant" or not it.content or it.content[0]["type"] != "output_audio":
            raise bad("only an assistant's audio item can be truncated", "item_id", "invalid_value")
        if ev.get("content_index") != 0:
            raise bad("content_index must be 0 (an answer has one audio part)", "content_index", "invalid_value")
        if it.status == "in_progress":  # still playing: stopped first, so that its transcript is final
            await self.cancel_response("client_cancelled")
        end = int(_number(ev.get("audio_end_ms"), "audio_end_ms", 0, it.audio_bytes // MS, integer=True))
        text = it.text or ""
        it.text = text[:round(len(text) * end * MS / it.audio_bytes)] if it.audio_bytes else ""
        it.text_ids = None  # what was heard is only part of what the model said
        it.content = [{"type": "output_audio", "transcript": it.text}]
        it.audio_bytes = end * MS
        await self.send("conversation.item.truncated", item_id=it.id, content_index=0, audio_end_ms=end)

    # ---------------------------------------------------------------------------- responses
    async def create_response(self, r: dict) -> None:
        if self.active:
            raise bad(f"Conversation already has an active response in progress: {self.response.id}. Wait until "
                      "the response is finished before creating a new one.", None,
                      "conversation_already_has_active_response")
        _known(r, RESPONSE_FIELDS, "response")
        _no_tools(r, "response")
        if r.get("conversation") not in (None, "auto") or r.get("input") is not None:
            raise bad("out-of-band responses (conversation 'none', input) are not supported: a response answers "
                      "this conversation", "response.conversation", "unsupported_parameter")
        s = self.cfg
        speech = s.speech if r.get("output_modalities") is None else \
            _modalities(r["output_modalities"], "response.output_modalities")
        max_steps = s.max_output_tokens if r.get("max_output_tokens") is None else \
            _max_tokens(r["max_output_tokens"], "response.max_output_tokens", self.ing.cfg.max_steps_limit)
        instructions = s.instructions if r.get("instructions") is None else \
            _text(r["instructions"], "response.instructions", MAX_INSTRUCTIONS_CHARS)
        out = _obj(_obj(r.get("audio") or {}, "response.audio").get("output") or {}, "response.audio.output")
        if out.get("format") is not None:
            _format(out["format"], "response.audio.output.format")
        system = [instructions] if instructions else []
        system += [it.text for it in self.items if it.role == "system" and it.text]
        resp = Response(new_id("resp"), speech, max_steps, "\n".join(system) or None, out.get("voice") or s.voice,
                        r.get("metadata"))
        conv = Conversation(_turns(self.items), system=resp.system, keep=True)
        self.response = resp
        await self.send("response.created", response=resp.body("in_progress", []))
        resp.task = asyncio.get_running_loop().create_task(self.respond(resp, conv, time.perf_counter()))

    def forget_turns(self, n: int) -> None:
        """Forget the items of the conversation's first ``n`` turns (as :func:`_turns` groups them): the
        Backbone left them out of the context to fit ``max_context``, so they are not sent again. The
        client's copy of the items is its own; system items stay."""
        turn, prev, forget = 0, None, set()
        for it in self.items:
            if it.role == "system":
                continue
            if prev is None:
                turn = 1 if it.role == "assistant" else 0  # _turns puts an empty user turn first
            elif it.role != prev:
                turn += 1
            prev = it.role
            if turn < n:
                forget.add(id(it))
        self.items = [it for it in self.items if id(it) not in forget]

    async def cancel_response(self, reason: str, notify: bool = True) -> bool:
        r = self.response
        if r is None or r.task is None or r.task.done():
            return False
        r.cancel_reason = reason if notify else ""
        r.task.cancel()
        try:
            await r.task
        except (asyncio.CancelledError, Exception):
            pass
        if not r.finished:  # cancelled before it began: the task never ran
            r.finished = True
            if notify:
                await self.send("response.done", response=r.body("cancelled", [], {"type": "cancelled",
                                                                                   "reason": reason}))
        return True

    async def respond(self, r: Response, conv: Conversation, t0: float) -> None:
        """One response, from the answer's start to ``response.done`` (also when cancelled or refused)."""
        ids = {"response_id": r.id, "output_index": 0, "content_index": 0}
        part = "audio" if r.speech else "text"
        key = "transcript" if r.speech else "text"  # the part's field that holds the words
        item, said, events, end, resample = None, [], None, None, None
        status, details = "failed", None

        async def audio(pcm: bytes) -> None:
            if pcm:
                item.audio_bytes += len(pcm)
                await self.send("response.output_audio.delta", item_id=item.id, **ids,
                                delta=base64.b64encode(pcm).decode())
        try:
            events = self.ing._answer(conv, GenerateOptions(speech=r.speech, max_steps=r.max_steps), t0)
            async for ev in events:
                if ev["type"] == "start":
                    resample = PcmResampler(ev["sample_rate"])
                    item = Item(new_id("item"), "assistant", [{"type": f"output_{part}", key: ""}], "",
                                status="in_progress")
                    prev = self.items[-1].id if self.items else None
                    self.items.append(item)
                    await self.send("response.output_item.added", response_id=r.id, output_index=0, item=item.body())
                    await self.send("conversation.item.added", item=item.body(), previous_item_id=prev)
                    await self.send("response.content_part.added", item_id=item.id, **ids,
                                    part={"type": part, key: ""})
                elif ev["type"] == "text" and ev["delta"]:
                    said.append(ev["delta"])
                    await self.send("response.output_audio_transcript.delta" if r.speech else
                                    "response.output_text.delta", item_id=item.id, **ids, delta=ev["delta"])
                elif ev["type"] == "audio":
                    await audio(resample.push(ev["wav"]))
                elif ev["type"] == "end":
                    end = ev["summary"]
            if r.speech and resample is not None:
                await audio(resample.push(np.zeros(0, dtype=np.float32), last=True))
            status = "completed" if end is None or end.finish_reason == "stop" else "incomplete"
            if status == "incomplete":
                details = {"type": "incomplete", "reason": "max_output_tokens"}
        except Exception as e:  # refused (prompt too long), or failed: an error event and a failed response
            err = OpenAIError.from_rejection(e) if isinstance(e, Rejection) else e if isinstance(e, OpenAIError) \
                else OpenAIError(500, f"the answer failed: {e!r}", "internal_error")
            details = {"type": "failed", "error": {"type": err.type, "code": err.code, "message": err.message}}
            try:
                await self.error(err)
            except Exception:  # the client is gone
                pass
        except asyncio.CancelledError:
            status, details = "cancelled", {"type": "cancelled", "reason": r.cancel_reason or "client_cancelled"}
            if not r.cancel_reason:  # the client is gone: nothing to tell
                r.finished = True
                raise
        finally:
            if events is not None:
                await events.aclose()
        r.finished = True
        if end is not None and end.dropped_turns:
            self.forget_turns(end.dropped_turns)
        output = []
        if item is not None:
            text = "".join(said)
            item.text = text
            item.text_ids = None if end is None else end.text_ids
            item.status = "completed" if status == "completed" else "incomplete"
            item.content = [{"type": f"output_{part}", key: text}]
            output = [item.body()]
            try:
                if r.speech:
                    await self.send("response.output_audio.done", item_id=item.id, **ids)
                    await self.send("response.output_audio_transcript.done", item_id=item.id, **ids, transcript=text)
                else:
                    await self.send("response.output_text.done", item_id=item.id, **ids, text=text)
                await self.send("response.content_part.done", item_id=item.id, **ids,
                                part={"type": part, key: text})
                await self.send("response.output_item.done", response_id=r.id, output_index=0, item=item.body())
                await self.send("conversation.item.done", item=item.body())
            except Exception:  # the client went away meanwhile
                return
        try:
            await self.send("response.done", response=r.body(status, output, details,
                                                              None if end is None else _usage(end)))
        except Exception:
            pass
