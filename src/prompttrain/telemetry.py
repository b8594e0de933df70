"""Per-request telemetry to `TELEMETRY_ENDPOINT`: one small JSON event per request, posted in batches.

As the seed architecture does, but never in the way of a request: the sender is a writer observer (it sees each
exchange after the writer built its row, off the request path), events wait in a bounded queue, a background task
posts them as `{"events": [...]}` with a timeout, and an endpoint that is down or hangs only costs dropped events,
counted in `prompttrain_telemetry_events_total{result="dropped"|"failed"}`. Events carry no bodies, keys or
headers: request id, time, train, account, model, tokens, duration, status, outcome and error type.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp
import orjson

from prompttrain import metrics
from prompttrain.storage.records import BuiltRows, ExchangeRecord

log = logging.getLogger(__name__)

EVENT_FIELDS = {
    "request_id": "requestId",
    "train_id": "train",
    "account_id": "account",
    "model": "model",
    "input_tokens": "inputTokens",
    "output_tokens": "outputTokens",
    "cache_read_input_tokens": "cacheReadInputTokens",
    "cache_creation_input_tokens": "cacheCreationInputTokens",
    "duration_ms": "durationMs",
    "status_code": "status",
    "outcome": "outcome",
    "error_type": "errorType",
    "stream": "stream",
}


def event_of(row: dict[str, Any]) -> dict[str, Any]:
    event = {name: row.get(column) for column, name in EVENT_FIELDS.items()}
    event["requestId"] = str(row["request_id"])
    event["timestamp"] = row["timestamp"].isoformat()
    return event


class TelemetrySender:
    def __init__(
        self,
        endpoint: str,
        *,
        batch_size: int = 100,
        flush_seconds: float = 1.0,
        queue_size: int = 10_000,
        timeout_seconds: float = 5.0,
    ) -> None:
        self.endpoint = endpoint
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def __call__(self, record: ExchangeRecord, built: BuiltRows) -> None:
        """The writer observer: enqueue, never wait."""
        try:
            self._queue.put_nowait(event_of(built.metadata))
        except asyncio.QueueFull:
            metrics.TELEMETRY_EVENTS.labels("dropped").inc()

    def start(self) -> None:
        if self._task is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
            self._task = asyncio.create_task(self._run(), name="telemetry")

    async def stop(self, timeout: float = 5.0) -> None:
        """Post what is queued within `timeout`, then close."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.flush_seconds
            while len(batch) < self.batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            try:
                await self._post(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _post(self, batch: list[dict[str, Any]]) -> None:
        assert self._session is not None
        try:
            async with self._session.post(
                self.endpoint,
                data=orjson.dumps({"events": batch}),
                headers={"content-type": "application/json"},
            ) as response:
                ok = response.status < 300
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("telemetry endpoint unavailable (%s): %d events dropped", type(error).__name__, len(batch))
            ok = False
        metrics.TELEMETRY_EVENTS.labels("sent" if ok else "failed").inc(len(batch))
