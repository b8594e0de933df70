"""Forward one request to the upstream and stream its answer back unchanged while keeping a copy to record.

The client receives the upstream's status, headers (minus hop-by-hop) and body bytes as they arrive: every chunk
read from the upstream is written to the client before the next is read. The copy (chunks with arrival times)
goes to the recording process, which parses it off the request path. Only connection failures before any
response byte are retried, at most twice (Claude Code retries 429/529 itself; retrying those too would multiply).

The upstream client is the proxy's own (`proxy/upstream.py`): on the proxy benchmark, aiohttp's client cost a third
of the proxy's CPU per request and httpx's more.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from prompttrain.proxy import exchange_metrics
from prompttrain.proxy.errors import ProxyError, UpstreamTimeoutError, UpstreamUnreachableError
from prompttrain.proxy.headers import HOP_BY_HOP, connection_tokens, recorded_response_headers
from prompttrain.proxy.upstream import (
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamConnectTimeoutError,
    UpstreamError,
    UpstreamPool,
    UpstreamReadTimeoutError,
    UpstreamReply,
)
from prompttrain.storage.records import ExchangeRecord, Outcome, RecordSink

log = logging.getLogger(__name__)

MAX_CONNECT_RETRIES = 2
REQUEST_ID_HEADER = b"x-prompttrain-request-id"
OVERHEAD_HEADER = b"x-prompttrain-overhead-ms"


@dataclass
class UpstreamCall:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes
    proxy: str | None = None


def create_upstream_pool(connect_timeout: float, read_timeout: float) -> UpstreamPool:
    # The outbound proxy (HTTPS_PROXY / NO_PROXY) is resolved once, by `outbound_proxy`, not on every request.
    return UpstreamPool(connect_timeout, read_timeout)


def outbound_proxy(url: str) -> str | None:
    """The HTTP(S) proxy the environment asks for on the way to `url`, if any (read once at start-up)."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


async def open_upstream(pool: UpstreamPool, call: UpstreamCall, record: ExchangeRecord) -> UpstreamReply:
    """Send the request and return once the upstream's status and headers arrived (body still unread)."""
    for attempt in range(MAX_CONNECT_RETRIES + 1):
        record.upstream_sent = time.perf_counter()
        try:
            reply = await pool.request(call.method, call.url, call.headers, call.body, call.proxy)
        except UpstreamConnectTimeoutError:
            if attempt < MAX_CONNECT_RETRIES:
                continue
            raise UpstreamTimeoutError("the upstream did not accept the connection in time") from None
        except UpstreamReadTimeoutError:
            raise UpstreamTimeoutError("the upstream did not answer in time") from None
        except UpstreamConnectError as error:
            # Before any response byte: the request never reached a server that answered, so sending it again is safe.
            if attempt < MAX_CONNECT_RETRIES:
                log.info("upstream connection failed (%s); retrying", error)
                continue
            raise UpstreamUnreachableError(f"the upstream is unreachable: {error}") from None
        except UpstreamError as error:
            raise UpstreamUnreachableError(f"the upstream request failed: {error}") from None
        record.upstream_headers = time.perf_counter()
        return reply
    raise AssertionError("unreachable")  # pragma: no cover - the loop always returns or raises


