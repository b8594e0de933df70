"""The proxy's upstream client against real sockets on 127.0.0.1: servers written here answer the way an upstream
(or a corporate proxy in front of it) may, byte for byte, including the ways that go wrong."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from prompttrain.proxy import upstream as upstream_module
from prompttrain.proxy.upstream import (
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamConnectTimeoutError,
    UpstreamPool,
    UpstreamReadTimeoutError,
    UpstreamReply,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.port = 0


@contextlib.asynccontextmanager
async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server()
    writers: list[asyncio.StreamWriter] = []
    handlers: set[asyncio.Task[None]] = set()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            await handler(reader, writer)
        writer.close()

    listening = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=tls)
    server.port = listening.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        for writer in writers:
            writer.close()
        listening.close()
        await listening.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head + body


class Answering:
    """A handler that answers each request on a connection with the next reply (the last one repeats)."""

    def __init__(self, *replies: bytes) -> None:
        self.replies = replies
        self.requests: list[bytes] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = 0
        while True:
            self.requests.append(await read_request(reader))
            writer.write(self.replies[min(index, len(self.replies) - 1)])
            await writer.drain()
            index += 1


def script(*steps: bytes | float) -> Handler:
    """A handler that reads one request, then writes each bytes step and sleeps each number of seconds."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for step in steps:
            if isinstance(step, bytes):
                writer.write(step)
                await writer.drain()
            else:
                await asyncio.sleep(step)

    return handler


async def body_of(reply: UpstreamReply) -> bytes:
    return b"".join([chunk async for chunk in reply.chunks()])


OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'


async def connections_for_two_requests(handler: Handler, expected: bytes, method: str = "GET") -> int:
    async with serve(handler) as server, pool() as client:
        for _ in range(2):
            reply = await client.request(method, f"http://127.0.0.1:{server.port}/", [], b"")
            assert await asyncio.wait_for(body_of(reply), 2) == expected
            reply.close()
        return server.connections


@contextlib.asynccontextmanager
async def pool(read_timeout: float = 5.0, tls: ssl.SSLContext | None = None) -> AsyncIterator[UpstreamPool]:
    client = UpstreamPool(5.0, read_timeout, tls)
    try:
        yield client
    finally:
        await client.close()
        await asyncio.sleep(0)  # let the transports finish closing


async def test_a_kept_alive_connection_carries_the_next_request_and_the_request_is_sent_as_given() -> None:
    upstream = Answering(OK)
    async with serve(upstream) as server, pool() as client:
        for body in (b'{"a":1}', b'{"b":2}'):
            url = f"http://127.0.0.1:{server.port}/v1/messages?beta=true"
            reply = await client.request("POST", url, [("x-api-key", "k"), ("content-type", "application/json")], body)
            assert (reply.status, reply.header("content-type"), await body_of(reply)) == (
                200,
                "application/json",
                b'{"ok":true}',
            )
            reply.close()
    assert server.connections == 1
    assert upstream.requests[0] == (
        b"POST /v1/messages?beta=true HTTP/1.1\r\nhost: 127.0.0.1:%d\r\nx-api-key: k\r\n"
        b'content-type: application/json\r\ncontent-length: 7\r\n\r\n{"a":1}' % server.port
    )


