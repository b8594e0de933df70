"""Frames between the proxy and its recording process: a 4-byte length, then a pickled `(kind, payload)` tuple.

Both ends are our own processes on a private socket pair, so pickle is safe here; it is also the cheapest way to
move an exchange (bytes and small dicts) across: protocol 5 copies a 200 KB body once.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

HEADER = struct.Struct("!I")

# proxy -> recorder
HELLO = "hello"  # the proxy's Settings (the recorder opens its own database engine, spool and senders)
RECORD = "record"  # an ExchangeRecord
TRAINS = "trains"  # {train id: its SlackSettings or None}, after every credential change
FLUSH = "flush"  # (token, timeout): answered with FLUSHED once everything received so far is stored
METRICS = "metrics"  # token: answered with METRICS (token, metric families)
STOP = "stop"  # timeout: write or spool what is queued, answer STOPPED, exit
# recorder -> proxy
READY = "ready"  # started: spool claimed, writer running
DONE = "done"  # [request ids]: stored (metadata in the database or spool; payload stored or shed)
FLUSHED = "flushed"  # (token, everything stored)
STOPPED = "stopped"
NOTICE = "notice"  # a Slack notification for the proxy's one sender (one queue and one rate per webhook)


def encode(kind: str, payload: Any) -> list[bytes]:
    body = pickle.dumps((kind, payload), protocol=5)
    return [HEADER.pack(len(body)), body]


def frame_size(frame: list[bytes]) -> int:
    return sum(len(part) for part in frame)


async def read_frame(reader: asyncio.StreamReader) -> tuple[str, Any] | None:
    """The next frame, or None at the end of the stream (the other process is gone)."""
    try:
        header = await reader.readexactly(HEADER.size)
        (length,) = HEADER.unpack(header)
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    kind, payload = pickle.loads(body)  # noqa: S301 - our own process on a private socket pair
    return str(kind), payload
