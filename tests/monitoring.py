"""Test support for metrics, Prometheus and Slack: exposition parsing, a real Prometheus, promtool, a fake Slack."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import IN_CI, free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "manifests" / "monitoring"
Series = tuple[str, tuple[tuple[str, str], ...]]


def require_binary(name: str) -> str:
    """The path of a Prometheus binary (Debian's `prometheus` package); CI installs it, so there it must exist."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(message + " — CI must install it (.ci/run)")
        pytest.skip(message)
    return path


def parse_exposition(text: str) -> dict[Series, float]:
    samples: dict[Series, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(url: str) -> dict[Series, float]:
    response = httpx.get(f"{url}/metrics", timeout=5)
    response.raise_for_status()
    return parse_exposition(response.text)


def value(samples: dict[Series, float], name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= set(have))


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [require_binary("promtool"), *args], input=stdin, capture_output=True, timeout=120, check=False
    )


class Prometheus:
    """A real Prometheus on 127.0.0.1 scraping the given targets every second, storage in a temporary directory."""

    def __init__(self, directory: Path, targets: dict[str, str], rule_files: list[Path] | None = None) -> None:
        binary = require_binary("prometheus")
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files or []],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()
            ],
        }
        config_path = directory / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._ready, timeout=30, interval=0.2)

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expression)
        return list(data["result"]) if data["resultType"] == "vector" else [{"value": data["result"]}]

    def scalar(self, expression: str) -> float | None:
        """The value of a query that yields one sample (None when it yields none)."""
        result = self.query(expression)
        if not result:
            return None
        assert len(result) == 1, f"{expression} yields {len(result)} series: {result}"
        return float(result[0]["value"][1])

    def wait_for(self, expression: str, expected: float, timeout: float = 30.0, tolerance: float = 1e-9) -> None:
        seen: list[float | None] = []

        def matches() -> bool:
            got = self.scalar(expression)
            seen.append(got)
            return got is not None and abs(got - expected) <= tolerance * max(1.0, abs(expected))

        try:
            wait_until(matches, timeout=timeout, interval=0.5)
        except AssertionError:
            raise AssertionError(f"{expression}: expected {expected}, last {seen[-3:]}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class FakeSlack:
    """An incoming-webhook stand-in on 127.0.0.1 that records JSON bodies; `hang()` makes it stop answering."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self._released = threading.Event()
        self._released.set()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                owner._released.wait(timeout=60)
                owner.received.append(orjson.loads(body))
                owner.paths.append(self.path)
                reply = b"ok"
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def hang(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.received) >= count, timeout=timeout)
        return self.received

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_slack() -> Iterator[FakeSlack]:
    slack = FakeSlack()
    yield slack
    slack.close()


def settle(seconds: float) -> None:
    """Give a background task time to act when the test asserts that something did *not* happen."""
    time.sleep(seconds)
