"""``WS /v1/realtime`` through the official ``openai`` client's Realtime connection: every server event read is
validated against the client's own pydantic types (``RealtimeServerEvent``)."""

from __future__ import annotations

import asyncio

from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

SERVER_EVENT = TypeAdapter(RealtimeServerEvent)
NO_VAD = {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                                  "turn_detection": None}}}


async def recv(conn, timeout: float = 60):
    raw = await asyncio.wait_for(conn.recv_bytes(), timeout)
    return SERVER_EVENT.validate_json(raw)  # strict: every event must be one the client knows


async def until(conn, kind: str, timeout: float = 60) -> list:
    """Events up to and including the first of type ``kind``."""
    out = []
    while not out or out[-1].type != kind:
        out.append(await recv(conn, timeout))
    return out


async def no_vad(conn, **session) -> None:
    await conn.session.update(session={**NO_VAD, **session})
    ev = await recv(conn)
    assert ev.type == "session.updated" and ev.session.audio.input.turn_detection is None, ev
