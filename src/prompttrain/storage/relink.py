"""`prompttrain relink`: recompute conversation linking for stored history, oldest first, in batches.

A fix to the linking algorithm reaches old data this way. Each request's body is rebuilt from its payload (requests
whose payload was shed or expired keep their current links), its facts recomputed, and it is linked against the
already relinked history before it — the same code the writer runs at insert time.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from prompttrain.conversation.attribution import tool_result_names
from prompttrain.conversation.linking import compact_summary_of, facts_of
from prompttrain.storage.linking_store import link_row, record_task_calls
from prompttrain.storage.queries import load_payload
from prompttrain.storage.tables import api_requests, task_invocations


@dataclass
class RelinkReport:
    examined: int = 0
    relinked: int = 0
    skipped: int = 0  # no payload left to recompute from


class ProgressBar:
    """A one-line progress bar on a terminal (a line every 10% otherwise)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.width = width
        self.started = time.monotonic()
        self._last_decile = -1

    def update(self, done: int) -> None:
        fraction = min(done / self.total, 1.0)
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        filled = int(fraction * self.width)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} requests, {rate:.0f}/s"
        if self.stream.isatty():
            self.stream.write("\r" + line)
        elif int(fraction * 10) != self._last_decile:
            self._last_decile = int(fraction * 10)
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream.isatty():
            self.stream.write("\n")


async def relink(
    engine: AsyncEngine,
    since: datetime | None,
    *,
    batch_size: int = 500,
    progress: Callable[[int, int], None] | None = None,
) -> RelinkReport:
    report = RelinkReport()
    window: sa.ColumnElement[bool] = api_requests.c.current_message_hash.is_not(None)
    if since is not None:
        window = sa.and_(window, api_requests.c.timestamp >= since)
    async with engine.begin() as connection:
        total = (await connection.execute(sa.select(sa.func.count()).where(window))).scalar_one()
        # Ordinals of sub-agent calls are renumbered as their requests are relinked.
        stale = sa.select(api_requests.c.request_id).where(window)
        await connection.execute(sa.delete(task_invocations).where(task_invocations.c.request_id.in_(stale)))
    cursor: tuple[datetime, uuid.UUID] | None = None
    while True:
        query = sa.select(api_requests).where(window)
        if cursor is not None:
            query = query.where(sa.tuple_(api_requests.c.timestamp, api_requests.c.request_id) > sa.tuple_(*cursor))
        query = query.order_by(api_requests.c.timestamp, api_requests.c.request_id).limit(batch_size)
        async with engine.begin() as connection:
            rows = (await connection.execute(query)).mappings().all()
            if not rows:
                break
            for row in rows:
                report.examined += 1
                if await _relink_one(connection, dict(row)):
                    report.relinked += 1
                else:
                    report.skipped += 1
        cursor = (rows[-1]["timestamp"], rows[-1]["request_id"])
        if progress is not None:
            progress(report.examined, total)
    return report


async def _relink_one(connection: AsyncConnection, row: dict[str, Any]) -> bool:
    payload = await load_payload(connection, row["request_id"])
    if payload is None or payload.request_body is None:
        return False
    try:
        body = orjson.loads(payload.request_body)
    except orjson.JSONDecodeError:
        return False
    message = payload.response_body if isinstance(payload.response_body, dict) else None
    facts = facts_of(body, message)
    if facts is None:
        return False
    columns = await link_row(connection, row, facts, live=False)
    columns.update(
        current_message_hash=facts.current_hash,
        system_hash=facts.system_hash,
        message_count=facts.message_count,
        compact_summary=compact_summary_of(facts, message),
        tool_result_names=tool_result_names(body) or None,
    )
    await connection.execute(
        sa.update(api_requests)
        .where(api_requests.c.request_id == row["request_id"], api_requests.c.timestamp == row["timestamp"])
        .values(**columns)
    )
    if facts.task_calls and columns.get("conversation_id") is not None:
        await record_task_calls(connection, {**row, **columns}, facts)
    return True
