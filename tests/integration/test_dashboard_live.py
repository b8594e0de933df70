"""`GET /sse`: requests recorded by any proxy replica reach every dashboard replica's streams (LISTEN/NOTIFY on
PostgreSQL, polling on SQLite), with heartbeats, and the stream survives a dropped LISTEN connection."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.browser.support import DASHBOARD_KEY, insert, migrate_database, request_row, start_dashboard
from tests.helpers import FakeUpstream, Service, execute

KEY = {"X-Dashboard-Key": DASHBOARD_KEY}
LIVE_SECONDS = 2.0


class EventReader:
    """Reads an SSE stream in a thread; `next(name)` waits for the next event of that name."""

    def __init__(self, url: str) -> None:
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        with (
            httpx.Client(timeout=httpx.Timeout(10, read=None)) as client,
            client.stream("GET", url, headers=KEY) as response,
        ):
            self.events.put(("status", response.status_code))
            name = ""
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    self.events.put((name, orjson.loads(line.removeprefix("data: "))))

    def next(self, name: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event, data = self.events.get(timeout=left)
            except queue.Empty:
                break
            if event == name:
                return data
        raise AssertionError(f"no '{name}' event within {timeout}s")

    def close(self) -> None:
        self._stop.set()


@pytest.fixture
def reader_factory() -> Iterator[Any]:
    readers: list[EventReader] = []

    def open_reader(dashboard: Service) -> EventReader:
        reader = EventReader(f"{dashboard.url}/sse")
        assert reader.next("status", 10) == 200
        reader.next("ready", 10)
        readers.append(reader)
        return reader

    yield open_reader
    for reader in readers:
        reader.close()


@pytest.mark.postgres
def test_requests_through_two_proxies_reach_two_dashboards_live(
    postgres_url: str, start_proxy: Any, upstream: FakeUpstream, tmp_path: Path, reader_factory: Any
) -> None:
    proxies = [start_proxy(postgres_url), start_proxy(postgres_url)]
    dashboards = [
        start_dashboard(tmp_path / "one", postgres_url, dashboard_heartbeat_seconds=0.5),
        start_dashboard(tmp_path / "two", postgres_url, dashboard_heartbeat_seconds=0.5),
    ]
    try:
        readers = [reader_factory(dashboard) for dashboard in dashboards]
        readers[0].next("heartbeat", 3)
        for proxy in proxies:
            response = httpx.post(
                f"{proxy.url}/v1/messages",
                json={"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
                headers={"x-api-key": "sk-ant-own", "train-id": "default"},
            )
            assert response.status_code == 200
            request_id = response.headers["x-prompttrain-request-id"]
            for reader in readers:
                started = time.monotonic()
                while True:
                    event = reader.next("requests", LIVE_SECONDS - (time.monotonic() - started))
                    if any(item["id"] == request_id for item in event["requests"]):
                        break
                assert event["requests"][0]["train"] == "default"

        # The LISTEN connection drops (a database restart, a failover): streams get `resync`, then keep working.
        execute(
            postgres_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'prompttrain-dashboard-listen' AND datname = current_database()",
        )
        for reader in readers:
            reader.next("resync", 10)
        row = request_row()
        insert(postgres_url, [row])
        execute(
            postgres_url,
            "SELECT pg_notify('prompttrain_requests', :payload)",
            payload=orjson.dumps(
                {"requests": [{"id": str(row["request_id"]), "train": "default"}], "more": 0}
            ).decode(),
        )
        for reader in readers:
            assert reader.next("requests", LIVE_SECONDS)["requests"][0]["id"] == str(row["request_id"])
        health = httpx.get(f"{dashboards[0].url}/health").json()
        assert health["live"] == "listening" and health["live_clients"] == 1
    finally:
        for dashboard in dashboards:
            dashboard.stop()


def test_sqlite_dashboard_polls_for_new_requests(sqlite_url: str, tmp_path: Path, reader_factory: Any) -> None:
    migrate_database(sqlite_url)
    dashboard = start_dashboard(tmp_path, sqlite_url)
    try:
        reader = reader_factory(dashboard)
        row = request_row(train_id="alpha")
        insert(sqlite_url, [row])
        event = reader.next("requests", LIVE_SECONDS)
        assert event["requests"] == [{"id": str(row["request_id"]), "train": "alpha", "conversation": None}]
        listed = httpx.get(f"{dashboard.url}/api/requests", headers=KEY).json()["requests"]
        assert [item["request_id"] for item in listed] == [str(row["request_id"])]
        overview = httpx.get(f"{dashboard.url}/api/overview?range=1h", headers=KEY).json()  # the SQLite grouping
        assert overview["totals"]["requests"] == 1 and overview["by_train"][0]["name"] == "alpha"
        assert sum(point["totals"]["requests"] for point in overview["series"]) == 1
        for page in ("/", "/requests", "/token-usage", "/conversations", "/trains"):
            assert httpx.get(dashboard.url + page, headers=KEY).status_code == 200, page
    finally:
        dashboard.stop()


def test_sigterm_ends_open_streams_promptly(sqlite_url: str, tmp_path: Path, reader_factory: Any) -> None:
    migrate_database(sqlite_url)
    dashboard = start_dashboard(tmp_path, sqlite_url)
    reader_factory(dashboard)
    started = time.monotonic()
    assert dashboard.stop(timeout=20) == 0
    assert time.monotonic() - started < 10