async def test_chunked_and_close_delimited_bodies_arrive_whole_and_only_the_chunked_connection_is_reused() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n"
        b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
    )
    assert await connections_for_two_requests(Answering(chunked), b"hello, world") == 1

    until_close = script(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nno length, ", b"ends with the connection")
    assert await connections_for_two_requests(until_close, b"no length, ends with the connection") == 2


async def test_connection_close_and_head_answers_are_not_reused() -> None:
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"
    assert await connections_for_two_requests(Answering(closing), b"ok") == 2
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n"  # a HEAD answer names a length but has no body
    assert await connections_for_two_requests(Answering(head), b"", method="HEAD") == 2


async def test_an_interim_100_answer_is_skipped() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    async with serve(Answering(interim)) as server, pool() as client:
        reply = await client.request("POST", f"http://127.0.0.1:{server.port}/", [], b"{}")
        assert (reply.status, reply.raw_headers[0], await body_of(reply)) == (
            200,
            (b"content-type", b"application/json"),
            b'{"ok":true}',
        )
        reply.close()


async def test_failures_before_the_answer_are_connect_errors_and_after_it_broken_or_timeouts() -> None:
    async with serve(script()) as server, pool() as client:
        with pytest.raises(UpstreamConnectError):
            await client.request("GET", f"http://127.0.0.1:{server.port}/", [], b"")
        port = server.port
    async with pool() as client:
        with pytest.raises(UpstreamConnectError):  # nothing listens there any more
            await client.request("GET", f"http://127.0.0.1:{port}/", [], b"")

    truncated = script(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")
    async with serve(truncated) as server, pool() as client:
        reply = await client.request("GET", f"http://127.0.0.1:{server.port}/", [], b"")
        with pytest.raises(UpstreamBrokenError):
            await body_of(reply)
        reply.close()

    async with serve(script(b"SSH-2.0-OpenSSH\r\n\r\n", 5.0)) as server, pool() as client:
        with pytest.raises(UpstreamBrokenError):
            await client.request("GET", f"http://127.0.0.1:{server.port}/", [], b"")


async def test_the_read_timeout_applies_before_the_headers_and_between_chunks_not_to_the_whole_answer() -> None:
    async with serve(script(5.0)) as server, pool(read_timeout=0.3) as client:
        with pytest.raises(UpstreamReadTimeoutError):
            await client.request("GET", f"http://127.0.0.1:{server.port}/", [], b"")

    # 1.2 s in all, 0.2 s apart: longer than the timeout, each gap shorter; then silence after a complete answer.
    trickle = script(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", *[b"1\r\nx\r\n", 0.2] * 6, b"0\r\n\r\n", 1.0
    )
    async with serve(trickle) as server, pool(read_timeout=0.5) as client:
        reply = await client.request("GET", f"http://127.0.0.1:{server.port}/", [], b"")
        assert await body_of(reply) == b"xxxxxx"
        reply.close()

    async with (
        serve(script(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", 5.0)) as server,
        pool(read_timeout=0.3) as client,
    ):
        reply = await client.request("GET", f"http://127.0.0.1:{server.port}/", [], b"")
        with pytest.raises(UpstreamReadTimeoutError):
            await body_of(reply)
        reply.close()


async def test_connect_timeout() -> None:
    async with serve(Answering(OK)) as server:
        client = UpstreamPool(1e-9, 5.0)
        with pytest.raises(UpstreamConnectTimeoutError):
            await client.request("GET", f"http://127.0.0.1:{server.port}/", [], b"")
        await client.close()


async def test_a_slow_reader_pauses_the_upstream_socket_and_still_gets_every_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream_module, "READ_HIGH_WATER", 64 * 1024)
    body = bytes(range(256)) * (4 * 4096)  # 4 MiB
    pauses: list[int] = []
    pause = upstream_module.Connection.pause

    def counting_pause(self: upstream_module.Connection) -> None:
        pauses.append(self.reply._buffered if self.reply is not None else 0)
        pause(self)

    monkeypatch.setattr(upstream_module.Connection, "pause", counting_pause)

    async with (
        serve(script(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)) as server,
        pool() as client,
    ):
        reply = await client.request("GET", f"http://127.0.0.1:{server.port}/", [], b"")
        received = []
        async for chunk in reply.chunks():
            received.append(chunk)
            await asyncio.sleep(0.001)
        assert b"".join(received) == body
        assert pauses and max(pauses) < 1024 * 1024  # the socket stopped being read: no 4 MiB buffered here
        reply.close()


def certificate(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for localhost: the server's context and a client context that trusts it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


@contextlib.asynccontextmanager
async def connect_proxy(seen: list[bytes]) -> AsyncIterator[int]:
    """A forward proxy: CONNECT opens a tunnel; a request in absolute form is relayed to its host."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        method, target = head.split(b" ")[:2]
        if method == b"CONNECT":
            port = target.rsplit(b":", 1)[1]
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            port = int(target.split(b"/")[2].rsplit(b":", 1)[1])
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            up_writer.write(head)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield listening.sockets[0].getsockname()[1]
    finally:
        listening.close()
        await listening.wait_closed()


async def test_tls_directly_and_through_a_proxy_tunnel_and_plain_http_through_the_proxy(tmp_path: Path) -> None:
    server_tls, client_tls = certificate(tmp_path)
    upstream = Answering(OK)
    seen: list[bytes] = []
    async with serve(upstream, tls=server_tls) as server, pool(tls=client_tls) as client:
        reply = await client.request("GET", f"https://localhost:{server.port}/v1/models", [], b"")
        assert await body_of(reply) == b'{"ok":true}'
        reply.close()
        async with connect_proxy(seen) as proxy_port:
            proxy = f"http://user%40corp:p%3Ass@127.0.0.1:{proxy_port}"
            for _ in range(2):
                reply = await client.request("GET", f"https://localhost:{server.port}/v1/models", [], b"", proxy)
                assert await body_of(reply) == b'{"ok":true}'
                reply.close()
        assert server.connections == 2  # one direct, one tunnel kept alive for both requests
        assert seen[0].startswith(b"CONNECT localhost:%d HTTP/1.1\r\n" % server.port)
        assert b"proxy-authorization: Basic dXNlckBjb3JwOnA6c3M=\r\n" in seen[0]  # user@corp:p:ss
        assert all(request.startswith(b"GET /v1/models HTTP/1.1\r\nhost: localhost:") for request in upstream.requests)
        with pytest.raises(UpstreamConnectError):  # the certificate is not trusted by default
            async with pool() as untrusting:
                await untrusting.request("GET", f"https://localhost:{server.port}/", [], b"")

    seen = []
    async with serve(Answering(OK)) as server, pool() as client, connect_proxy(seen) as proxy_port:
        url = f"http://127.0.0.1:{server.port}/v1/models"
        reply = await client.request("GET", url, [], b"", f"http://127.0.0.1:{proxy_port}")
        assert await body_of(reply) == b'{"ok":true}'
        reply.close()
        assert seen[0].startswith(b"GET " + url.encode() + b" HTTP/1.1\r\n")


async def test_cancelling_a_request_closes_its_connection() -> None:
    async with serve(script(5.0)) as server, pool() as client:
        task = asyncio.create_task(client.request("GET", f"http://127.0.0.1:{server.port}/", [], b""))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not client._open and not any(client._idle.values())
