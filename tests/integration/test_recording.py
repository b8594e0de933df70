"""Recording that never loses a request: database outages, shutdown, disconnects, crashes, replicas, retention."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import statistics
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import orjson
import pytest

from tests.conftest import ProxyFactory
from tests.helpers import (
    PROMPTTRAIN,
    FakeUpstream,
    Service,
    TcpRelay,
    load_payload,
    metric,
    query,
    wait_for_rows,
    wait_until,
)

BODY: dict[str, Any] = {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
USER_KEY = {"x-api-key": "sk-ant-user"}


@pytest.fixture
def relay(postgres_url: str) -> Iterator[TcpRelay]:
    parts = urllib.parse.urlsplit(postgres_url)
    tcp_relay = TcpRelay(parts.hostname or "127.0.0.1", parts.port or 5432)
    yield tcp_relay
    tcp_relay.close()


def through(relay: TcpRelay, database_url: str) -> str:
    parts = urllib.parse.urlsplit(database_url)
    credentials, _, _ = parts.netloc.rpartition("@")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{credentials}@127.0.0.1:{relay.port}"))


def post(url: str, body: dict[str, Any] = BODY, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/messages", json=body, headers=USER_KEY, timeout=30, **kwargs)


def test_a_database_outage_under_load_loses_nothing_and_slows_nothing(
    start_proxy: ProxyFactory, upstream: FakeUpstream, postgres_url: str, relay: TcpRelay
) -> None:
    upstream.script({"delay_ms": 5, "repeat": -1})
    proxy = start_proxy(through(relay, postgres_url))
    results: list[tuple[float, float, int]] = []  # (started, seconds, status)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                started = time.monotonic()
                status = http.post(f"{proxy.url}/v1/messages", json=BODY, headers=USER_KEY).status_code
                results.append((started, time.monotonic() - started, status))

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        workers = [pool.submit(client) for _ in range(6)]
        time.sleep(1.0)
        cut_at = time.monotonic()
        relay.cut()
        time.sleep(2.0)
        relay.restore()
        restored_at = time.monotonic()
        time.sleep(1.0)
        stop.set()
        for worker in workers:
            worker.result()

    assert len(results) >= 300
    assert {status for _, _, status in results} == {200}
    before = [seconds for started, seconds, _ in results if started < cut_at]
    during = [seconds for started, seconds, _ in results if cut_at <= started < restored_at]
    assert len(during) >= 100
    # Recording is off the request path: an unreachable database adds no latency beyond noise.
    assert statistics.median(during) < statistics.median(before) * 3 + 0.02
    assert max(during) < 1.0
    rows = wait_for_rows(postgres_url, "SELECT request_id FROM api_requests", len(results), timeout=60)
    assert len(rows) == len(results) == len({row["request_id"] for row in rows})
    assert metric(proxy.url, "prompttrain_records_spooled_total") > 0
    assert metric(proxy.url, "prompttrain_records_replayed_total") > 0
    wait_for_rows(postgres_url, "SELECT request_id FROM request_payloads", len(results), timeout=60)
    assert query(postgres_url, "SELECT count(*) AS shed FROM api_requests WHERE payload_shed")[0]["shed"] == 0


def test_sigterm_lets_a_slow_stream_finish(start_proxy: ProxyFactory, upstream: FakeUpstream, sqlite_url: str) -> None:
    words = " ".join(f"w{i}" for i in range(30))
    upstream.script({"content": [{"type": "text", "text": words}], "delay_ms": 100})
    proxy = start_proxy(sqlite_url, shutdown_delay_seconds=1)
    events: list[str] = []
    with httpx.stream(
        "POST", f"{proxy.url}/v1/messages", json=BODY | {"stream": True}, headers=USER_KEY, timeout=30
    ) as response:
        for line in response.iter_lines():
            if line.startswith("event:"):
                events.append(line.removeprefix("event:").strip())
                if len(events) == 1:
                    proxy.process.send_signal(signal.SIGTERM)
                    # Draining: not ready at once, while the stream goes on.
                    wait_until(lambda: httpx.get(f"{proxy.url}/health/ready").status_code == 503, timeout=2)
    assert events[-1] == "message_stop"
    assert proxy.process.wait(timeout=30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{proxy.url}/health/live")
    row = wait_for_rows(sqlite_url, "SELECT * FROM api_requests", 1)[0]
    assert row["outcome"] == "completed" and row["output_tokens"] > 0


def test_a_stream_cut_by_the_grace_period_is_recorded_as_such(
    start_proxy: ProxyFactory, upstream: FakeUpstream, sqlite_url: str
) -> None:
    words = " ".join(f"w{i}" for i in range(60))
    upstream.script({"content": [{"type": "text", "text": words}], "delay_ms": 200})
    proxy = start_proxy(sqlite_url, shutdown_grace_seconds=1)
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream(
            "POST", f"{proxy.url}/v1/messages", json=BODY | {"stream": True}, headers=USER_KEY, timeout=30
        ) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("event: message_start"):
                proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=30) == 0
    row = wait_for_rows(sqlite_url, "SELECT * FROM api_requests", 1)[0]
    assert (row["outcome"], row["error_type"]) == ("interrupted", "grace_period_exceeded")
    assert row["input_tokens"] > 0  # the usage seen before the cut is kept


def test_a_client_that_hangs_up_mid_stream_cancels_the_upstream(
    start_proxy: ProxyFactory, upstream: FakeUpstream, database_url: str
) -> None:
    words = " ".join(f"w{i}" for i in range(40))
    upstream.script({"content": [{"type": "text", "text": words}], "delay_ms": 100, "usage": {"input_tokens": 77}})
    proxy = start_proxy(database_url)
    seen = 0
    with httpx.stream(
        "POST", f"{proxy.url}/v1/messages", json=BODY | {"stream": True}, headers=USER_KEY, timeout=30
    ) as response:
        for line in response.iter_lines():
            seen += line.startswith("event:")
            if seen == 4:
                break

    def upstream_saw_it() -> bool:
        return any(stream["client_gone"] for stream in upstream.http.get("/_fake/streams").json()["streams"])

    wait_until(upstream_saw_it, timeout=5)
    stream = upstream.http.get("/_fake/streams").json()["streams"][0]
    assert stream["events_sent"] < stream["events_total"]
    row = wait_for_rows(database_url, "SELECT * FROM api_requests", 1)[0]
    assert (row["outcome"], row["error_type"]) == ("client_disconnected", "client_disconnected")
    assert row["input_tokens"] == 77


def test_a_client_that_hangs_up_before_a_slow_answer_is_recorded_at_once(
    start_proxy: ProxyFactory, upstream: FakeUpstream, sqlite_url: str
) -> None:
    upstream.script({"delay_ms": 5000})
    proxy = start_proxy(sqlite_url)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{proxy.url}/v1/messages", json=BODY, headers=USER_KEY, timeout=0.5)
    row = wait_for_rows(sqlite_url, "SELECT * FROM api_requests", 1, timeout=3)[0]
    assert time.monotonic() - started < 4  # recorded before the upstream would have answered
    assert row["outcome"] == "client_disconnected" and row["status_code"] is None


def twenty_spooled(start_proxy: ProxyFactory, postgres_url: str, relay: TcpRelay) -> Service:
    """A proxy whose database is cut, after twenty requests: their metadata is in the spool, their bodies in the
    recording processes' memory (the proxy still keeps all twenty exchanges, unconfirmed)."""
    proxy = start_proxy(through(relay, postgres_url))
    relay.cut()
    for _ in range(20):
        assert post(proxy.url).status_code == 200
    wait_until(lambda: metric(proxy.url, "prompttrain_records_spooled_total") == 20, timeout=10)
    return proxy


