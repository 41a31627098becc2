"""``WS /v1/realtime``: OpenAI's Realtime API (GA event names), as the official ``openai`` client speaks it
(``client.realtime.connect(model="deepomni")``). What a client event may hold, and how it is checked:
``realtime_fields.py``; server VAD (``server_vad`` turn detection, Silero): ``vad.py``; the answers: the
:class:`~serve_apps.answers.Answers` of every surface.

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
``conversation.item.retrieve`` and ``output_audio_buffer.clear`` (WebRTC only) are refused. ``response.done``
is ``incomplete`` (``max_output_tokens``) when the answer ran to its steps; a cancelled response carries no
usage. ``conversation.item.truncate`` keeps the share of an assistant answer's transcript that matches the
share of its audio heard (``audio_end_ms`` / the audio's length): text and audio are not aligned word by
word, so this is an approximation.

A wrong ``model`` query parameter gets an ``error`` event (``model_not_found``) and the connection is closed
(1008); a missing one means deepomni. Past ``max_context`` the Backbone leaves the oldest turns out
(``docs/serving.md`` "Conversation memory"); the session then forgets their items too, so what it sends
stays bounded. A committed turn's audio is encoded before the next client event is read (an answer that
is playing keeps streaming meanwhile).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect

from deepomni.serve.messages import Conversation, ConversationTurn, GenerateOptions

from .openai_api import MODEL_ID, OpenAIError, PcmResampler, bad, new_id
from .protocol import Rejection
from .realtime_fields import (PCM_FORMAT, RATE, SessionConfig, client_event, item_parts, item_role, number_field,
                              object_field, pcm_field, response_usage)
from .vad import SpeechDetector, SpeechStarted, SpeechStopped

if TYPE_CHECKING:
    from .answers import Answers

MS = 2 * RATE // 1000  # bytes of pcm16 per millisecond
MIN_COMMIT_MS = 100  # OpenAI refuses to commit less (input_audio_buffer_commit_empty)


# ------------------------------------------------------------------------------------------ state
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


# ------------------------------------------------------------------------------------------ the session
class RealtimeSession:
    """One ``/v1/realtime`` connection. The receive loop handles client events in order; a response runs as a
    task (one at a time), so the loop keeps reading while it streams."""

    def __init__(self, answers: Answers, ws: WebSocket):
        self.answers, self.ws = answers, ws
        self.cfg = SessionConfig()
        self.items: list[Item] = []
        self.response: Response | None = None
        self.buf = bytearray()  # the input audio buffer (24 kHz pcm16)
        self.buf_start = 0  # its first byte's offset in all the audio appended this session
        self.vad: SpeechDetector | None = None  # while server VAD is on (loaded at the first audio)

    # ---------------------------------------------------------------------------- plumbing
    async def send(self, type_: str, **fields: Any) -> None:
        await self.ws.send_text(json.dumps({"type": type_, "event_id": new_id("event"), **fields}))

    async def error(self, e: OpenAIError, event_id: str | None = None) -> None:
        self.answers.rejected(e, "realtime")
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
                    data = client_event(msg.get("text"))
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
            self.set_session(object_field(ev.get("session"), "session"))
            await self.send("session.updated", session=self.cfg.body())
        elif kind == "input_audio_buffer.append":
            await self.append(pcm_field(ev.get("audio"), "audio"))
        elif kind == "input_audio_buffer.commit":
            await self.commit(len(self.buf))
        elif kind == "input_audio_buffer.clear":
            self.drop_buffer(len(self.buf))
            if self.vad is not None:  # the pending speech went with the buffer
                self.vad.forget()
            await self.send("input_audio_buffer.cleared")
        elif kind == "conversation.item.create":
            await self.create_item(object_field(ev.get("item"), "item"), ev.get("previous_item_id"))
        elif kind == "conversation.item.delete":
            it = self.find(ev.get("item_id"))
            self.items.remove(it)
            await self.send("conversation.item.deleted", item_id=it.id)
        elif kind == "conversation.item.truncate":
            await self.truncate(ev)
        elif kind == "response.create":
            await self.create_response(object_field(ev.get("response") or {}, "response"))
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
        new = self.cfg.updated(s, self.answers.cfg.max_steps_limit)
        if (new.turn_detection is None) != (self.cfg.turn_detection is None):
            self.vad = None
        self.cfg = new

    # ---------------------------------------------------------------------------- input audio
    async def append(self, pcm: bytes) -> None:
        if len(self.buf) + len(pcm) > self.answers.cfg.max_body_bytes:
            raise bad(f"the input audio buffer would be over {self.answers.cfg.max_body_bytes} bytes: commit or "
                      "clear it", "audio", "input_audio_buffer_too_large")
        self.buf += pcm
        td = self.cfg.turn_detection
        if td is None or not pcm:
            return
        if self.vad is None:  # a fresh detector whenever server VAD is switched on
            try:
                self.vad = await SpeechDetector.load((self.buf_start + len(self.buf) - len(pcm)) // MS)
            except Exception as e:  # a broken install: say so, and the session goes on without VAD
                self.cfg.turn_detection = None
                raise bad(f"server VAD could not be loaded ({e}); turn_detection is now null", None,
                          "server_vad_unavailable", status=500) from e
        for p in await self.vad.probs(pcm):
            said = self.vad.step(p, td, self.buf_start // MS, (self.buf_start + len(self.buf)) // MS)
            if isinstance(said, SpeechStarted):
                await self.send("input_audio_buffer.speech_started", audio_start_ms=said.start_ms, item_id=said.item_id)
                if td.interrupt_response:
                    await self.cancel_response("turn_detected")
            elif isinstance(said, SpeechStopped):
                await self.send("input_audio_buffer.speech_stopped", audio_end_ms=said.end_ms, item_id=said.item_id)
                self.drop_buffer(said.start_ms * MS - self.buf_start)
                await self.commit(said.end_ms * MS - self.buf_start, said.item_id, auto=True)
        if self.vad.start_ms is None:  # no speech: keep only what the next start's padding may need
            self.drop_buffer(self.vad.padding_from_ms(td) * MS - self.buf_start)

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
        if not auto and self.vad is not None:  # the client committed the buffer: the pending speech with it
            self.vad.forget()
        item = Item(item_id or new_id("item"), "user", [{"type": "input_audio", "transcript": None}])
        if not auto or td is None or td.interrupt_response:
            await self.cancel_response("turn_detected")  # barge-in: a new turn stops the answer that is playing
        prev = self.items[-1].id if self.items else None
        await self.send("input_audio_buffer.committed", item_id=item.id, previous_item_id=prev)
        item.audio_ND = (await self.answers.encode(pcm, RATE)).audio_ND
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
        role, content = item_role(it)
        if previous_item_id is not None and previous_item_id != "root":
            self.find(previous_item_id)
        iid = it.get("id")
        if iid is not None and (not isinstance(iid, str) or not iid or any(x.id == iid for x in self.items)):
            raise bad(f"item.id {iid!r} must be a new non-empty string", "item.id", "invalid_value")
        texts, audio, shown = item_parts(role, content, self.answers.max_text_chars)
        item = Item(iid or new_id("item"), role, shown, "\n".join(texts) if texts else None)
        heard = await self.answers.encode_all(audio, RATE)
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
        end = int(number_field(ev.get("audio_end_ms"), "audio_end_ms", 0, it.audio_bytes // MS, integer=True))
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
        rs = self.cfg.response(r, self.answers.cfg.max_steps_limit)
        system = [rs.instructions] if rs.instructions else []
        system += [it.text for it in self.items if it.role == "system" and it.text]
        resp = Response(new_id("resp"), rs.speech, rs.max_steps, "\n".join(system) or None, rs.voice, rs.metadata)
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
            events = self.answers.answer(conv, GenerateOptions(speech=r.speech, max_steps=r.max_steps), t0)
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
                                                              None if end is None else response_usage(end)))
        except Exception:
            pass
