"""Test support: real processes on 127.0.0.1 (proxy, fake upstream), free ports, polling, database access."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import sqlalchemy as sa

from prompttrain.settings import normalise_database_url
from prompttrain.storage.engine import create_engine

REPO = Path(__file__).resolve().parents[1]
PROMPTTRAIN = str(Path(sys.executable).with_name("prompttrain"))
IN_CI = os.environ.get("CI", "").lower() == "true"


CLAUDE_CODE_SESSION = REPO / "tests" / "fixtures" / "claude_code" / "session_subagent_continue_resume_compact.json"


def claude_code_exchanges() -> list[dict[str, Any]]:
    """The captured Claude Code session (sub-agent, --continue, --resume, /compact): each exchange's name, command,
    headers, request body (its shared system blocks and tools restored) and scripted reply, in order."""
    document = orjson.loads(CLAUDE_CODE_SESSION.read_bytes())
    shared: dict[str, Any] = document["shared"]

    def restore(items: Any) -> Any:
        if not isinstance(items, list):
            return items
        return [shared[item["$shared"]] if isinstance(item, dict) and "$shared" in item else item for item in items]

    exchanges: list[dict[str, Any]] = document["exchanges"]
    for exchange in exchanges:
        body = exchange["body"]
        body["system"], body["tools"] = restore(body.get("system")), restore(body.get("tools"))
    return exchanges


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


class Service:
    """A `prompttrain` subcommand running as its own process, with its output kept for failure reports."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], port: int, log_dir: Path) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}-{port}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [PROMPTTRAIN, *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(log_dir),
        )

    def wait_ready(self, path: str = "/health/live", timeout: float = 30.0) -> Service:
        def answered() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                return httpx.get(self.url + path, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answered, timeout=timeout, interval=0.1)
        return self

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return int(self.process.returncode)


class FakeUpstream:
    """The fake upstream process and its control API."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.url = service.url
        self.http = httpx.Client(base_url=service.url, timeout=10.0)

    def close(self) -> None:
        self.http.close()

    def reset(self) -> None:
        self.http.post("/_fake/reset").raise_for_status()

    def script(self, *replies: Mapping[str, Any]) -> None:
        self.http.post("/_fake/replies", json={"replies": list(replies)}).raise_for_status()

    def received(self) -> list[dict[str, Any]]:
        response = self.http.get("/_fake/received")
        response.raise_for_status()
        return list(response.json()["requests"])

    def oauth(self, **settings: Any) -> None:
        self.http.post("/_fake/oauth", json=settings).raise_for_status()

    def oauth_calls(self) -> int:
        return int(self.http.get("/_fake/oauth").json()["calls"])


def write_json(path: Path, document: Any) -> None:
    """Write atomically, as a deployment tool (or Kubernetes) would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(orjson.dumps(document))
    os.replace(temporary, path)


def run_async(factory: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine to completion in a worker thread: works whether or not this thread runs an event loop
    (Playwright's sync API runs one in the test's thread)."""

    async def main() -> Any:
        return await factory()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


def query(database_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        engine = create_engine(normalise_database_url(database_url), pool_size=1)
        try:
            async with engine.connect() as connection:
                result = await connection.execute(sa.text(sql), params)
                return [dict(row) for row in result.mappings().all()]
        finally:
            await engine.dispose()

    return run_async(run)


def execute(database_url: str, sql: str, **params: Any) -> None:
    """Run one statement and commit it."""

    async def run() -> None:
        engine = create_engine(normalise_database_url(database_url), pool_size=1)
        try:
            async with engine.begin() as connection:
                await connection.execute(sa.text(sql), params)
        finally:
            await engine.dispose()

    run_async(run)


def load_payload(database_url: str, request_id: Any) -> Any:
    """The stored bodies of one request (`StoredPayload`), or None."""
    from prompttrain.storage.queries import load_payload as load

    async def run() -> Any:
        engine = create_engine(normalise_database_url(database_url), pool_size=1)
        try:
            async with engine.connect() as connection:
                identifier = request_id if isinstance(request_id, uuid.UUID) else uuid.UUID(str(request_id))
                return await load(connection, identifier)
        finally:
            await engine.dispose()

    return run_async(run)


def wait_for_payload(database_url: str, request_id: Any, timeout: float = 10.0) -> Any:
    found: Any = None

    def stored() -> bool:
        nonlocal found
        found = load_payload(database_url, request_id)
        return found is not None

    wait_until(stored, timeout=timeout, interval=0.1)
    return found


def wait_for_rows(
    database_url: str, sql: str, count: int, timeout: float = 10.0, **params: Any
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal rows
        rows = query(database_url, sql, **params)
        return len(rows) >= count

    wait_until(enough, timeout=timeout, interval=0.1)
    return rows


@contextlib.contextmanager
def services(*started: Service) -> Iterator[None]:
    try:
        yield
    finally:
        for service in started:
            service.stop()


class TcpRelay:
    """A TCP relay in front of a real server (PostgreSQL) that a test can cut and restore: a network outage.

    Cut: every open connection is reset and new ones are refused (the listening socket is closed), which is what a
    client sees when the database server goes away.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.restore()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self._writers.update({client_writer, server_writer})
        try:
            await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))
        finally:
            self._writers.discard(client_writer)
            self._writers.discard(server_writer)

    async def _start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            transport = writer.transport
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self._call(self._start())

    def cut(self) -> None:
        self._call(self._cut())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


def metric(url: str, name: str, **labels: str) -> float:
    """A sample's value from a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    text = httpx.get(f"{url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        series, _, label_text = sample.partition("{")
        if series == name and (not labels or label_text.rstrip("}") == wanted):
            total += float(value)
    return total
