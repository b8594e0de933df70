"""The background writer: the request path hands over records, one task batches them into INSERTs.

`submit` never blocks and never raises, so recording can neither slow nor fail a client's response. Inserts are
idempotent (ON CONFLICT (request_id) DO NOTHING), so a batch retried after an ambiguous failure, or written by two
replicas, is stored once. While the database is unreachable the writer keeps the batch and retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from prompttrain.storage.records import ExchangeRecord, build_row
from prompttrain.storage.tables import api_requests

log = logging.getLogger(__name__)


class RequestWriter:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch_size: int = 200,
        flush_seconds: float = 0.05,
        queue_size: int = 10_000,
    ) -> None:
        self.engine = engine
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.queue: asyncio.Queue[ExchangeRecord] = asyncio.Queue(maxsize=queue_size)
        self.dropped = 0
        self.written = 0
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(self, record: ExchangeRecord) -> None:
        try:
            self.queue.put_nowait(record)
            self._idle.clear()
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("writer queue full (%d records): dropped request %s", self.queue.maxsize, record.request_id)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="request-writer")

    async def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is written; False if the timeout passed first."""
        deadline = time.monotonic() + timeout
        while not (self.queue.empty() and self._idle.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=min(remaining, 0.05))
        return True

    async def stop(self, timeout: float = 30.0) -> None:
        flushed = await self.flush(timeout)
        if not flushed:
            log.error("writer stopped with %d records still queued", self.queue.qsize())
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            self._idle.clear()
            deadline = time.monotonic() + self.flush_seconds
            while len(batch) < self.batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout=remaining))
                except TimeoutError:
                    break
            await self._write_with_retry(batch)
            if self.queue.empty():
                self._idle.set()

    async def _write_with_retry(self, batch: Sequence[ExchangeRecord]) -> None:
        rows = await asyncio.to_thread(_rows_of, batch)
        delay = 0.2
        while True:
            try:
                await self.insert_rows(rows)
                self.written += len(rows)
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - classified below; the rows are never silently lost
                if not is_transient(error):
                    log.error("the database refused a batch (%s); writing its rows one by one", describe(error))
                    await self._write_one_by_one(rows)
                    return
                log.warning(
                    "could not write %d request records (%s); retrying in %.1fs", len(rows), describe(error), delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _write_one_by_one(self, rows: list[dict[str, Any]]) -> None:
        """Isolate the row the database refuses; store it without its payloads rather than not at all."""
        for row in rows:
            for attempt in (row, _without_payloads(row)):
                try:
                    await self.insert_rows([attempt])
                    self.written += 1
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # noqa: BLE001 - reported; the next variant is tried
                    log.error("the database refused request %s (%s)", row["request_id"], describe(error))
            else:
                self.dropped += 1

    async def insert_rows(self, rows: list[dict[str, Any]]) -> None:
        dialect = self.engine.dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = insert(api_requests).on_conflict_do_nothing(index_elements=["request_id"])
        async with self.engine.begin() as connection:
            await connection.execute(statement, rows)


def is_transient(error: BaseException) -> bool:
    """Whether to retry later: anything but a row the database will never accept (bad data, a constraint)."""
    if isinstance(error, sa_exc.DataError | sa_exc.IntegrityError):
        return False
    # A StatementError that is not a DBAPIError failed in Python, converting a value: retrying cannot help.
    return not (isinstance(error, sa_exc.StatementError) and not isinstance(error, sa_exc.DBAPIError))


def describe(error: BaseException) -> str:
    """The error's class and first line, short: enough to act on, too short to carry a payload."""
    original = getattr(error, "orig", None) or error
    first_line = str(original).strip().splitlines()[0] if str(original).strip() else ""
    return f"{type(original).__name__}: {first_line[:200]}"


PAYLOAD_COLUMNS = ("request_body", "response_body", "request_headers", "response_headers", "usage")


def _without_payloads(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, **dict.fromkeys(PAYLOAD_COLUMNS)}


def _rows_of(batch: Sequence[ExchangeRecord]) -> list[dict[str, Any]]:
    rows = []
    for record in batch:
        try:
            rows.append(build_row(record))
        except Exception:  # a bug in parsing must not lose the usage record
            log.exception("could not parse request %s; storing it without its response", record.request_id)
            record.chunks = []
            rows.append(build_row(record))
    return rows
