"""TELEMETRY_ENDPOINT: one small event per request, batched, and never in the way of a request."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.conftest import ProxyFactory
from tests.helpers import FakeUpstream, free_port, metric, wait_until

BODY: dict[str, Any] = {"model": "claude-haiku-4-5", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}


class Receiver:
    def __init__(self, hang: bool = False) -> None:
        self.events: list[dict[str, Any]] = []
        self.posts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if hang:
                    time.sleep(10)
                    return
                receiver.posts += 1
                receiver.events.extend(json.loads(body)["events"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver()
    yield started
    started.close()


@pytest.fixture
def hanging_receiver() -> Iterator[Receiver]:
    started = Receiver(hang=True)
    yield started
    started.close()


def test_every_request_becomes_one_event_without_bodies_or_keys(
    start_proxy: ProxyFactory, upstream: FakeUpstream, sqlite_url: str, receiver: Receiver
) -> None:
    proxy = start_proxy(sqlite_url, telemetry_endpoint=receiver.url)
    ids = set()
    for _ in range(5):
        response = httpx.post(f"{proxy.url}/v1/messages", json=BODY, headers={"x-api-key": "sk-ant-secret-key"})
        ids.add(response.headers["x-prompttrain-request-id"])
    wait_until(lambda: len(receiver.events) == 5, timeout=10)
    assert {event["requestId"] for event in receiver.events} == ids
    event = receiver.events[0]
    assert (event["train"], event["account"], event["model"], event["status"], event["outcome"]) == (
        "default",
        "passthrough",
        "claude-haiku-4-5",
        200,
        "completed",
    )
    assert event["inputTokens"] > 0 and event["durationMs"] > 0 and event["timestamp"]
    assert receiver.posts < 5  # batched
    text = json.dumps(receiver.events)
    assert "sk-ant-secret-key" not in text and "messages" not in text


def test_a_hanging_endpoint_does_not_slow_requests(
    start_proxy: ProxyFactory, upstream: FakeUpstream, sqlite_url: str, hanging_receiver: Receiver
) -> None:
    baseline = start_proxy(sqlite_url)
    proxy = start_proxy(sqlite_url, telemetry_endpoint=hanging_receiver.url)

    def latencies(url: str) -> list[float]:
        measured = []
        with httpx.Client() as client:
            for _ in range(30):
                started = time.perf_counter()
                assert client.post(f"{url}/v1/messages", json=BODY, headers={"x-api-key": "k"}).status_code == 200
                measured.append(time.perf_counter() - started)
        return measured

    without, with_hang = latencies(baseline.url), latencies(proxy.url)
    assert statistics.median(with_hang) < statistics.median(without) * 2 + 0.01
    assert max(with_hang) < 0.5
    wait_until(lambda: metric(proxy.url, "prompttrain_telemetry_events_total", result="failed") >= 1, timeout=15)
