"""Forward one request to the upstream and stream its answer back unchanged while keeping a copy to record.

The client receives the upstream's status, headers (minus hop-by-hop) and body bytes as they arrive: every chunk
read from the upstream is written to the client before the next is read. The copy (chunks with arrival times)
goes to the background writer, which parses it off the request path. Only connection failures before any
response byte are retried, at most twice (Claude Code retries 429/529 itself; retrying those too would multiply).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import httpx
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from prompttrain.proxy.errors import ProxyError, UpstreamTimeoutError, UpstreamUnreachableError
from prompttrain.proxy.headers import HOP_BY_HOP, connection_tokens, recorded_response_headers
from prompttrain.storage.records import ExchangeRecord, Outcome
from prompttrain.storage.writer import RequestWriter

log = logging.getLogger(__name__)

MAX_CONNECT_RETRIES = 2
RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)
REQUEST_ID_HEADER = b"x-prompttrain-request-id"
OVERHEAD_HEADER = b"x-prompttrain-overhead-ms"


@dataclass
class UpstreamCall:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes


async def open_upstream(client: httpx.AsyncClient, call: UpstreamCall, record: ExchangeRecord) -> httpx.Response:
    """Send the request and return once the upstream's status and headers arrived (body still unread)."""
    request = client.build_request(call.method, call.url, headers=call.headers, content=call.body)
    for attempt in range(MAX_CONNECT_RETRIES + 1):
        record.upstream_sent = time.perf_counter()
        try:
            response = await client.send(request, stream=True)
        except httpx.TimeoutException as error:
            if isinstance(error, httpx.ConnectTimeout) and attempt < MAX_CONNECT_RETRIES:
                continue
            raise UpstreamTimeoutError("the upstream did not answer in time") from None
        except RETRYABLE as error:
            if attempt < MAX_CONNECT_RETRIES:
                log.info("upstream connection failed (%s); retrying", type(error).__name__)
                continue
            raise UpstreamUnreachableError(f"the upstream is unreachable ({type(error).__name__})") from None
        except httpx.HTTPError as error:
            raise UpstreamUnreachableError(f"the upstream request failed ({type(error).__name__})") from None
        record.upstream_headers = time.perf_counter()
        return response
    raise AssertionError("unreachable")  # pragma: no cover - the loop always returns or raises


def response_header_list(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    raw = response.headers.raw
    dropped = HOP_BY_HOP | connection_tokens((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw)
    return [(name.lower(), value) for name, value in raw if name.decode("latin-1").lower() not in dropped]


class UpstreamResponse(Response):
    """An ASGI response that relays the upstream body chunk by chunk and records the exchange when it ends."""

    def __init__(self, upstream: httpx.Response, record: ExchangeRecord, writer: RequestWriter | None) -> None:
        # Deliberately not Response.__init__: the headers are the upstream's raw list, sent as they are.
        self.status_code = upstream.status_code
        self.background = None
        self.upstream = upstream
        self.record = record
        self.writer = writer
        self.upstream_headers = response_header_list(upstream)
        record.status_code = upstream.status_code
        record.response_headers = recorded_response_headers(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in self.upstream_headers
        )
        record.content_type = upstream.headers.get("content-type", "")
        record.content_encoding = upstream.headers.get("content-encoding", "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        record = self.record
        upstream_wait = (record.upstream_headers or 0.0) - (record.upstream_sent or 0.0)
        record.overhead_ms = round((time.perf_counter() - record.started) * 1000.0 - upstream_wait * 1000.0, 3)
        headers = [
            *self.upstream_headers,
            (REQUEST_ID_HEADER, str(record.request_id).encode()),
            (OVERHEAD_HEADER, f"{record.overhead_ms:.3f}".encode()),
        ]
        pump = asyncio.create_task(self._pump(send, headers))
        watch = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            done, _ = await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if pump not in done:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
                record.outcome = Outcome.CLIENT_DISCONNECTED
                record.error_type = "client_disconnected"
                record.error_message = "the client disconnected before the response ended"
            else:
                pump.result()
        except asyncio.CancelledError:
            record.outcome = Outcome.INTERRUPTED
            record.error_type = "interrupted"
            record.error_message = "the proxy stopped before the response ended"
            raise
        finally:
            for task in (pump, watch):
                task.cancel()
            await self.upstream.aclose()
            record.finished = time.perf_counter()
            if self.writer is not None:
                self.writer.submit(record)

    async def _pump(self, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        record = self.record
        await send({"type": "http.response.start", "status": self.upstream.status_code, "headers": headers})
        chunks = record.chunks
        try:
            async for chunk in self.upstream.aiter_raw():
                chunks.append((time.perf_counter(), chunk))
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.TimeoutException:
            record.outcome, record.error_type = Outcome.TIMEOUT, "timeout_error"
            record.error_message = "the upstream went silent for longer than the read timeout"
        except httpx.HTTPError as error:
            record.outcome, record.error_type = Outcome.STREAM_ERROR, "upstream_connection_lost"
            record.error_message = f"the upstream connection broke mid-response ({type(error).__name__})"
        if record.error_type is not None:
            # Relay the break as a break: ending the body cleanly would tell the client the answer was whole.
            # Returning without the final body message makes the server close the connection mid-body.
            log.warning("request %s: %s", record.request_id, record.error_message)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


class ErrorResponse(Response):
    """An error the proxy answers itself, in Anthropic's error shape, recorded like any other exchange."""

    def __init__(self, error: ProxyError, record: ExchangeRecord, writer: RequestWriter | None) -> None:
        self.status_code = error.status
        self.background = None
        self.error = error
        self.record = record
        self.writer = writer

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
            if self.writer is not None:
                self.writer.submit(record)
