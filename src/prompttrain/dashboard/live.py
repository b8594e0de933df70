"""Live updates: one feed per dashboard process, fanned out to every open page's SSE stream.

- PostgreSQL: one dedicated LISTEN connection on `prompttrain_requests` (the writer NOTIFYs after each committed
  batch, so a request recorded by any proxy replica reaches every dashboard replica). When the connection drops it
  is re-opened with backoff, and subscribers get a `resync` event, since notifications sent meanwhile are lost.
- SQLite (embedded, single machine): polling by rowid every DASHBOARD_POLL_SECONDS.

A subscriber that does not keep up (its queue is full) gets a single `resync` instead of the events it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from prompttrain.storage.tables import api_requests
from prompttrain.storage.writer import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
POLL_BATCH = 500
MAX_BACKOFF_SECONDS = 5.0
LISTEN_CHECK_SECONDS = 10.0


@dataclass(frozen=True)
class LiveEvent:
    name: str  # requests | resync
    data: dict[str, Any]

    def encode(self) -> bytes:
        return b"event: " + self.name.encode() + b"\ndata: " + orjson.dumps(self.data) + b"\n\n"


RESYNC = LiveEvent("resync", {})


class Subscription:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[LiveEvent] = asyncio.Queue(QUEUE_SIZE)
        self.overflowed = False

    def offer(self, event: LiveEvent) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True

    async def next(self, timeout: float) -> LiveEvent | None:
        """The next event, RESYNC after an overflow, None when `timeout` passed first."""
        if self.overflowed and self.queue.empty():
            self.overflowed = False
            return RESYNC
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None


class LiveHub:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self.state = "starting"  # listening | polling | reconnecting

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @contextlib.contextmanager
    def subscribe(self) -> Any:
        subscription = Subscription()
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)

    def publish(self, event: LiveEvent) -> None:
        for subscription in list(self._subscribers):
            subscription.offer(event)


def notification_event(payload: str) -> LiveEvent:
    """The writer's payload `{"requests": [{"id", "train", "conversation"}...], "more": n}`, checked."""
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return RESYNC
    if not isinstance(document, dict) or not isinstance(document.get("requests"), list):
        return RESYNC
    items = [
        {"id": str(item.get("id")), "train": item.get("train"), "conversation": item.get("conversation")}
        for item in document["requests"]
        if isinstance(item, dict) and item.get("id")
    ]
    more = document.get("more")
    return LiveEvent("requests", {"requests": items, "more": more if isinstance(more, int) else 0})


def asyncpg_dsn(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresListener:
    """Holds one LISTEN connection (outside the query pool) and re-opens it when it drops."""

    def __init__(self, database_url: str, hub: LiveHub) -> None:
        self.dsn = asyncpg_dsn(database_url)
        self.hub = hub

    async def run(self) -> None:
        delay = 0.2
        first = True
        while True:
            lost = asyncio.Event()
            try:
                connection = await asyncpg.connect(
                    self.dsn, timeout=10, server_settings={"application_name": "prompttrain-dashboard-listen"}
                )
            except Exception as error:  # noqa: BLE001 - unreachable, refused, timed out: retry with backoff
                self.hub.state = "reconnecting"
                log.warning("live updates: cannot LISTEN (%s: %s); retrying", type(error).__name__, error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
                continue
            try:
                connection.add_termination_listener(lambda _connection, lost=lost: lost.set())
                await connection.add_listener(NOTIFY_CHANNEL, self._notified)
                self.hub.state = "listening"
                delay = 0.2
                if not first:
                    log.info("live updates: LISTEN connection restored")
                    self.hub.publish(RESYNC)  # notifications sent while it was down are gone
                first = False
                await self._watch(connection, lost)
            except Exception as error:  # noqa: BLE001 - whatever broke the connection, open a new one
                log.warning("live updates: LISTEN connection lost (%s)", type(error).__name__)
            finally:
                self.hub.state = "reconnecting"
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), 2)

    async def _watch(self, connection: Any, lost: asyncio.Event) -> None:
        """Return when the connection ends; a periodic query notices a silently dead peer."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), LISTEN_CHECK_SECONDS)
                return
            await asyncio.wait_for(connection.fetchval("SELECT 1"), 5)

    def _notified(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        self.hub.publish(notification_event(payload))


class SqlitePoller:
    """SQLite has no NOTIFY: poll for rows with a higher rowid than the last one seen."""

    def __init__(self, engine: AsyncEngine, hub: LiveHub, interval: float) -> None:
        self.engine = engine
        self.hub = hub
        self.interval = interval

    async def run(self) -> None:
        rowid: sa.ColumnClause[int] = sa.literal_column("rowid", sa.Integer)
        table = api_requests.c
        last: int | None = None
        self.hub.state = "polling"
        while True:
            try:
                async with self.engine.connect() as connection:
                    if last is None:
                        last = int(
                            (
                                await connection.execute(
                                    sa.select(sa.func.coalesce(sa.func.max(rowid), 0)).select_from(api_requests)
                                )
                            ).scalar_one()
                        )
                    rows = (
                        await connection.execute(
                            sa.select(rowid, table.request_id, table.train_id, table.conversation_id)
                            .where(rowid > last)
                            .order_by(rowid)
                            .limit(POLL_BATCH + 1)
                        )
                    ).all()
            except Exception as error:  # noqa: BLE001 - the database may be busy or not migrated yet: try again
                log.debug("live updates: poll failed (%s)", error)
                rows = []
            if rows:
                more = len(rows) > POLL_BATCH
                rows = rows[:POLL_BATCH]
                last = int(rows[-1][0])
                items = [
                    {"id": str(identifier), "train": train, "conversation": str(conversation) if conversation else None}
                    for _, identifier, train, conversation in rows
                ]
                self.hub.publish(LiveEvent("requests", {"requests": items, "more": 1 if more else 0}))
            await asyncio.sleep(self.interval)


async def run_feed(engine: AsyncEngine, database_url: str, hub: LiveHub, poll_seconds: float) -> None:
    if engine.dialect.name == "postgresql":
        await PostgresListener(database_url, hub).run()
    else:
        await SqlitePoller(engine, hub, poll_seconds).run()


async def event_stream(
    hub: LiveHub, heartbeat_seconds: float, stopping: Any, tick: float = 1.0
) -> AsyncIterator[bytes]:
    """SSE bytes for one client: `ready`, then events; a `heartbeat` event every `heartbeat_seconds` keeps proxies from
    cutting an idle stream. Ends when `stopping()` turns true (the server drains), so the browser reconnects to
    another replica instead of holding shutdown up."""
    with hub.subscribe() as subscription:
        yield b"retry: 2000\nevent: ready\ndata: {}\n\n"
        idle = 0.0
        while not stopping():
            event = await subscription.next(min(tick, heartbeat_seconds))
            if event is not None:
                idle = 0.0
                yield event.encode()
                continue
            idle += min(tick, heartbeat_seconds)
            if idle >= heartbeat_seconds:
                idle = 0.0
                yield b"event: heartbeat\ndata: {}\n\n"
