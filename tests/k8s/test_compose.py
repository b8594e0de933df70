"""docker-compose.yml: the all-in-one stack (`docker compose up -d`) and its offline override compose/offline.yml.

The static tests read the compose files (and let Compose validate them when it is installed). The end-to-end test
builds the images through Compose FROM the local base image (PROMPTTRAIN_TEST_BASE_IMAGE, as test_images.py;
layers the other image tests already built are reused from docker's cache), starts PostgreSQL, migrations, the
fake upstream, proxy and dashboard under a unique project name on free ports, records a request through the proxy,
finds it in the dashboard API, restarts the stack (`down`, then `up`) and finds it again, then `down -v`.

Compose v2 (`docker compose`) is used when present, else v1.29 (`docker-compose`, what Debian packages and
.ci/run installs). Without docker, Compose or the base image these tests skip; under CI=true they fail.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from prompttrain.settings import Settings
from tests.helpers import IN_CI, REPO, free_port, wait_until
from tests.k8s.test_images import BASE_IMAGE, docker, require_docker

COMPOSE_FILE = REPO / "docker-compose.yml"
OFFLINE_FILE = REPO / "compose" / "offline.yml"
ENV_EXAMPLE = REPO / ".env.example"
TEST_TAG = "compose-test"
HEALTH_CHECKED = ("postgres", "fake-upstream", "proxy", "dashboard")

# Settings docker-compose.yml fixes itself rather than passing through, and those only Kubernetes uses.
SET_BY_COMPOSE = {"DATABASE_URL", "MIGRATE_ON_START", "CREDENTIALS_DIR", "DATA_DIR", "HOST", "PORT", "DASHBOARD_PORT"}
KUBERNETES_ONLY = {
    "CREDENTIALS_SOURCE",
    "CREDENTIALS_NAMESPACE",
    "CREDENTIALS_LABEL_SELECTOR",
    "OPERATOR_RESYNC_SECONDS",
}
SETTINGS = {name.upper() for name in Settings.model_fields}
# Variables the compose files interpolate (none of them reaches the application under its own name).
COMPOSE_VARIABLES = {
    "BASE_IMAGE", "PROXY_IMAGE", "DASHBOARD_IMAGE", "POSTGRES_IMAGE", "PGADMIN_IMAGE", "BIND_ADDRESS", "PROXY_PORT",
    "DASHBOARD_PORT", "PGADMIN_PORT", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "PGADMIN_EMAIL",
    "PGADMIN_PASSWORD", "CREDENTIALS_DIR", "PROXY_STOP_GRACE_PERIOD", "DASHBOARD_OPEN",
}  # fmt: skip


@functools.cache
def compose_command() -> tuple[str, ...] | None:
    """`docker compose` (v2) if it answers, else `docker-compose` (v1), else None."""
    if shutil.which("docker") is not None:
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return ("docker", "compose")
    if shutil.which("docker-compose") is not None:
        return ("docker-compose",)
    return None


def require_compose() -> tuple[str, ...]:
    command = compose_command()
    if command is None:
        problem = (
            "neither `docker compose` (v2) nor `docker-compose` (v1.29) is installed (apt-get install docker-compose)"
        )
        if IN_CI:
            pytest.fail(f"{problem} — CI must provide it (.ci/run)")
        pytest.skip(problem)
    return command


def _environment(overrides: dict[str, str]) -> dict[str, str]:
    """This process's environment without anything Compose or the application would read, plus `overrides`."""
    dropped = SETTINGS | COMPOSE_VARIABLES
    kept = {key: value for key, value in os.environ.items() if key not in dropped and not key.startswith("COMPOSE_")}
    return {**kept, **overrides}


def _service_environment(service: dict[str, Any]) -> dict[str, str | None]:
    entries = service.get("environment", [])
    if isinstance(entries, dict):
        return {str(key): None if value is None else str(value) for key, value in entries.items()}
    return {entry.split("=", 1)[0]: entry.split("=", 1)[1] if "=" in entry else None for entry in entries}


def _load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())  # PyYAML resolves the anchors and `<<` merges, as Compose does
    assert isinstance(document, dict)
    return document


# --- the files --------------------------------------------------------------------------------------------------