def test_spooled_records_survive_kill_9_and_are_replayed(
    start_proxy: ProxyFactory, upstream: FakeUpstream, postgres_url: str, relay: TcpRelay
) -> None:
    proxy = twenty_spooled(start_proxy, postgres_url, relay)
    proxy.process.kill()
    proxy.process.wait()
    assert query(postgres_url, "SELECT count(*) AS n FROM api_requests")[0]["n"] == 0
    relay.restore()
    restarted = start_proxy(through(relay, postgres_url))
    rows = wait_for_rows(postgres_url, "SELECT request_id FROM api_requests", 20, timeout=20)
    assert len({row["request_id"] for row in rows}) == 20
    assert metric(restarted.url, "prompttrain_records_replayed_total") == 20


def children(pid: int) -> list[int]:
    return [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]


def test_a_killed_recorder_is_replaced_and_gets_every_unconfirmed_request_again(
    start_proxy: ProxyFactory, upstream: FakeUpstream, postgres_url: str, relay: TcpRelay
) -> None:
    proxy = twenty_spooled(start_proxy, postgres_url, relay)
    assert metric(proxy.url, "prompttrain_recorder_unconfirmed_bytes") > 0
    first = children(proxy.process.pid)  # the recording processes (WRITER_PROCESSES, 2)
    assert len(first) == 2
    for pid in first:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: metric(proxy.url, "prompttrain_recorder_restarts_total") == 2, timeout=10)
    wait_until(lambda: len(children(proxy.process.pid)) == 2 and not set(children(proxy.process.pid)) & set(first))
    relay.restore()
    rows = wait_for_rows(postgres_url, "SELECT request_id, payload_shed FROM api_requests", 20, timeout=30)
    assert len({row["request_id"] for row in rows}) == 20 and not any(row["payload_shed"] for row in rows)
    payloads = wait_for_rows(postgres_url, "SELECT request_id FROM request_payloads", 20, timeout=30)
    assert {row["request_id"] for row in payloads} == {row["request_id"] for row in rows}
    wait_until(lambda: metric(proxy.url, "prompttrain_recorder_unconfirmed_bytes") == 0, timeout=10)
    assert proxy.process.poll() is None


