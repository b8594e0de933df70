"""The HTTP/1.1 client that carries requests to the upstream: keep-alive connections, TLS, an HTTP(S) proxy's
CONNECT tunnel, and a response body relayed as the raw chunks that arrive.

Why not a general client: on the proxy benchmark aiohttp's request/response machinery was a third of the proxy's
CPU per request (httpx's more). This does only what forwarding needs, on an asyncio protocol with httptools' C
parser (uvicorn's, already a dependency): write the request in one go, parse the answer as it arrives, hand body
bytes to the relay without decoding them (no decompression: the recording does that off the request path).

Errors, for the forwarding's retry rule (only before any response byte):

- `UpstreamConnectError`: the connection could not be made or broke before the status line (a kept-alive connection the
  upstream closed meanwhile looks like this); the request can be sent again.
- `UpstreamConnectTimeoutError`: no connection within the connect timeout.
- `UpstreamReadTimeoutError`: the upstream went silent for the read timeout (before the headers or mid-body).
- `UpstreamBrokenError`: the connection broke, or the upstream sent what is not HTTP, after the status line.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import httptools

IDLE_SECONDS = 60.0  # a kept-alive connection unused for longer is closed rather than reused
READ_HIGH_WATER = 1 << 20  # body bytes buffered for a slow client before the upstream socket stops being read
CONNECT_REPLY_LIMIT = 64 * 1024


class UpstreamError(Exception):
    """A failure talking to the upstream; the message never carries request content or credentials."""


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamConnectTimeoutError(UpstreamError):
    pass


class UpstreamReadTimeoutError(UpstreamError):
    pass


class UpstreamBrokenError(UpstreamError):
    pass


@dataclass(frozen=True)
class Origin:
    """Where a connection goes: the upstream, and the proxy it is tunnelled through (if any)."""

    scheme: str
    host: str
    port: int
    proxy: str | None = None

    @classmethod
    def of(cls, url: str, proxy: str | None) -> tuple[Origin, str]:
        """The origin of `url` and the request target to send on its connection."""
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamConnectError(f"unsupported upstream URL scheme {scheme!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if proxy is not None and scheme == "http":
            target = url  # absolute form: a plain HTTP request goes to the proxy itself
        return cls(scheme, parts.hostname, port, proxy), target

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class UpstreamReply:
    """The upstream's answer: status and raw headers at once, the body as it arrives (`chunks`)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._headers: dict[str, str] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    def header(self, name: str) -> str:
        """The first value of a response header (name in lower case), or ""."""
        if self._headers is None:
            self._headers = {}
            for key, value in reversed(self.raw_headers):
                self._headers[key.decode("latin-1").lower()] = value.decode("latin-1")
        return self._headers.get(name, "")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (chunked transfer coding removed, content coding kept)."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered < READ_HIGH_WATER // 2:
                    self._connection.resume()
                yield chunk
                continue
            if self._error is not None:
                raise self._error
            if self._complete:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        """Done with the reply: the connection goes back to the pool if the body was read whole, else it closes."""
        if not self._released:
            self._released = True
            self._connection.finish(reusable=self._complete and self._error is None)

    # -- from the connection -----------------------------------------------------------------------------------

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > READ_HIGH_WATER:
            self._connection.pause()
        self._wake()

    def _end(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if not self._complete and self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reply: UpstreamReply | None = None
        self.head: asyncio.Future[UpstreamReply] | None = None
        self.closed = False
        self.idle_since = 0.0
        self.last_read = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.head_only = False  # a HEAD request's answer has no body whatever its headers say
        self.until_close = False  # the answer has neither a length nor chunks: its body ends with the connection
        self.keep = True  # False once the upstream said it closes the connection after this answer
        self.paused = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.last_read = self.pool.loop.time()
        if self.reply is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted for the next request
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBrokenError("the upstream switched protocols"))
        except httptools.HttpParserError:
            self._fail(UpstreamBrokenError("the upstream's answer is not valid HTTP/1.1"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self.head is not None and not self.head.done():
            self.head.set_exception(UpstreamConnectError("the upstream closed the connection before answering"))
        elif self.reply is not None:
            if self.until_close and exc is None:
                self.reply._end()  # a body without length or chunks ends with the connection
            else:
                self.reply._fail(UpstreamBrokenError("the upstream closed the connection mid-response"))
        self.pool.forget(self)

    # -- httptools callbacks ------------------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.reply is not None
        self.reply.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        reply = self.reply
        assert reply is not None
        reply.status = self.parser.get_status_code()
        if 100 <= reply.status < 200:
            reply.raw_headers.clear()  # an interim answer: the real one follows
            return
        if self.head is not None and not self.head.done():
            self.head.set_result(reply)
        if self.head_only:
            self.on_message_complete()
            return
        framed = any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in reply.raw_headers)
        self.until_close = not framed and reply.status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        if self.reply is not None and not self.head_only:
            self.reply._feed(bytes(body))

    def on_message_complete(self) -> None:
        reply = self.reply
        if reply is None or reply.status < 200 or reply._complete:
            return
        self._cancel_timer()
        if not self.parser.should_keep_alive() or self.head_only:
            self.keep = False
        reply._end()

    # -- exchange -----------------------------------------------------------------------------------------------

    def send(self, head: bytes, body: bytes) -> asyncio.Future[UpstreamReply]:
        assert self.transport is not None
        self.parser = httptools.HttpResponseParser(self)
        self.until_close = False
        self.reply = UpstreamReply(self)
        self.head = self.pool.loop.create_future()
        self.last_read = self.pool.loop.time()
        self._arm_timer()
        self.transport.writelines([head, body] if body else [head])
        return self.head

    def finish(self, reusable: bool) -> None:
        self._cancel_timer()
        self.reply = None
        self.head = None
        self.resume()
        if reusable and self.keep and not self.closed:
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        self._cancel_timer()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self.pool.forget(self)

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.last_read = self.pool.loop.time()  # waiting for the client is not the upstream's silence
            self.transport.resume_reading()

    def _fail(self, error: UpstreamError) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        elif self.reply is not None:
            self.reply._fail(error)
        self.close()

    # The read timeout: one timer per exchange that re-arms itself for whatever is left since the last read,
    # instead of a timer per chunk.
    def _arm_timer(self, delay: float | None = None) -> None:
        self.timer = self.pool.loop.call_later(self.pool.read_timeout if delay is None else delay, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.reply is None:
            return
        if self.paused:
            self._arm_timer()
            return
        silent = self.pool.loop.time() - self.last_read
        if silent < self.pool.read_timeout:
            self._arm_timer(self.pool.read_timeout - silent)
            return
        self._fail(UpstreamReadTimeoutError("the upstream went silent for longer than the read timeout"))

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class UpstreamPool:
    """Keep-alive connections per origin (no limit on their number), opened on demand."""

    def __init__(self, connect_timeout: float, read_timeout: float, tls: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.tls = tls or ssl.create_default_context()
        self._idle: dict[Origin, list[Connection]] = {}
        self._open: set[Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def request(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes, proxy: str | None = None
    ) -> UpstreamReply:
        """Send a request and return once the status and headers arrived (the body streams from `chunks`)."""
        origin, target = Origin.of(url, proxy)
        lines = [f"{method} {target} HTTP/1.1", f"host: {origin.host_header}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append(f"content-length: {len(body)}")
        if proxy is not None and origin.scheme == "http" and (authorization := _proxy_authorization(proxy)):
            lines.append(f"proxy-authorization: {authorization}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        connection = await self._connection(origin)
        connection.head_only = method == "HEAD"
        try:
            return await connection.send(head, body)
        except BaseException:
            connection.close()  # cancelled or failed mid-exchange: its state is unknown
            raise

    def release(self, connection: Connection) -> None:
        connection.idle_since = self.loop.time()
        self._idle.setdefault(connection.origin, []).append(connection)

    def forget(self, connection: Connection) -> None:
        self._open.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)

    async def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()

    async def _connection(self, origin: Origin) -> Connection:
        idle = self._idle.get(origin)
        now = self.loop.time()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < IDLE_SECONDS:
                return connection
            connection.close()
        try:
            return await asyncio.wait_for(self._open_connection(origin), self.connect_timeout)
        except TimeoutError:
            raise UpstreamConnectTimeoutError("the upstream did not accept the connection in time") from None
        except ssl.SSLError as error:
            raise UpstreamConnectError(
                f"TLS with the upstream failed ({error.reason or type(error).__name__})"
            ) from None
        except OSError as error:
            raise UpstreamConnectError(f"could not connect ({type(error).__name__})") from None

    async def _open_connection(self, origin: Origin) -> Connection:
        loop = self.loop
        if origin.proxy is None:
            _, connection = await loop.create_connection(
                lambda: Connection(self, origin),
                origin.host,
                origin.port,
                ssl=self.tls if origin.scheme == "https" else None,
                server_hostname=origin.host if origin.scheme == "https" else None,
            )
        else:
            _, connection = await self._through_proxy(origin)
        self._open.add(connection)
        return connection

    async def _through_proxy(self, origin: Origin) -> tuple[asyncio.BaseTransport, Connection]:
        assert origin.proxy is not None
        proxy = urllib.parse.urlsplit(origin.proxy)
        if proxy.scheme not in ("http", "") or not proxy.hostname:
            raise UpstreamConnectError("only http:// proxies are supported for the upstream")
        loop = self.loop
        if origin.scheme == "http":
            return await loop.create_connection(lambda: Connection(self, origin), proxy.hostname, proxy.port or 80)
        tunnel = _Tunnel(loop)
        transport, _ = await loop.create_connection(lambda: tunnel, proxy.hostname, proxy.port or 80)
        lines = [f"CONNECT {origin.host}:{origin.port} HTTP/1.1", f"host: {origin.host}:{origin.port}"]
        if authorization := _proxy_authorization(origin.proxy):
            lines.append(f"proxy-authorization: {authorization}")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        try:
            status = await tunnel.established
        except BaseException:
            transport.close()
            raise
        if status != 200:
            transport.close()
            raise UpstreamConnectError(f"the proxy refused the tunnel to the upstream (status {status})")
        connection = Connection(self, origin)
        secured = await loop.start_tls(transport, connection, self.tls, server_hostname=origin.host)
        if secured is None:
            raise UpstreamConnectError("TLS through the proxy's tunnel failed")
        connection.connection_made(secured)
        return secured, connection


class _Tunnel(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT; the connection then carries TLS to the upstream."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.established: asyncio.Future[int] = loop.create_future()
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > CONNECT_REPLY_LIMIT and not self.established.done():
                self.established.set_exception(UpstreamConnectError("the proxy's answer to CONNECT is too long"))
            return
        status_line = self.buffer.split(b"\r\n", 1)[0].split()
        if not self.established.done():
            try:
                self.established.set_result(int(status_line[1]))
            except (IndexError, ValueError):
                self.established.set_exception(UpstreamConnectError("the proxy's answer to CONNECT is not HTTP"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.established.done():
            self.established.set_exception(UpstreamConnectError("the proxy closed the connection during CONNECT"))


def _proxy_authorization(proxy: str) -> str | None:
    parts = urllib.parse.urlsplit(proxy)
    if parts.username is None:
        return None
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
