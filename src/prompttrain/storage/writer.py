"""The background writer: two lanes to the database, neither able to slow a request.

It runs in the proxy's recording process (`recorder_process.py`; the proxy's side is `recorder.py`). `submit`
appends an exchange to an in-memory intake and returns; it never blocks, never raises and never touches the disk or
the database. Three tasks do the rest:

- the converter parses intakes into a metadata row (`api_requests`) and a payload row (`request_payloads` + content
  blobs), on the event loop one record at a time (in the recording process) or in a worker thread;
- the metadata lane never drops a row: it batches inserts, and when the database is unavailable (or the lane backs
  up) it appends rows to the fsync'd local spool and replays them in order once the database answers again;
- the payload lane may shed bodies under pressure (memory budget exceeded while the database is slow or down):
  each shed is counted and marked on its metadata row (`payload_shed`).

Every write is idempotent (ON CONFLICT DO NOTHING on the request id and timestamp), so a retried batch, a replayed
spool or two replicas never store a row twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Container, Sequence
from datetime import UTC, date, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from prompttrain import metrics
from prompttrain.storage.linking_store import insert_linked
from prompttrain.storage.partitions import ensure_partitions
from prompttrain.storage.recent_bodies import RecentBodies
from prompttrain.storage.records import BuiltRows, ExchangeRecord, PayloadRow, build_rows
from prompttrain.storage.spool import Spool
from prompttrain.storage.tables import api_requests, content_blobs, request_payloads

log = logging.getLogger(__name__)

# An observer sees every exchange after conversion, in the writer's task (never on the request path).
Observer = Callable[[ExchangeRecord, BuiltRows], None]
# Told the ids of exchanges the writer is done with: metadata stored (database or spool), payload stored or shed.
DoneCallback = Callable[[list[uuid.UUID]], None]

REPLAY_BATCH = 500
CONVERT_SLICE = 1  # records converted on the event loop between two chances for other tasks (socket, lanes) to run
PAYLOAD_BATCH_BYTES = 8 * 1024 * 1024
KNOWN_BLOBS = 100_000
MAX_BACKOFF_SECONDS = 5.0
PARTITION_CHECK_SECONDS = 3600.0
# Every committed batch of request rows is announced on this channel (delivered at commit), so dashboards on any
# replica can update live. The payload stays under PostgreSQL's 8000-byte limit.
NOTIFY_CHANNEL = "prompttrain_requests"
NOTIFY_MAX_BYTES = 7900


class RequestWriter:
    def __init__(
        self,
        engine: AsyncEngine,
        spool: Spool,
        *,
        batch_size: int = 200,
        flush_seconds: float = 0.05,
        metadata_queue_size: int = 10_000,
        payload_memory_bytes: int = 256 * 1024 * 1024,
        store_payloads: bool = True,
        observers: Sequence[Observer] = (),
        on_done: DoneCallback | None = None,
        convert_in_thread: bool = True,
    ) -> None:
        self.engine = engine
        self.spool = spool
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.metadata_queue_size = metadata_queue_size
        self.payload_memory_bytes = payload_memory_bytes
        self.store_payloads = store_payloads
        # Called with every exchange once its rows are built (metrics, notifications); never on the request path.
        self.observers = list(observers)
        self.on_done = on_done
        # In a process of its own (a recording process) the writer converts on its event loop, one record at a time:
        # a worker thread would only contend with the loop for the GIL. Next to a request path it uses a thread.
        self.convert_in_thread = convert_in_thread
        # Exchanges converted but not yet done, per lane (only tracked when someone listens: `on_done`).
        self._metadata_open: set[uuid.UUID] = set()
        self._payload_open: set[uuid.UUID] = set()
        self._intake: deque[ExchangeRecord] = deque()
        self._metadata: deque[dict[str, Any]] = deque()  # spool entries: {"op": "insert", "row"} or shed marks
        self._payloads: deque[PayloadRow] = deque()
        self._payload_bytes = 0  # intake bodies + payload lane
        self._intake_ready = asyncio.Event()
        self._metadata_ready = asyncio.Event()
        self._payloads_ready = asyncio.Event()
        self._spooling = not spool.is_empty()
        # Digests of blobs this process stored (or refreshed) today: their content need not be sent again, and
        # their `last_seen` is current. Cleared when the UTC day changes, so every blob is touched once a day.
        self._known_blobs: OrderedDict[bytes, None] = OrderedDict()
        self._known_day: date | None = None
        # The last bodies of each session, so that a resent conversation is parsed and hashed only where it changed.
        self._bodies = RecentBodies()
        self._tasks: list[asyncio.Task[None]] = []
        self._busy = 0  # records the converter and lanes hold outside the deques right now
        self._database_down = False
        if self._spooling:
            log.info("the spool holds records from an earlier run: replaying them")
            self._metadata_ready.set()

    # -- the request path ---------------------------------------------------------------------------------------

    def submit(self, record: ExchangeRecord) -> None:
        size = record.size
        if self._payload_bytes + size > self.payload_memory_bytes:
            self._shed(record)
        else:
            record.accounted_bytes = size
            self._payload_bytes += size
        self._intake.append(record)
        self._intake_ready.set()

    def _shed(self, record: ExchangeRecord) -> None:
        # Keep the response chunks (small, they carry the usage); drop the request body, the bulk.
        record.payload_shed = True
        record.request_body = None
        metrics.PAYLOADS_SHED.inc()

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._convert_forever(), name="writer-convert"),
                asyncio.create_task(self._metadata_forever(), name="writer-metadata"),
                asyncio.create_task(self._payloads_forever(), name="writer-payloads"),
                asyncio.create_task(self._partitions_forever(), name="writer-partitions"),
            ]

    def replay_spool(self) -> None:
        """Segments were added to the spool (adopted from an earlier recorder): replay them."""
        self._spooling = True
        self._metadata_ready.set()

    @property
    def pending(self) -> int:
        return len(self._intake) + len(self._metadata) + len(self._payloads) + self._busy

    def _settled(self) -> bool:
        if self._intake or self._busy:
            return False
        if self._database_down:
            return not self._metadata  # metadata is safe in the spool; payloads cannot be written anyway
        return not (self._metadata or self._payloads or self._spooling)

    async def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted is in the database — or, while it is down, in the spool.

        Returns False if the timeout passed first.
        """
        deadline = time.monotonic() + timeout
        while not self._settled():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return not (self._payloads or self._metadata or self._intake)

    async def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued within `timeout`; then spool leftover metadata and shed leftover payloads."""
        for _ in range(3):  # let cancelled responses hand over their records first
            await asyncio.sleep(0)
        flushed = await self.flush(timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if flushed:
            return
        leftovers = []
        done = [record.request_id for record in self._intake]
        for record in self._intake:
            record.payload_shed = True
            metrics.PAYLOADS_SHED.inc()
            leftovers.append(_spool_entry(build_rows(record, keep_payload=False).metadata))
        leftovers.extend(self._metadata)
        for payload in self._payloads:
            metrics.PAYLOADS_SHED.inc()
            leftovers.append(_shed_mark(payload.row))
        done.extend(self._metadata_open | self._payload_open)
        self._intake.clear()
        self._metadata.clear()
        self._payloads.clear()
        if leftovers:
            lost = await asyncio.to_thread(self.spool.append, leftovers)
            metrics.RECORDS_SPOOLED.inc(len(leftovers) - lost)
            metrics.RECORDS_LOST.inc(lost)
            log.warning("shutdown: %d records spooled for the next start", len(leftovers) - lost)
        self._metadata_open.clear()
        self._payload_open.clear()
        if self.on_done is not None and done:
            self.on_done(done)

    # -- converter ----------------------------------------------------------------------------------------------

    async def _convert_forever(self) -> None:
        while True:
            await self._intake_ready.wait()
            self._intake_ready.clear()
            while self._intake:
                batch = self._take_batch(self.batch_size)
                self._busy += 1
                try:
                    converted = await self._convert_batch(batch)
                    self._accept(batch, converted)
                finally:
                    self._busy -= 1

    def _take_batch(self, size: int) -> list[ExchangeRecord]:
        return [self._intake.popleft() for _ in range(min(len(self._intake), size))]

    def _accept(self, batch: list[ExchangeRecord], converted: list[BuiltRows]) -> None:
        for record, built in zip(batch, converted, strict=True):
            row, payload = built.metadata, built.payload
            self._payload_bytes -= record.accounted_bytes
            if payload is not None:
                if self._payload_bytes + payload.size > self.payload_memory_bytes:
                    row["payload_shed"] = True
                    metrics.PAYLOADS_SHED.inc()
                else:
                    self._payload_bytes += payload.size
                    self._payloads.append(payload)
                    if self.on_done is not None:
                        self._payload_open.add(record.request_id)
            if self.on_done is not None:
                self._metadata_open.add(record.request_id)
            self._metadata.append(_spool_entry(row))
            self._observe(record, built)
        self._metadata_ready.set()
        self._payloads_ready.set()
        self._report_depth()

    async def _convert_batch(self, batch: list[ExchangeRecord]) -> list[BuiltRows]:
        if self.convert_in_thread:
            return await asyncio.to_thread(_convert, batch, self.store_payloads, self._known_blobs, self._bodies)
        converted: list[BuiltRows] = []
        for start in range(0, len(batch), CONVERT_SLICE):
            converted.extend(
                _convert(batch[start : start + CONVERT_SLICE], self.store_payloads, self._known_blobs, self._bodies)
            )
            await asyncio.sleep(0)  # let the lanes and the socket move between slices
        return converted

    def _observe(self, record: ExchangeRecord, built: BuiltRows) -> None:
        for observer in self.observers:
            try:
                observer(record, built)
            except Exception:  # an observer's bug must not stop recording
                log.exception("request observer %r failed", observer)

    # -- metadata lane ------------------------------------------------------------------------------------------

    async def _metadata_forever(self) -> None:
        delay = 0.2
        while True:
            if not self._metadata and not self._spooling:
                await self._metadata_ready.wait()
                self._metadata_ready.clear()
                await asyncio.sleep(self.flush_seconds)  # gather a batch
                continue
            if len(self._metadata) > self.metadata_queue_size and not self._spooling:
                log.warning("the database is not keeping up: spooling %d records", len(self._metadata))
                self._spooling = True
            if self._spooling:
                await self._spool_queued()
                if await self._replay_once():
                    delay = 0.2
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF_SECONDS)
                continue
            batch = [self._metadata.popleft() for _ in range(min(len(self._metadata), self.batch_size))]
            self._busy += len(batch)
            try:
                await self._apply_entries(batch)
                self._database_down = False
                self._metadata_done(batch)
            except Exception as error:  # noqa: BLE001 - classified: transient -> spool, refused -> isolate
                if is_transient(error):
                    log.warning("database unavailable (%s): spooling records", describe(error))
                    self._metadata.extendleft(reversed(batch))
                    self._spooling = self._database_down = True
                else:
                    log.error("the database refused a batch (%s); writing its rows one by one", describe(error))
                    await self._apply_one_by_one(batch)
                    self._metadata_done(batch)
            finally:
                self._busy -= len(batch)
                self._report_depth()

    async def _spool_queued(self) -> None:
        if not self._metadata:
            return
        entries = list(self._metadata)
        self._metadata.clear()
        self._busy += len(entries)
        try:
            lost = await asyncio.to_thread(self.spool.append, entries)
        finally:
            self._busy -= len(entries)
        metrics.RECORDS_SPOOLED.inc(len(entries) - lost)
        metrics.RECORDS_LOST.inc(lost)
        self._metadata_done(entries)
        self._report_depth()

    async def _replay_once(self) -> bool:
        """Write the oldest spool segment; True if the spool moved forward (or is now empty)."""
        oldest = await asyncio.to_thread(self.spool.oldest)
        if oldest is None:
            self._spooling = False
            log.info("spool replayed; writing directly again")
            return True
        path, entries = oldest
        try:
            for start in range(0, len(entries), REPLAY_BATCH):
                await self._apply_entries(entries[start : start + REPLAY_BATCH])
        except Exception as error:  # noqa: BLE001 - transient: the database is still unavailable
            if is_transient(error):
                self._database_down = True
                return False
            log.error("the database refused spooled records (%s); writing them one by one", describe(error))
            await self._apply_one_by_one(entries)
        self._database_down = False
        await asyncio.to_thread(self.spool.remove, path)
        replayed = sum(1 for entry in entries if entry.get("op") == "insert")
        metrics.RECORDS_REPLAYED.inc(replayed)
        log.info("replayed %d spooled records", replayed)
        self._report_depth()
        return True

    async def _apply_entries(self, entries: Sequence[dict[str, Any]]) -> None:
        """Inserts first, then shed marks (a mark always follows its row's insert), in one transaction."""
        rows = [_decode_row(entry["row"]) for entry in entries if entry.get("op") == "insert"]
        marks = [entry for entry in entries if entry.get("op") == "shed"]
        async with self.engine.begin() as connection:
            if rows:
                inserted = await insert_linked(connection, rows)
                if connection.dialect.name == "postgresql":
                    await connection.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, _notification(inserted))))
            for mark in marks:
                await connection.execute(
                    sa.update(api_requests)
                    .where(api_requests.c.request_id == uuid.UUID(str(mark["request_id"])))
                    .where(api_requests.c.timestamp == datetime.fromisoformat(str(mark["timestamp"])))
                    .values(payload_shed=True)
                )
        metrics.RECORDS_WRITTEN.labels("metadata").inc(len(rows))

    async def _apply_one_by_one(self, entries: Sequence[dict[str, Any]]) -> None:
        """Isolate what the database refuses; store a row without its headers rather than not at all."""
        for entry in entries:
            attempts = [entry]
            if entry.get("op") == "insert":
                stripped = {**entry["row"], "request_headers": None, "response_headers": None, "usage": None}
                attempts.append({"op": "insert", "row": stripped})
            for attempt in attempts:
                try:
                    await self._apply_entries([attempt])
                    break
                except Exception as error:  # noqa: BLE001 - reported; the next variant is tried
                    log.error("the database refused a record (%s)", describe(error))
            else:
                metrics.RECORDS_LOST.inc()

    # -- payload lane -------------------------------------------------------------------------------------------

    async def _payloads_forever(self) -> None:
        delay = 0.2
        while True:
            if not self._payloads:
                await self._payloads_ready.wait()
                self._payloads_ready.clear()
                continue
            batch: list[PayloadRow] = []
            size = 0
            while self._payloads and len(batch) < self.batch_size and size < PAYLOAD_BATCH_BYTES:
                payload = self._payloads.popleft()
                batch.append(payload)
                size += payload.size
            self._busy += len(batch)
            retry = False
            try:
                await self._insert_payloads(batch)
                metrics.RECORDS_WRITTEN.labels("payload").inc(len(batch))
                self._payload_bytes -= size
                self._database_down = False
                delay = 0.2
                self._payloads_done(batch)
            except Exception as error:  # noqa: BLE001 - transient: keep and retry; refused: shed and mark
                if is_transient(error):
                    self._payloads.extendleft(reversed(batch))
                    self._database_down = retry = True
                else:
                    log.error("the database refused %d payloads (%s); shedding them", len(batch), describe(error))
                    self._payload_bytes -= size
                    for payload in batch:
                        metrics.PAYLOADS_SHED.inc()
                        self._metadata.append(_shed_mark(payload.row))
                    self._metadata_ready.set()
                    self._payloads_done(batch)
            finally:
                self._busy -= len(batch)
                self._report_depth()
            if retry:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)

    async def _insert_payloads(self, batch: list[PayloadRow]) -> None:
        today = datetime.now(UTC).date()
        if today != self._known_day:
            self._known_blobs.clear()
            self._known_day = today
        blobs: dict[bytes, str] = {}
        for payload in batch:
            for digest, content in payload.blobs.items():
                if digest not in self._known_blobs:
                    blobs[digest] = content
        async with self.engine.begin() as connection:
            if blobs:
                statement = _insert(connection, content_blobs)
                await connection.execute(
                    statement.on_conflict_do_update(
                        index_elements=["digest"],
                        set_={"last_seen": statement.excluded.last_seen},
                        where=content_blobs.c.last_seen < statement.excluded.last_seen,
                    ),
                    [{"digest": digest, "content": content, "last_seen": today} for digest, content in blobs.items()],
                )
            await connection.execute(
                _insert(connection, request_payloads).on_conflict_do_nothing(), [payload.row for payload in batch]
            )
        for digest in blobs:
            self._known_blobs[digest] = None
        while len(self._known_blobs) > KNOWN_BLOBS:
            self._known_blobs.popitem(last=False)

    # -- completion ---------------------------------------------------------------------------------------------

    def _metadata_done(self, entries: Sequence[dict[str, Any]]) -> None:
        if self.on_done is None:
            return
        ids = [entry["row"]["request_id"] for entry in entries if entry.get("op") == "insert"]
        self._finish(self._metadata_open, [i if isinstance(i, uuid.UUID) else uuid.UUID(str(i)) for i in ids])

    def _payloads_done(self, batch: Sequence[PayloadRow]) -> None:
        if self.on_done is not None:
            self._finish(self._payload_open, [payload.row["request_id"] for payload in batch])

    def _finish(self, lane: set[uuid.UUID], ids: list[uuid.UUID]) -> None:
        done = []
        for request_id in ids:
            if request_id in lane:
                lane.discard(request_id)
                if request_id not in self._metadata_open and request_id not in self._payload_open:
                    done.append(request_id)
        if done and self.on_done is not None:
            self.on_done(done)

    # -- housekeeping -------------------------------------------------------------------------------------------

    async def _partitions_forever(self) -> None:
        while True:
            try:
                await ensure_partitions(self.engine)
            except Exception as error:  # noqa: BLE001 - rows still land in the DEFAULT partition
                log.warning("could not create partitions (%s)", describe(error))
            await asyncio.sleep(PARTITION_CHECK_SECONDS)

    def _report_depth(self) -> None:
        metrics.WRITER_QUEUE_DEPTH.labels("intake").set(len(self._intake))
        metrics.WRITER_QUEUE_DEPTH.labels("metadata").set(len(self._metadata))
        metrics.WRITER_QUEUE_DEPTH.labels("payload").set(len(self._payloads))
        metrics.WRITER_QUEUE_BYTES.set(self._payload_bytes)
        metrics.SPOOL_BYTES.set(self.spool.size() if self._spooling else 0)