def test_env_example_documents_every_setting_and_compose_passes_them() -> None:
    documented = set(re.findall(r"\b([A-Z][A-Z0-9_]{2,})\b", ENV_EXAMPLE.read_text()))
    missing = sorted((SETTINGS | COMPOSE_VARIABLES) - documented)
    assert not missing, f".env.example does not document {missing}"
    active = [line for line in ENV_EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert not active, f".env.example must work as copied: every value commented out (defaults), got {active}"

    services = _load(COMPOSE_FILE)["services"]
    for name in ("migrate", "proxy", "dashboard"):
        environment = _service_environment(services[name])
        passed = {key for key, value in environment.items() if value is None}
        expected = SETTINGS - SET_BY_COMPOSE - KUBERNETES_ONLY - {"DASHBOARD_OPEN"}
        assert passed == expected, (name, sorted(expected - passed), sorted(passed - expected))
        assert environment["MIGRATE_ON_START"] == "false"
        assert environment["DATABASE_URL"] is not None and "@postgres:5432/" in environment["DATABASE_URL"]
        assert "TELEMETRY_ENDPOINT" in environment
    text = COMPOSE_FILE.read_text()
    # Unset settings are not passed at all (the application would read an empty value as unset, but the container's
    # environment should say only what was asked for).
    assert not re.search(r"\$\{[A-Z_]+:?-\}", text), "no ${VAR:-} (empty) defaults"


def test_compose_file_runs_the_chart_images_with_health_checks_and_a_named_volume() -> None:
    document = _load(COMPOSE_FILE)
    assert "version" not in document and "name" not in document, "the Compose spec, readable by v1.29 and v2"
    services = document["services"]
    assert set(services) == {"postgres", "migrate", "proxy", "dashboard", "pgadmin"}
    assert services["pgadmin"]["profiles"] == ["pgadmin"]
    assert all("profiles" not in services[name] for name in ("postgres", "migrate", "proxy", "dashboard"))

    assert services["proxy"]["build"]["dockerfile"] == "Dockerfile.proxy"
    assert services["proxy"]["image"].startswith("${PROXY_IMAGE:-prompttrain-proxy:")
    for name in ("dashboard", "migrate"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile.dashboard"
        assert services[name]["image"].startswith("${DASHBOARD_IMAGE:-prompttrain-dashboard:")
    for name in ("proxy", "dashboard", "migrate"):
        assert services[name]["build"]["args"]["BASE_IMAGE"].startswith("${BASE_IMAGE:-python:3.11-slim")
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"]
    assert services["migrate"]["command"][0] == "migrate"
    assert services["migrate"]["restart"] == "no"
    for name in ("proxy", "dashboard"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert "test" in services[name]["healthcheck"]
        assert "${CREDENTIALS_DIR:-./credentials}:/credentials:ro" in services[name]["volumes"]
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
    assert services["proxy"]["ports"] == ["${BIND_ADDRESS:-127.0.0.1}:${PROXY_PORT:-3000}:3000"]
    assert services["dashboard"]["ports"] == ["${BIND_ADDRESS:-127.0.0.1}:${DASHBOARD_PORT:-3001}:3001"]
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "postgres-data" in document["volumes"]
    assert "proxy-data:/data" in services["proxy"]["volumes"], "the spool and the generated key survive restarts"

    chart_values = yaml.safe_load((REPO / "charts" / "prompttrain" / "values.yaml").read_text())
    assert chart_values["proxy"]["image"]["repository"] == "prompttrain-proxy"
    assert chart_values["dashboard"]["image"]["repository"] == "prompttrain-dashboard"

    offline = _load(OFFLINE_FILE)["services"]
    assert offline["postgres"]["build"]["context"] == "manifests/dev/postgresql"
    assert (REPO / "manifests" / "dev" / "postgresql" / "Dockerfile").is_file()
    assert offline["fake-upstream"]["command"][0] == "fake-upstream"
    assert offline["fake-upstream"]["build"]["dockerfile"] == "Dockerfile.proxy"
    assert _service_environment(offline["proxy"])["UPSTREAM_URL"] == "http://fake-upstream:9100"


def test_compose_accepts_the_files(tmp_path: Path) -> None:
    command = require_compose()
    environment = _environment({})
    # Not the repository's .env (a developer's settings): an empty one (v1 wants a regular file, not /dev/null).
    env_file = tmp_path / "empty.env"
    env_file.touch()
    for files in (["-f", str(COMPOSE_FILE)], ["-f", str(COMPOSE_FILE), "-f", str(OFFLINE_FILE)]):
        for profile in ([], ["--profile", "pgadmin"]):
            result = subprocess.run(
                [*command, *files, *profile, "--env-file", str(env_file), "config", "--quiet"],
                cwd=REPO,
                env=environment,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, (files, profile, result.stderr)


# --- the stack --------------------------------------------------------------------------------------------------


class Stack:
    """One Compose project (both files) with its own name, ports and credentials directory."""

    def __init__(self, command: tuple[str, ...], credentials: Path, env_file: Path) -> None:
        self.command = command
        self.env_file = env_file
        self.project = f"pt-compose-{uuid.uuid4().hex[:10]}"
        self.proxy_url = f"http://127.0.0.1:{free_port()}"
        self.dashboard_url = f"http://127.0.0.1:{free_port()}"
        self.dashboard_key = secrets.token_urlsafe(24)
        self.telemetry_endpoint = "http://fake-upstream:9100/telemetry-sink"
        self.timings: dict[str, float] = {}
        self.environment = _environment(
            {
                "BASE_IMAGE": BASE_IMAGE,
                "PROXY_IMAGE": f"prompttrain-proxy:{TEST_TAG}",
                "DASHBOARD_IMAGE": f"prompttrain-dashboard:{TEST_TAG}",
                "PROXY_PORT": self.proxy_url.rsplit(":", 1)[1],
                "DASHBOARD_PORT": self.dashboard_url.rsplit(":", 1)[1],
                "POSTGRES_PASSWORD": secrets.token_hex(12),
                "CREDENTIALS_DIR": str(credentials),
                "DASHBOARD_API_KEY": self.dashboard_key,
                "TELEMETRY_ENDPOINT": self.telemetry_endpoint,
                # Idle containers stop at once on SIGTERM; this only bounds a hung one.
                "PROXY_STOP_GRACE_PERIOD": "30s",
            }
        )

    def run(self, *args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = ["-f", str(COMPOSE_FILE), "-f", str(OFFLINE_FILE)]
        result = subprocess.run(
            [*self.command, *files, "--project-name", self.project, "--env-file", str(self.env_file), *args],
            cwd=REPO,
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(self.command)} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{self.logs()}"
            )
        return result

    def timed(self, label: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        result = self.run(*args, timeout=timeout)
        self.timings[label] = time.monotonic() - started
        return result

    def logs(self) -> str:
        try:
            result = self.run("logs", "--no-color", "--tail", "60", check=False, timeout=60)
            return result.stdout[-8000:]
        except subprocess.TimeoutExpired:
            return "(compose logs timed out)"

    def container(self, service: str) -> dict[str, Any]:
        labels = [f"label=com.docker.compose.project={self.project}", f"label=com.docker.compose.service={service}"]
        ids = docker("ps", "--all", "--quiet", *[part for label in labels for part in ("--filter", label)]).stdout
        [container_id] = ids.split()
        inspected: dict[str, Any] = json.loads(docker("inspect", container_id).stdout)[0]
        return inspected

    def volumes(self) -> set[str]:
        listed = docker("volume", "ls", "--quiet", "--filter", f"label=com.docker.compose.project={self.project}")
        return set(listed.stdout.split())

    def wait_serving(self, label: str) -> None:
        started = time.monotonic()

        def serving() -> bool:
            try:
                proxy = httpx.get(self.proxy_url + "/health/ready", timeout=2)
                dashboard = httpx.get(self.dashboard_url + "/health", timeout=2)
            except httpx.HTTPError:
                return False
            return proxy.status_code == 200 and dashboard.status_code == 200

        def healthy() -> bool:
            # Docker's own health checks (what `depends_on: service_healthy` and `ps` go by), not only our probe.
            return all(self.container(name)["State"]["Health"]["Status"] == "healthy" for name in HEALTH_CHECKED)

        try:
            wait_until(serving, timeout=90, interval=0.5)
            wait_until(healthy, timeout=60, interval=0.5)
        except AssertionError:
            raise AssertionError(
                f"the stack did not serve and report healthy within 150 s:\n{self.run('ps').stdout}\n{self.logs()}"
            ) from None
        self.timings[label] = time.monotonic() - started

    def listed(self) -> list[dict[str, Any]]:
        response = httpx.get(self.dashboard_url + "/api/requests", headers={"X-Dashboard-Key": self.dashboard_key})
        assert response.status_code == 200, response.text
        requests: list[dict[str, Any]] = response.json()["requests"]
        return requests


def _credentials(directory: Path, client_key: str) -> Path:
    """A train with client keys and an API-key account, readable by the containers' uid 10001."""
    (directory / "trains").mkdir(parents=True)
    (directory / "accounts").mkdir()
    (directory / "trains" / "default.json").write_text('{"auth": "passthrough"}\n')
    train = {
        "auth": "client-keys",
        "client_key_sha256": [hashlib.sha256(client_key.encode()).hexdigest()],
        "accounts": ["compose-api"],
        "default_account": "compose-api",
    }
    (directory / "trains" / "compose.json").write_text(json.dumps(train))
    account = {"type": "api_key", "api_key": "sk-ant-api03-compose-test-not-a-real-key"}
    (directory / "accounts" / "compose-api.credentials.json").write_text(json.dumps(account))
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Stack, str]]:
    require_docker()
    command = require_compose()
    client_key = "pt-compose-" + secrets.token_urlsafe(16)
    env_file = tmp_path / "empty.env"  # not the repository's .env
    env_file.touch()
    stack = Stack(command, _credentials(tmp_path / "credentials", client_key), env_file)
    try:
        yield stack, client_key
    finally:
        started = time.monotonic()
        stack.run("down", "--volumes", "--remove-orphans", "--timeout", "30", check=False, timeout=180)
        stack.timings["cleanup (down -v)"] = time.monotonic() - started
        print(
            f"\ncompose ({' '.join(command)}) timings:", {key: round(value, 1) for key, value in stack.timings.items()}
        )


@pytest.mark.timeout(600)
def test_compose_up_records_a_request_and_keeps_it_across_down_and_up(stack: tuple[Stack, str]) -> None:
    compose, client_key = stack
    started = time.monotonic()
    compose.timed("build (5 services, cached layers reused)", "build", timeout=900)
    compose.timed("up -d", "up", "--detach")
    compose.wait_serving("healthy after up")

    migrate = compose.container("migrate")["State"]
    assert (migrate["Status"], migrate["ExitCode"]) == ("exited", 0)
    proxy = compose.container("proxy")
    mounts = {mount["Destination"]: mount for mount in proxy["Mounts"]}
    assert mounts["/credentials"]["RW"] is False, "the credentials directory is mounted read-only"
    assert mounts["/data"]["Type"] == "volume"
    assert proxy["HostConfig"]["ReadonlyRootfs"] is True
    assert f"TELEMETRY_ENDPOINT={compose.telemetry_endpoint}" in proxy["Config"]["Env"]
    assert not any(entry.startswith("UPSTREAM_READ_TIMEOUT_SECONDS=") for entry in proxy["Config"]["Env"])
    published = {binding["HostIp"] for binding in proxy["NetworkSettings"]["Ports"]["3000/tcp"]}
    assert published == {"127.0.0.1"}

    answer = httpx.post(
        compose.proxy_url + "/v1/messages",
        headers={"train-id": "compose", "x-api-key": client_key, "anthropic-version": "2023-06-01"},
        json={"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["content"][0]["type"] == "text"
    request_id = answer.headers["x-prompttrain-request-id"]

    assert httpx.get(compose.dashboard_url + "/api/requests").status_code == 401, "DASHBOARD_API_KEY is in force"

    def recorded() -> bool:
        return any(row["request_id"] == request_id for row in compose.listed())

    wait_until(recorded, timeout=20, interval=0.25)
    [row] = [row for row in compose.listed() if row["request_id"] == request_id]
    assert (row["train_id"], row["account_id"], row["status_code"]) == ("compose", "compose-api", 200)

    def telemetry_attempted() -> bool:
        text = httpx.get(compose.proxy_url + "/metrics").text
        counts = re.findall(r'^prompttrain_telemetry_events_total\{result="(?:sent|failed)"\} (\S+)$', text, re.M)
        return sum(float(count) for count in counts) >= 1

    wait_until(telemetry_attempted, timeout=20, interval=0.5)
    compose.timings["first request recorded"] = time.monotonic() - started

    volumes = compose.volumes()
    assert f"{compose.project}_postgres-data" in volumes, volumes
    compose.timed("down (keeps volumes)", "down", "--timeout", "30")
    assert compose.volumes() == volumes, "`down` without -v keeps the database"
    compose.timed("up -d again", "up", "--detach")
    compose.wait_serving("healthy after second up")
    assert compose.container("migrate")["State"]["ExitCode"] == 0, "migrations are idempotent"
    assert recorded(), "the request recorded before the restart is still listed"

    compose.timed("down -v", "down", "--volumes", "--timeout", "30")
    assert compose.volumes() == set(), "`down -v` deletes the volumes"
