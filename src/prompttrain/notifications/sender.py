"""Delivers Slack notifications in the background: a bounded queue, a rate limit per webhook, a timeout per post.

`offer` is all a caller does: it never waits, never raises and never touches the network. A notification that
would exceed its webhook's rate (SLACK_MAX_PER_MINUTE, a token bucket with a small burst) or find the queue full
(SLACK_QUEUE_SIZE) is dropped and counted in `prompttrain_slack_messages_total`. A few workers post with a
timeout (SLACK_TIMEOUT_SECONDS), so a Slack that hangs holds at most those workers, never a request or the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from prompttrain import metrics
from prompttrain.settings import Settings

log = logging.getLogger(__name__)

WORKERS = 2
MAX_BURST = 5.0


@dataclass(frozen=True)
class Notice:
    kind: str  # "turn" or "error": the `kind` label
    url: str
    body: dict[str, Any]


class TokenBucket:
    def __init__(self, per_minute: float, burst: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = burst
        self.tokens = burst
        self.updated = time.monotonic()

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SlackSender:
    def __init__(
        self,
        *,
        timeout_seconds: float = 5.0,
        queue_size: int = 200,
        max_per_minute: float = 30.0,
        workers: int = WORKERS,
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self.max_per_minute = max_per_minute
        self.workers = workers
        self._queue: asyncio.Queue[Notice] = asyncio.Queue(maxsize=queue_size)
        self._buckets: dict[str, TokenBucket] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SlackSender:
        return cls(
            timeout_seconds=settings.slack_timeout_seconds,
            queue_size=settings.slack_queue_size,
            max_per_minute=settings.slack_max_per_minute,
        )

    def start(self) -> None:
        if self._tasks:
            return
        # Its own client: the upstream client's timeouts suit minutes-long streams, not a webhook. trust_env so
        # that HTTPS_PROXY applies: Slack is outside the cluster.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_seconds), trust_env=True)
        self._tasks = [asyncio.create_task(self._work(), name=f"slack-sender-{n}") for n in range(self.workers)]

    def offer(self, notice: Notice) -> None:
        """Queue a notification, or drop it (counted) when its webhook is over its rate or the queue is full."""
        bucket = self._buckets.get(notice.url)
        if bucket is None:
            bucket = self._buckets[notice.url] = TokenBucket(
                self.max_per_minute, min(MAX_BURST, max(1.0, self.max_per_minute))
            )
        if not bucket.take(time.monotonic()):
            metrics.SLACK_MESSAGES.labels(notice.kind, "rate_limited").inc()
            return
        try:
            self._queue.put_nowait(notice)
        except asyncio.QueueFull:
            metrics.SLACK_MESSAGES.labels(notice.kind, "dropped").inc()
            return
        metrics.SLACK_QUEUE_DEPTH.set(self._queue.qsize())

    async def _work(self) -> None:
        while True:
            notice = await self._queue.get()
            metrics.SLACK_QUEUE_DEPTH.set(self._queue.qsize())
            try:
                result = await self._post(notice)
            finally:
                self._queue.task_done()
            metrics.SLACK_MESSAGES.labels(notice.kind, result).inc()

    async def _post(self, notice: Notice) -> str:
        assert self._session is not None
        try:
            async with self._session.post(
                notice.url, data=orjson.dumps(notice.body), headers={"content-type": "application/json"}
            ) as response:
                await response.read()
                if response.status == 200:
                    return "sent"
                log.warning("Slack answered %d to a %s notification", response.status, notice.kind)
        except (aiohttp.ClientError, TimeoutError) as error:
            # The webhook URL is a secret (it is the credential): log the error class only.
            log.warning("Slack notification failed (%s)", type(error).__name__)
        return "failed"

    async def stop(self, timeout: float) -> None:
        """Deliver what is queued within `timeout`, then drop the rest (counted) and close."""
        if not self._tasks:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        while not self._queue.empty():
            notice = self._queue.get_nowait()
            metrics.SLACK_MESSAGES.labels(notice.kind, "dropped").inc()
        metrics.SLACK_QUEUE_DEPTH.set(0)
        if self._session is not None:
            await self._session.close()
            self._session = None
