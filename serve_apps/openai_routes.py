"""The OpenAI-compatible HTTP routes: what each does between the request and the answer
(:class:`~serve_apps.answers.Answers`, the API every surface calls).

The Ingress class holds the route table (FastAPI under ``@serve.ingress``) and calls :class:`OpenAIRoutes`,
one per replica, which keeps what only these routes need (spoken answers' transcripts by audio id); request
parsing and response shapes are :mod:`serve_apps.openai_api`. Every answer runs as on the native endpoints:
encoder -> backbone stream -> vocoder, with the same metrics.

    POST /v1/chat/completions   a conversation (text and input_audio), text or text + audio out, streamed or not
    POST /v1/audio/transcriptions   the model's ASR task
    POST /v1/audio/speech       the model's TTS task, streamed as it is generated
    GET  /v1/models             the one model
"""

from __future__ import annotations

import base64
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from deepomni.serve.messages import AnswerEnd, Conversation, ConversationTurn, GenerateOptions

from .openai_api import (AUDIO_MEDIA_TYPES, MODEL_ID, OPENAI_SAMPLE_RATE, SPEECH_FORMATS, TRANSCRIPTION_FORMATS,
                         ChatShape, OpenAIError, PcmResampler, Usage, bad, check_model, encode_output_audio,
                         models_list, new_id, parse_chat, sse_data)
from .protocol import Rejection, parse_json_object

if TYPE_CHECKING:
    from .answers import Answers

AUDIO_ID_TTL_S = 3600  # how long a spoken answer's id may be sent back as an assistant message
MAX_AUDIO_IDS = 10_000
MAX_SPEECH_INPUT_CHARS = 4096  # OpenAI's limit for /v1/audio/speech input
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class AudioIds:
    """Transcripts of this replica's spoken answers by audio id, for clients that send an earlier answer
    back as ``{"role": "assistant", "audio": {"id": ...}}`` (LRU, expiring after ``AUDIO_ID_TTL_S``)."""

    def __init__(self):
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def add(self, transcript: str) -> tuple[str, int]:
        aid, expires = new_id("audio"), int(time.time() + AUDIO_ID_TTL_S)
        self.set(aid, transcript, expires)
        while len(self._items) > MAX_AUDIO_IDS:
            self._items.popitem(last=False)
        return aid, expires

    def set(self, aid: str, transcript: str, expires: int) -> None:
        self._items[aid] = (transcript, expires)

    def transcript(self, aid: str) -> str | None:
        item = self._items.get(aid)
        if item is None or item[1] < time.time():
            return None
        return item[0]


def error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


async def _refused(answers: Answers, e: Exception, endpoint: str) -> JSONResponse:
    err = OpenAIError.from_rejection(e) if isinstance(e, Rejection) else e
    answers.rejected(err, endpoint)
    return error_response(err)


def _usage(end: AnswerEnd) -> Usage:
    return Usage(prompt_tokens=end.prompt_tokens, cached_tokens=end.cached_tokens,
                 audio_prompt_tokens=end.audio_prompt_tokens, text_tokens=end.text_tokens,
                 audio_tokens=end.frames * end.codec_channels)


async def _drain(events: AsyncIterator[dict]) -> tuple[list[str], list[np.ndarray], AnswerEnd | None]:
    """A whole (non-streamed) answer: its text deltas, audio chunks and summary; closes the events."""
    text, wavs, end = [], [], None
    try:
        async for ev in events:
            if ev["type"] == "text":
                text.append(ev["delta"])
            elif ev["type"] == "audio":
                wavs.append(ev["wav"])
            elif ev["type"] == "end":
                end = ev["summary"]
    finally:
        await events.aclose()
    return text, wavs, end