def response_header_list(response: UpstreamReply) -> list[tuple[bytes, bytes]]:
    raw = response.raw_headers
    dropped = HOP_BY_HOP | connection_tokens((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw)
    return [(name.lower(), value) for name, value in raw if name.decode("latin-1").lower() not in dropped]


class DisconnectWatch:
    """Cancels the request's task when the client hangs up, so the upstream request is abandoned at once.

    One watcher task per forwarded request, from the moment its body has been read: it covers the wait for the
    upstream's headers (minutes for a long non-streaming answer) as well as the relay of the body.
    """

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.gone = False
        self.watcher = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                self.task.cancel()
                return

    def claim(self) -> bool:
        """In an `except CancelledError`: True if the cancellation was ours alone (then it is absorbed)."""
        return self.gone and self.task.uncancel() == 0

    def stop(self) -> None:
        self.watcher.cancel()


def mark_client_gone(record: ExchangeRecord) -> None:
    record.outcome = Outcome.CLIENT_DISCONNECTED
    record.error_type = "client_disconnected"
    record.error_message = "the client disconnected before the response ended"


class UpstreamResponse(Response):
    """An ASGI response that relays the upstream body chunk by chunk and records the exchange when it ends."""

    def __init__(
        self,
        upstream: UpstreamReply,
        record: ExchangeRecord,
        writer: RecordSink | None,
        watch: DisconnectWatch,
    ) -> None:
        # Deliberately not Response.__init__: the headers are the upstream's raw list, sent as they are.
        self.status_code = upstream.status
        self.background = None
        self.upstream = upstream
        self.record = record
        self.writer = writer
        self.watch = watch
        self.upstream_headers = response_header_list(upstream)
        record.status_code = upstream.status
        record.response_headers = recorded_response_headers(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in self.upstream_headers
        )
        record.content_type = upstream.header("content-type")
        record.content_encoding = upstream.header("content-encoding")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = self.record
        upstream_wait = (record.upstream_headers or 0.0) - (record.upstream_sent or 0.0)
        record.overhead_ms = round((time.perf_counter() - record.started) * 1000.0 - upstream_wait * 1000.0, 3)
        headers = [
            *self.upstream_headers,
            (REQUEST_ID_HEADER, str(record.request_id).encode()),
            (OVERHEAD_HEADER, f"{record.overhead_ms:.3f}".encode()),
        ]
        try:
            await self._pump(send, headers)
        except asyncio.CancelledError:
            if self.watch.claim():
                mark_client_gone(record)
            else:
                # The server cancels what is still running when the shutdown grace period ends.
                record.outcome = Outcome.INTERRUPTED
                record.error_type = "grace_period_exceeded"
                record.error_message = "the proxy shut down before the response ended (shutdown grace period exceeded)"
                raise
        finally:
            self.watch.stop()
            self.upstream.close()
            record.finished = time.perf_counter()
            exchange_metrics.request_finished(record)
            if self.writer is not None:
                self.writer.submit(record)

    async def _pump(self, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        record = self.record
        await send({"type": "http.response.start", "status": self.upstream.status, "headers": headers})
        chunks = record.chunks
        try:
            async for chunk in self.upstream.chunks():
                chunks.append((time.perf_counter(), chunk))
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamReadTimeoutError:
            record.outcome, record.error_type = Outcome.TIMEOUT, "timeout_error"
            record.error_message = "the upstream went silent for longer than the read timeout"
        except UpstreamBrokenError as error:
            record.outcome, record.error_type = Outcome.STREAM_ERROR, "upstream_connection_lost"
            record.error_message = str(error)  # e.g. "the upstream closed the connection mid-response"
        if record.error_type is not None:
            # Relay the break as a break: ending the body cleanly would tell the client the answer was whole.
            # Returning without the final body message makes the server close the connection mid-body.
            log.warning("request %s: %s", record.request_id, record.error_message)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class ClientGoneResponse(Response):
    """The client hung up before the upstream answered: nothing to send, only the record to hand over."""

    def __init__(self, record: ExchangeRecord, writer: RecordSink | None) -> None:
        self.status_code = 499
        self.background = None
        self.record = record
        self.writer = writer
        mark_client_gone(record)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.record.finished = time.perf_counter()
        exchange_metrics.request_finished(self.record)
        if self.writer is not None:
            self.writer.submit(self.record)


class ErrorResponse(Response):
    """An error the proxy answers itself, in Anthropic's error shape, recorded like any other exchange."""

    def __init__(
        self, error: ProxyError, record: ExchangeRecord, writer: RecordSink | None, train_label: str | None = None
    ) -> None:
        self.status_code = error.status
        self.background = None
        self.error = error
        self.record = record
        self.writer = writer
        # The metric label for the train: the record keeps whatever train-id the client sent, which may name no
        # configured train; the label must not (a client could otherwise mint series at will).
        self.train_label = train_label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record, error = self.record, self.error
        body = error.body(str(record.request_id))
        record.status_code = error.status
        record.error_type = error.error_type
        record.error_message = error.message
        record.response_override = {
            "type": "error",
            "error": {"type": error.error_type, "message": error.message},
        }
        if record.outcome == Outcome.COMPLETED:
            record.outcome = Outcome.REJECTED
        record.overhead_ms = round((time.perf_counter() - record.started) * 1000.0, 3)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (REQUEST_ID_HEADER, str(record.request_id).encode()),
            (OVERHEAD_HEADER, f"{record.overhead_ms:.3f}".encode()),
            *((name.encode("latin-1"), value.encode("latin-1")) for name, value in error.headers.items()),
        ]
        try:
            await send({"type": "http.response.start", "status": error.status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            record.finished = time.perf_counter()
            exchange_metrics.request_finished(record, self.train_label)
            if self.writer is not None:
                self.writer.submit(record)