def _insert(connection: AsyncConnection, table: sa.Table) -> Any:
    insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    statement = insert(table)
    if table is api_requests:
        return statement.on_conflict_do_nothing(index_elements=["request_id", "timestamp"])
    return statement


def _convert(
    batch: Sequence[ExchangeRecord], store_payloads: bool, known_blobs: Container[bytes], bodies: RecentBodies
) -> list[BuiltRows]:
    converted = []
    for record in batch:
        try:
            # Parses the body when it came from the proxy's process without its parsed body.
            split = bodies.read(record, known_blobs)
            converted.append(build_rows(record, keep_payload=store_payloads, known_blobs=known_blobs, split=split))
        except Exception:  # a parsing bug must not lose the usage record
            log.exception("could not parse request %s; storing it without its response", record.request_id)
            record.chunks = []
            converted.append(build_rows(record, keep_payload=False))
    return converted


def _notification(rows: Sequence[dict[str, Any]]) -> str:
    """`{"requests": [{"id", "train", "conversation"}...], "more": n}`: enough for a page to decide to refresh."""
    items: list[dict[str, Any]] = []
    size = 40
    for row in rows:
        item = {
            "id": str(row["request_id"]),
            "train": row.get("train_id"),
            "conversation": str(row["conversation_id"]) if row.get("conversation_id") else None,
        }
        size += len(orjson.dumps(item)) + 1
        if size > NOTIFY_MAX_BYTES:
            break
        items.append(item)
    return orjson.dumps({"requests": items, "more": len(rows) - len(items)}).decode("utf-8")


