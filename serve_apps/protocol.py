"""The wire protocol of ``docs/serving.md``: message kinds, rejection reasons, close codes, PCM encoding.

Server and page follow this module (the page's ``static/app.js`` mirrors the names); nothing here
depends on Ray, so it is unit-testable and importable by clients.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import numpy as np

# the Retry-After an overloaded server suggests, clamped (set where the answer loop computes it)
from deepomni.serve.messages import RETRY_AFTER_MAX_S, RETRY_AFTER_MIN_S  # noqa: F401

# ------------------------------------------------------------------------------------------ audio out
AUDIO_FORMAT = "pcm_s16le"  # answer audio: signed 16-bit little-endian mono at the codec's sample rate


def pcm_s16le(wav: np.ndarray) -> bytes:
    """Float audio (clipped to [-1, 1]) -> 16-bit little-endian PCM bytes."""
    x = np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0)
    return (x * 32767.0).round().astype("<i2").tobytes()


def pcm_s16le_to_float(data: bytes) -> np.ndarray:
    """16-bit little-endian PCM bytes -> float32 in [-1, 1). Raises ``ValueError`` on an odd byte count."""
    if len(data) % 2:
        raise ValueError(f"pcm_s16le audio must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


# ------------------------------------------------------------------------------------------ rejections
class Rejection(Exception):
    """A request we refuse: HTTP status, a machine-readable ``reason`` (the metric's tag) and a message for
    the person who sent it. Over WebSocket the same reasons travel in ``error`` messages or close frames.
    ``retry_after_s`` (``overloaded``): when to try again, sent as ``Retry-After`` and in the body."""

    def __init__(self, status: int, reason: str, message: str, retry_after_s: int | None = None):
        super().__init__(status, reason, message)
        self.status, self.reason, self.message = status, reason, message
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        err = {"reason": self.reason, "message": self.message}
        if self.retry_after_s is not None:
            err["retry_after_s"] = self.retry_after_s
        return {"error": err}

    def headers(self) -> dict[str, str]:
        return http_headers(self.status, self.retry_after_s)


def http_headers(status: int, retry_after_s: int | None) -> dict[str, str]:
    """The headers a refusal carries: ``Retry-After`` (503), ``WWW-Authenticate`` (401, RFC 6750)."""
    out = {}
    if retry_after_s is not None:
        out["Retry-After"] = str(retry_after_s)
    if status == 401:
        out["WWW-Authenticate"] = 'Bearer realm="deepomni"'
    return out


# reason -> HTTP status (docs/serving.md "Errors"); every reason is also a value of the rejected metric's tag
REASONS = {
    "unsupported_media_type": 415,  # Content-Type neither audio/* nor application/json
    "body_too_large": 413,  # request body (or one WebSocket turn's audio) over max_body_bytes
    "malformed_json": 400,  # body or WebSocket text frame is not a JSON object
    "bad_base64": 400,  # audio_b64 is not valid base64
    "bad_request": 400,  # fields missing, of the wrong type or out of range
    "not_audio": 422,  # bytes no audio decoder recognises
    "truncated_audio": 422,  # an audio file cut short (header declares more than is there) or corrupt
    "empty_audio": 422,  # no samples
    "audio_too_long": 422,  # longer than the speech encoder's window
    "bad_audio": 422,  # other unusable audio (sample rate, NaN samples, ...)
    "prompt_too_long": 422,  # the prompt does not fit the model's positions
    "protocol_error": 400,  # WebSocket: a message the protocol does not allow here
    "unauthorized": 401,  # an API key is set (docs/serving.md "Authentication") and the request lacks it
    "overloaded": 503,  # max_queued sessions already wait for the model's rows: try again after Retry-After
    "internal_error": 500,  # generation failed (a bug): the server logs it and keeps serving
    # a deployment the answer needed died or stalled mid-answer (docs/serving.md "Faults"): Serve replaces the
    # replica; the server stays up and a new request is answered once it is back (Retry-After)
    "unavailable": 503,
}


def reject(reason: str, message: str, retry_after_s: int | None = None) -> Rejection:
    return Rejection(REASONS[reason], reason, message, retry_after_s)


def audio_reason(message: str) -> str:
    """Classify a :class:`deepomni.audio.AudioError` message into a rejection reason."""
    m = message.lower()
    if "not a recognised audio file" in m or "which is not audio" in m:
        return "not_audio"
    if "truncated" in m or "could not be decoded" in m:
        return "truncated_audio"
    if "holds no audio" in m or "0 bytes" in m or "0 samples" in m:
        return "empty_audio"
    if "over the limit" in m or ("window" in m and "long" in m):
        return "audio_too_long"
    return "bad_audio"


def decode_b64(text: object) -> bytes:
    if not isinstance(text, str):
        raise reject("bad_request", "audio_b64 must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise reject("bad_base64", f"audio_b64 is not valid base64: {e}") from e


def parse_json_object(body: bytes | bytearray | str, what: str = "the body") -> dict:
    """A request body or WebSocket text frame -> its JSON object; anything else is ``malformed_json``:
    bytes that are not UTF-8 (or UTF-16/32, which :func:`json.loads` detects), text that is not JSON,
    nesting too deep for the decoder (a ``RecursionError``), an integer of too many digits, or a
    top level that is not an object."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError as e:  # before ValueError, its base class
        raise reject("malformed_json", f"{what} is not valid UTF-8 JSON: {e}") from e
    except ValueError as e:  # json.JSONDecodeError, or an integer over sys.get_int_max_str_digits()
        raise reject("malformed_json", f"{what} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise reject("malformed_json", f"{what} is not valid JSON: it is nested too deeply") from e
    if not isinstance(data, dict):
        raise reject("malformed_json", f"{what} must be a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------ options
SEED_MAX = 2**63 - 1  # seeds are 0..SEED_MAX: torch.Generator.manual_seed takes any 64-bit value, and this
# range means the same seed to every client (no signed/unsigned aliasing of negative or >= 2**63 seeds)


def _shown(v: object, limit: int = 60) -> str:
    """``repr(v)`` for a message, cut to ``limit`` characters (a request may send a 5000-digit number)."""
    try:
        r = repr(v)
    except ValueError:  # an int over sys.get_int_max_str_digits()
        return f"<{type(v).__name__} too long to show>"
    return r if len(r) <= limit else f"{r[: limit - 3]}..."


@dataclass
class AnswerOptions:
    """Per-request generation options (JSON fields or query parameters of the same names)."""

    speech: bool = True  # False: a text answer only
    max_steps: int | None = None  # None: the server's default; capped by the server's max_steps
    seed: int | None = None  # codec sampling seed (None: random)

    def generate_options(self):
        from deepomni.serve.messages import GenerateOptions

        return GenerateOptions(speech=self.speech, max_steps=self.max_steps, seed=self.seed)

    @classmethod
    def parse(cls, raw: dict, cap: int) -> AnswerOptions:
        opts = cls()
        if "speech" in raw:
            v = raw["speech"]
            if isinstance(v, str):
                v = v.lower() in ("1", "true", "yes")
            if not isinstance(v, bool):
                raise reject("bad_request", "speech must be true or false")
            opts.speech = v
        for name in ("max_steps", "seed"):
            if raw.get(name) is None:
                continue
            v = raw[name]
            try:  # float(): "1e400", "inf" and "nan" are not integers; OverflowError: an int past float's range
                v = int(v) if not isinstance(v, bool) and float(v).is_integer() else None
            except (TypeError, ValueError, OverflowError):
                v = None
            if v is None or v < (1 if name == "max_steps" else 0):
                raise reject("bad_request", f"{name} must be a {'positive' if name == 'max_steps' else 'non-negative'} "
                                            f"integer, got {_shown(raw[name])}")
            if name == "seed" and v > SEED_MAX:
                raise reject("bad_request", f"seed must be an integer from 0 to {SEED_MAX} (2**63 - 1), got "
                                            f"{_shown(raw[name])}")
            setattr(opts, name, v)
        if opts.max_steps is not None and opts.max_steps > cap:
            raise reject("bad_request", f"max_steps must be at most {cap}, got {_shown(opts.max_steps)}")
        return opts


# ------------------------------------------------------------------------------------------ SSE
def sse(event: str, data: dict) -> bytes:
    """One server-sent event: ``event: <kind>`` and a one-line JSON ``data``."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# ------------------------------------------------------------------------------------------ WebSocket
# close codes (RFC 6455) the server uses, with the reason text it sends (docs/serving.md "WebSocket")
WS_UNSUPPORTED_DATA = 1003  # a message kind the protocol does not know ("type" unknown)
WS_INVALID_PAYLOAD = 1007  # a text frame that is not a JSON object, or pcm_s16le audio of odd length
WS_POLICY_VIOLATION = 1008  # a message not allowed in the current state, or invalid fields
WS_MESSAGE_TOO_BIG = 1009  # one turn's audio over max_body_bytes
# WS_POLICY_VIOLATION also closes a connection without the API key (after an ``error`` message saying so)
WS_INTERNAL_ERROR = 1011

WS_INPUT_FORMATS = ("pcm_s16le", "file")  # binary frames of a turn: raw PCM at sample_rate, or one audio file