def test_bodies_are_shed_under_pressure_and_marked_while_usage_is_kept(
    start_proxy: ProxyFactory, upstream: FakeUpstream, postgres_url: str, relay: TcpRelay
) -> None:
    proxy = start_proxy(through(relay, postgres_url), writer_payload_memory_bytes=6000)
    relay.cut()
    big = BODY | {"messages": [{"role": "user", "content": "x" * 2000}]}
    for _ in range(10):
        assert post(proxy.url, big).status_code == 200
    wait_until(lambda: metric(proxy.url, "prompttrain_payloads_shed_total") >= 5, timeout=10)
    relay.restore()
    rows = wait_for_rows(
        postgres_url, "SELECT request_id, payload_shed, input_tokens FROM api_requests", 10, timeout=30
    )
    shed = {row["request_id"] for row in rows if row["payload_shed"]}
    assert len(shed) == metric(proxy.url, "prompttrain_payloads_shed_total") >= 5
    assert all(row["input_tokens"] > 0 for row in rows)
    kept = wait_for_rows(postgres_url, "SELECT request_id FROM request_payloads", 10 - len(shed), timeout=20)
    assert not shed & {row["request_id"] for row in kept}


def test_two_replicas_store_every_request_once(
    start_proxy: ProxyFactory, upstream: FakeUpstream, postgres_url: str
) -> None:
    replicas = [start_proxy(postgres_url), start_proxy(postgres_url)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(lambda i: post(replicas[i % 2].url).status_code, range(200)))
    assert statuses == [200] * 200
    rows = wait_for_rows(postgres_url, "SELECT request_id FROM api_requests", 200, timeout=30)
    assert len(rows) == 200 == len({row["request_id"] for row in rows})


def conversation_turn(turns: int) -> bytes:
    messages: list[dict[str, Any]] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": [{"type": "text", "text": f"question {turn} " + "q" * 300}]})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": f"answer {turn} ünïcode"}]})
    body = {
        "model": "claude-sonnet-5",
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "x-billing: 1"}, {"type": "text", "text": "You are Claude Code. " * 50}],
        "tools": [{"name": f"Tool{i}", "description": "d" * 200, "input_schema": {"type": "object"}} for i in range(5)],
        "messages": messages,
        "stream": False,
    }
    return orjson.dumps(body)