def _spool_entry(row: dict[str, Any]) -> dict[str, Any]:
    return {"op": "insert", "row": row}


def _shed_mark(payload_row: dict[str, Any]) -> dict[str, Any]:
    return {
        "op": "shed",
        "request_id": str(payload_row["request_id"]),
        "timestamp": payload_row["timestamp"].isoformat(),
    }


_DATETIME_COLUMNS = frozenset(c.name for c in api_requests.columns if isinstance(c.type, sa.DateTime))
_UUID_COLUMNS = frozenset(c.name for c in api_requests.columns if isinstance(c.type, sa.Uuid))


def _decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Rows read back from the spool carry their ids and times as strings (JSON)."""
    decoded = dict(row)
    for key, value in row.items():
        if isinstance(value, str):
            if key in _DATETIME_COLUMNS:
                decoded[key] = datetime.fromisoformat(value)
            elif key in _UUID_COLUMNS:
                decoded[key] = uuid.UUID(value)
    return decoded


def is_transient(error: BaseException) -> bool:
    """Whether to retry later (the database is unreachable or busy) rather than isolate a row it refuses.

    Refused for good: bad data, a violated constraint, a value Python could not convert, or a bug of ours.
    """
    if isinstance(error, OSError | TimeoutError):
        return True
    if isinstance(error, sa_exc.DataError | sa_exc.IntegrityError):
        return False
    return isinstance(error, sa_exc.DBAPIError)


def describe(error: BaseException) -> str:
    """The error's class and first line, short: enough to act on, too short to carry a payload."""
    original = getattr(error, "orig", None) or error
    text = str(original).strip()
    return f"{type(original).__name__}: {text.splitlines()[0][:200] if text else ''}"