# ------------------------------------------------------------------------------------ the routes
class OpenAIRoutes:
    """The OpenAI-compatible routes of one Ingress replica, answered by its :class:`Answers`."""

    def __init__(self, answers: Answers):
        self.answers = answers
        self.audio_ids = AudioIds()  # spoken chat answers' transcripts, for clients that send them back by id
        self.started = int(time.time())  # the model's "created"

    # -------------------------------------------------------------------------------- chat completions
    async def chat_completions(self, request: Request) -> Response:
        ans, t0 = self.answers, time.perf_counter()
        try:
            data = parse_json_object(await ans.read_body(request), "the body")
            req = parse_chat(data, ans.cfg.max_steps_limit, ans.max_text_chars, self.audio_ids.transcript)
            if req.stream and req.speech and req.audio_format != "pcm16":
                raise bad("streamed audio is pcm16 (24 kHz, 16-bit, mono): set audio.format to pcm16",
                          "audio.format", code="unsupported_parameter")
            # each spoken message's features go from the encoder straight to the Backbone (Answers.hear)
            heard = [ans.hear(m.audio) for m in req.messages if m.audio is not None]
            index = iter(range(len(heard)))
            turns = tuple(ConversationTurn(m.role, m.text, heard=next(index) if m.audio is not None else None)
                          for m in req.messages)
            conv = Conversation(turns, system=req.system, keep=True)
            opts = GenerateOptions(speech=req.speech, max_steps=req.max_steps, seed=req.seed,
                                   temperature=req.temperature)
            first, events = await ans.start(conv, opts, t0, heard)
        except (OpenAIError, Rejection) as e:
            return await _refused(ans, e, "chat_completions")
        shape = ChatShape()
        if req.stream:
            return StreamingResponse(self._chat_stream(shape, req, first, events), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        sr = first["sample_rate"]
        try:
            text, wavs, end = await _drain(events)
        except Rejection as e:
            return await _refused(ans, e, "chat_completions")
        answer = "".join(text)
        audio = None
        if req.speech:
            wav = np.concatenate(wavs) if wavs else np.zeros(0, dtype=np.float32)
            aid, expires = self.audio_ids.add(answer)
            audio = {"id": aid, "data": base64.b64encode(encode_output_audio(wav, sr, req.audio_format)).decode(),
                     "transcript": answer, "expires_at": expires}
        return JSONResponse(shape.completion(answer, end.finish_reason, _usage(end), audio))

    async def _chat_stream(self, shape: ChatShape, req, first: dict, events: AsyncIterator[dict]
                           ) -> AsyncIterator[bytes]:
        aid = expires = None
        resample = PcmResampler(first["sample_rate"])
        text = []
        try:
            yield sse_data(shape.chunk({"role": "assistant", "content": None if req.speech else ""}))
            if req.speech:
                aid, expires = self.audio_ids.add("")
            async for ev in events:
                if ev["type"] == "text":
                    text.append(ev["delta"])
                    delta = {"audio": {"id": aid, "transcript": ev["delta"]}} if req.speech else \
                        {"content": ev["delta"]}
                    yield sse_data(shape.chunk(delta))
                elif ev["type"] == "audio":
                    pcm = resample.push(ev["wav"])
                    if pcm:
                        yield sse_data(shape.chunk({"audio": {"id": aid, "data": base64.b64encode(pcm).decode()}}))
                elif ev["type"] == "end":
                    end: AnswerEnd = ev["summary"]
                    if req.speech:
                        tail = resample.push(np.zeros(0, dtype=np.float32), last=True)
                        audio = {"id": aid, "expires_at": expires}
                        if tail:
                            audio["data"] = base64.b64encode(tail).decode()
                        yield sse_data(shape.chunk({"audio": audio}))
                        self.audio_ids.set(aid, "".join(text), expires)  # the whole transcript, now known
                    usage = _usage(end)
                    yield sse_data(shape.chunk({}, end.finish_reason, usage))
                    if req.include_usage:
                        yield sse_data(shape.chunk({}, usage=usage, choices=False))
        except Rejection as e:  # after the 200: the error travels in the stream, as OpenAI's do
            err = OpenAIError.from_rejection(e)
            self.answers.rejected(err, "chat_completions")
            yield sse_data(err.body())
        finally:
            await events.aclose()
        yield sse_data("[DONE]")

    # -------------------------------------------------------------------------------- transcriptions
    async def transcriptions(self, request: Request) -> Response:
        ans, t0 = self.answers, time.perf_counter()
        limit = ans.cfg.max_body_bytes
        try:
            ctype = request.headers.get("content-type", "")
            if not ctype.lower().startswith("multipart/form-data"):
                raise bad("send multipart/form-data with a 'file' and a 'model'", "file",
                          code="unsupported_media_type", status=415)
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise bad(f"the body is over the limit of {limit} bytes", "file", code="body_too_large", status=413)
            try:
                form = await request.form(max_files=1, max_fields=32)
            except Exception as e:  # starlette's multipart errors: a malformed form
                raise bad(f"the multipart form could not be read: {e}", "file") from e
            check_model(form.get("model"))
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise bad("the form needs a 'file' part holding the audio file", "file")
            audio = await upload.read()
            if len(audio) > limit:
                raise bad(f"the file is over the limit of {limit} bytes", "file", code="body_too_large", status=413)
            fmt = form.get("response_format") or "json"
            if fmt not in TRANSCRIPTION_FORMATS:
                raise bad(f"response_format must be one of {list(TRANSCRIPTION_FORMATS)}, got {fmt!r}",
                          "response_format", code="unsupported_parameter")
            stream = str(form.get("stream") or "false").lower() in ("true", "1")
            _, events = await ans.start(Conversation.single(heard=0, task="asr"), GenerateOptions(speech=False), t0,
                                        [ans.hear(audio)])
        except (OpenAIError, Rejection) as e:
            return await _refused(ans, e, "transcriptions")
        if stream:
            return StreamingResponse(_transcript_stream(ans, events), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        try:
            _, _, end = await _drain(events)
        except Rejection as e:
            return await _refused(ans, e, "transcriptions")
        text = end.text.strip()
        if fmt == "text":
            return PlainTextResponse(text + "\n")
        if fmt == "verbose_json":
            return JSONResponse({"task": "transcribe", "language": "english", "duration": round(end.heard_seconds, 3),
                                 "text": text})
        return JSONResponse({"text": text, "usage": _transcription_usage(end)})

    # -------------------------------------------------------------------------------- speech
    async def speech(self, request: Request) -> Response:
        ans, t0 = self.answers, time.perf_counter()
        try:
            data = parse_json_object(await ans.read_body(request), "the body")
            check_model(data.get("model"))
            text = data.get("input")
            if not isinstance(text, str) or not text.strip():
                raise bad("input must be a non-empty string", "input")
            if len(text) > MAX_SPEECH_INPUT_CHARS:
                raise bad(f"input is over {MAX_SPEECH_INPUT_CHARS} characters", "input")
            if data.get("voice") is None:
                raise bad("voice is required (this model has one voice: any value is accepted)", "voice")
            fmt = data.get("response_format") or "mp3"
            if fmt not in SPEECH_FORMATS:
                raise bad(f"response_format must be one of {list(SPEECH_FORMATS)}, got {fmt!r}", "response_format",
                          code="unsupported_parameter")
            stream_format = data.get("stream_format") or "audio"
            if stream_format not in ("audio", "sse"):
                raise bad(f"stream_format must be 'audio' or 'sse', got {stream_format!r}", "stream_format")
            first, events = await ans.start(Conversation.single(text=text, task="tts"),
                                            GenerateOptions(speech=True, max_steps=ans.cfg.max_steps_limit), t0)
        except (OpenAIError, Rejection) as e:
            return await _refused(ans, e, "speech")
        body = _speech_body(ans, fmt, stream_format, first["sample_rate"], events)
        if stream_format == "sse":
            return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
        return StreamingResponse(body, media_type=AUDIO_MEDIA_TYPES[fmt])

    # -------------------------------------------------------------------------------- models
    def models(self) -> JSONResponse:
        return JSONResponse(models_list(self.started))

    def model(self, model_id: str) -> JSONResponse:
        if model_id != MODEL_ID:
            return error_response(OpenAIError(404, f"The model {model_id!r} does not exist: this server serves "
                                                   f"{MODEL_ID!r}", "model_not_found", "model"))
        return JSONResponse(models_list(self.started)["data"][0])


# ------------------------------------------------------------------------------------ streamed bodies
def _transcription_usage(end: AnswerEnd) -> dict:
    return {"type": "tokens", "input_tokens": end.prompt_tokens, "output_tokens": end.text_tokens,
            "total_tokens": end.prompt_tokens + end.text_tokens,
            "input_token_details": {"audio_tokens": end.audio_prompt_tokens,
                                    "text_tokens": end.prompt_tokens - end.audio_prompt_tokens}}


async def _transcript_stream(answers: Answers, events: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    try:
        async for ev in events:
            if ev["type"] == "text" and ev["delta"]:
                yield sse_data({"type": "transcript.text.delta", "delta": ev["delta"]})
            elif ev["type"] == "end":
                end = ev["summary"]
                yield sse_data({"type": "transcript.text.done", "text": end.text.strip(),
                                "usage": _transcription_usage(end)})
    except Rejection as e:
        err = OpenAIError.from_rejection(e)
        answers.rejected(err, "transcriptions")
        yield sse_data(err.body())
    finally:
        await events.aclose()


def _wav_stream_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header whose sizes say "unknown" (0xFFFFFFFF), as programs writing to a pipe do:
    the audio follows as it is generated (our own ``load_audio`` and common players read such files)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) + b"data" + struct.pack("<I", unknown))


async def _speech_body(answers: Answers, fmt: str, stream_format: str, sr: int, events: AsyncIterator[dict]
                       ) -> AsyncIterator[bytes]:
    """pcm and wav stream as the audio comes (wav with a streaming header); flac, mp3 and opus are encoded
    once the answer is complete. ``sse`` wraps the same bytes in ``speech.audio.delta`` events."""
    streamed = fmt in ("pcm", "wav")
    resample, wavs, end = PcmResampler(sr), [], None

    def out(chunk: bytes) -> bytes:
        if stream_format == "sse":
            return sse_data({"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode()})
        return chunk

    try:
        if fmt == "wav":
            yield out(_wav_stream_header(OPENAI_SAMPLE_RATE))
        async for ev in events:
            if ev["type"] == "audio":
                if streamed:
                    pcm = resample.push(ev["wav"])
                    if pcm:
                        yield out(pcm)
                else:
                    wavs.append(ev["wav"])
            elif ev["type"] == "end":
                end = ev["summary"]
        if streamed:
            tail = resample.push(np.zeros(0, dtype=np.float32), last=True)
            if tail:
                yield out(tail)
        else:
            yield out(encode_output_audio(np.concatenate(wavs) if wavs else np.zeros(0, np.float32), sr, fmt))
        if stream_format == "sse" and end is not None:
            n_in, n_out = end.prompt_tokens, end.text_tokens + end.frames * end.codec_channels
            yield sse_data({"type": "speech.audio.done",
                            "usage": {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}})
    except Rejection as e:  # mid-stream: nothing more can be said in an audio body; the log and metric have it
        answers.rejected(OpenAIError.from_rejection(e), "speech")
        if stream_format == "sse":
            yield sse_data(OpenAIError.from_rejection(e).body())
    finally:
        await events.aclose()