def test_conversation_contents_are_stored_once_and_bodies_come_back_exactly(
    start_proxy: ProxyFactory, upstream: FakeUpstream, database_url: str
) -> None:
    proxy = start_proxy(database_url)
    bodies = [conversation_turn(turns) for turns in range(1, 6)]
    odd = b'{ "model": "claude-haiku-4-5",\n  "max_tokens": 5, "messages": [ {"role": "user", "content": "spaced"} ] }'
    ids = []
    for body in [*bodies, odd]:
        response = httpx.post(f"{proxy.url}/v1/messages", content=body, headers=USER_KEY)
        assert response.status_code == 200
        ids.append(response.headers["x-prompttrain-request-id"])
    wait_for_rows(database_url, "SELECT request_id FROM request_payloads", len(ids))
    for request_id, body in zip(ids, [*bodies, odd], strict=True):
        assert load_payload(database_url, request_id).request_body == body
    # 5 user turns + 4 assistant answers + 2 system blocks + 5 tools, each stored once.
    assert query(database_url, "SELECT count(*) AS n FROM content_blobs")[0]["n"] == 5 + 4 + 2 + 5
    raw = query(database_url, "SELECT count(*) AS n FROM request_payloads WHERE raw_request_body IS NOT NULL")
    assert raw[0]["n"] == 1  # only the oddly spaced body is kept as sent


def insert_history(database_url: str, days_ago: list[int]) -> dict[int, str]:
    """Rows (metadata, payload, blob) as the writer would store them, at past timestamps."""
    import asyncio
    import uuid

    from prompttrain.settings import normalise_database_url
    from prompttrain.storage.engine import create_engine
    from prompttrain.storage.migrate import migrate
    from prompttrain.storage.partitions import ensure_partitions
    from prompttrain.storage.tables import api_requests, content_blobs, request_payloads

    url = normalise_database_url(database_url)
    ids: dict[int, str] = {}

    async def run() -> None:
        await migrate(url)
        engine = create_engine(url, pool_size=1)
        try:
            for age in days_ago:
                when = datetime.now(UTC) - timedelta(days=age)
                await ensure_partitions(engine, today=when.date(), days_ahead=0)
                request_id = uuid.uuid4()
                ids[age] = str(request_id)
                digest = age.to_bytes(32, "big")
                async with engine.begin() as connection:
                    await connection.execute(
                        api_requests.insert(),
                        {
                            "request_id": request_id,
                            "timestamp": when,
                            "train_id": "t",
                            "method": "POST",
                            "path": "/v1/messages",
                            "outcome": "completed",
                        },
                    )
                    await connection.execute(
                        request_payloads.insert(),
                        {
                            "request_id": request_id,
                            "timestamp": when,
                            "request_template": '{"messages":[]}',
                            "message_refs": digest,
                        },
                    )
                    await connection.execute(
                        content_blobs.insert(), {"digest": digest, "content": "{}", "last_seen": when.date()}
                    )
        finally:
            await engine.dispose()

    asyncio.run(run())
    return ids


def test_retention_drops_old_partitions_and_payloads_sooner(database_url: str, tmp_path: Path) -> None:
    import subprocess

    ids = insert_history(database_url, [40, 10, 1])
    result = subprocess.run(
        [PROMPTTRAIN, "retention", "--older-than", "30d", "--payloads-older-than", "7d"],
        env={"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    requests = {str(UUID(str(row["request_id"]))) for row in query(database_url, "SELECT request_id FROM api_requests")}
    payloads = {
        str(UUID(str(row["request_id"]))) for row in query(database_url, "SELECT request_id FROM request_payloads")
    }
    assert requests == {ids[10], ids[1]}
    assert payloads == {ids[1]}
    assert query(database_url, "SELECT count(*) AS n FROM content_blobs")[0]["n"] == 1
    if database_url.startswith("postgresql"):
        old_day = (datetime.now(UTC) - timedelta(days=40)).date()
        partitions = {row["relname"] for row in query(database_url, "SELECT relname FROM pg_class WHERE relkind = 'r'")}
        assert f"api_requests_p{old_day:%Y%m%d}" not in partitions
        assert f"api_requests_p{datetime.now(UTC).date():%Y%m%d}" in partitions
