"""Fixtures shared by every test: databases (SQLite file, real PostgreSQL), the fake upstream, proxy processes."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.helpers import IN_CI, FakeUpstream, Service, free_port, write_json

POSTGRES_ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres:postgres@127.0.0.1:5432/postgres")
ENCRYPTION_KEY = "test-encryption-key-shared-by-replicas"


def _postgres_reachable() -> str | None:
    async def probe() -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=3)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as error:  # noqa: BLE001 - any failure means "not reachable"; reported below
        return f"{type(error).__name__}: {error}"
    return None


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    problem = _postgres_reachable()
    if problem is not None:
        message = f"PostgreSQL not reachable at TEST_DATABASE_URL ({problem})"
        if IN_CI:
            pytest.fail(message + " — CI must start it (.ci/run)")
        pytest.skip(message)
    return POSTGRES_ADMIN_URL


async def _admin(admin_url: str, sql: str) -> None:
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def _postgres_databases(postgres_admin_url: str) -> Iterator[list[str]]:
    """Databases created by tests; dropped at the end of the session, after every process using them stopped."""
    names: list[str] = []
    yield names
    for name in names:
        asyncio.run(_admin(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def postgres_url(postgres_admin_url: str, _postgres_databases: list[str]) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    name = f"pt_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(postgres_admin_url, f'CREATE DATABASE "{name}"'))
    _postgres_databases.append(name)
    base, _, _ = postgres_admin_url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'prompttrain.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def fake_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeUpstream]:
    port = free_port()
    service = Service(
        "fake-upstream",
        ["fake-upstream", "--host", "127.0.0.1", "--port", str(port)],
        {},
        port,
        tmp_path_factory.mktemp("fake-upstream"),
    )
    service.wait_ready("/v1/models")
    fake = FakeUpstream(service)
    yield fake
    fake.close()
    service.stop()


@pytest.fixture
def upstream(fake_upstream: FakeUpstream) -> FakeUpstream:
    """The session's fake upstream, emptied for this test."""
    fake_upstream.reset()
    return fake_upstream


@pytest.fixture
def credentials_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "credentials"
    write_json(directory / "trains" / "default.json", {"auth": "passthrough"})
    return directory


ProxyFactory = Callable[..., Service]


@pytest.fixture
def start_proxy(tmp_path: Path, fake_upstream: FakeUpstream, credentials_dir: Path) -> Iterator[ProxyFactory]:
    """Start `prompttrain proxy` processes against the fake upstream; all are stopped after the test."""
    started: list[Service] = []

    def start(database_url: str | None = None, **env: Any) -> Service:
        port = free_port()
        environment = {
            "UPSTREAM_URL": fake_upstream.url,
            "OAUTH_TOKEN_URL": f"{fake_upstream.url}/v1/oauth/token",
            "CREDENTIALS_DIR": str(credentials_dir),
            "CREDENTIALS_RELOAD_SECONDS": "0.2",
            "CREDENTIALS_ENCRYPTION_KEY": ENCRYPTION_KEY,
            "DATA_DIR": str(tmp_path / "data"),
            "LOG_LEVEL": "info",
            "MIGRATE_ON_START": "true",
            "WRITER_FLUSH_SECONDS": "0.02",
        }
        if database_url is None:
            environment["STORAGE_ENABLED"] = "false"
        else:
            environment["DATABASE_URL"] = database_url
        environment.update({key.upper(): str(value) for key, value in env.items()})
        service = Service("proxy", ["proxy", "--host", "127.0.0.1", "--port", str(port)], environment, port, tmp_path)
        started.append(service)
        return service.wait_ready()

    yield start
    for service in started:
        service.stop()
