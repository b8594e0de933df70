"""Shared by the dashboard's browser and API tests: a `prompttrain dashboard` process, rows written straight into
the tables (for data the proxy cannot produce yet, such as linked conversations), and NOTIFY."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from prompttrain.settings import normalise_database_url
from prompttrain.storage.engine import create_engine
from prompttrain.storage.migrate import migrate
from prompttrain.storage.tables import api_requests, request_payloads
from prompttrain.storage.writer import NOTIFY_CHANNEL
from tests.helpers import REPO, Service, free_port, run_async

DASHBOARD_KEY = "test-dashboard-key-0123456789"
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"


def start_dashboard(tmp_path: Path, database_url: str, credentials_dir: Path | None = None, **env: Any) -> Service:
    port = free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    environment = {
        "DATABASE_URL": database_url,
        "CREDENTIALS_DIR": str(credentials_dir or tmp_path / "credentials"),
        "DASHBOARD_POLL_SECONDS": "0.2",
        "LOG_LEVEL": "info",
    }
    if "dashboard_open" not in env and "dashboard_trusted_header" not in env:
        environment["DASHBOARD_API_KEY"] = DASHBOARD_KEY
    environment.update({key.upper(): str(value) for key, value in env.items()})
    service = Service(
        "dashboard", ["dashboard", "--host", "127.0.0.1", "--port", str(port)], environment, port, tmp_path
    )
    return service.wait_ready("/health")


def migrate_database(database_url: str) -> None:
    run_async(lambda: migrate(normalise_database_url(database_url)))


def request_row(**fields: Any) -> dict[str, Any]:
    """An api_requests row with plausible defaults; `fields` override them."""
    row: dict[str, Any] = {
        "request_id": uuid.uuid4(),
        "timestamp": datetime.now(UTC),
        "train_id": "default",
        "account_id": "passthrough",
        "method": "POST",
        "path": "/v1/messages",
        "model": "claude-sonnet-4-5",
        "stream": True,
        "status_code": 200,
        "outcome": "completed",
        "duration_ms": 1200.0,
        "first_token_ms": 300.0,
        "input_tokens": 1000,
        "output_tokens": 200,
        "cache_read_input_tokens": 5000,
        "cache_creation_input_tokens": 0,
        "tool_call_count": 0,
        "request_bytes": 100,
        "cost_usd": 0.01,
        "message_count": 1,
    }
    row.update(fields)
    return row


def insert(database_url: str, rows: Iterable[Mapping[str, Any]], bodies: Mapping[uuid.UUID, Any] | None = None) -> None:
    """Insert request rows and, for the ids in `bodies`, their request body (stored raw) and response."""
    rows = list(rows)

    async def run() -> None:
        engine = create_engine(normalise_database_url(database_url), pool_size=1)
        try:
            async with engine.begin() as connection:
                for row in rows:  # one by one: an executemany would take its columns from the first row only
                    await connection.execute(sa.insert(api_requests).values(**row))
                payloads = []
                for row in rows:
                    if bodies and row["request_id"] in bodies:
                        request_body, response_body = bodies[row["request_id"]]
                        payloads.append(
                            {
                                "request_id": row["request_id"],
                                "timestamp": row["timestamp"],
                                "raw_request_body": orjson.dumps(request_body).decode(),
                                "response_body": response_body,
                            }
                        )
                if payloads:
                    await connection.execute(sa.insert(request_payloads), payloads)
        finally:
            await engine.dispose()

    run_async(run)


def notify(database_url: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """What the writer sends after a committed batch."""
    payload = {
        "requests": [
            {"id": str(row["request_id"]), "train": row["train_id"], "conversation": str(row.get("conversation_id"))}
            for row in rows
        ],
        "more": 0,
    }

    async def run() -> None:
        engine = create_engine(normalise_database_url(database_url), pool_size=1)
        try:
            async with engine.begin() as connection:
                await connection.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, orjson.dumps(payload).decode())))
        finally:
            await engine.dispose()

    run_async(run)


def conversation_rows(conversation_id: uuid.UUID, start: datetime | None = None) -> list[dict[str, Any]]:
    """A conversation of five requests: three on main, the second of which starts a sub-agent (`subtask_1`, two
    requests), as conversation linking records them (reference §4.5)."""
    start = start or datetime.now(UTC) - timedelta(minutes=10)
    ids = [uuid.uuid4() for _ in range(5)]
    task = [
        {
            "id": "toolu_agent_1",
            "name": "Task",
            "input": {"description": "Survey the test suite", "prompt": "List the tests"},
        }
    ]

    def row(index: int, **fields: Any) -> dict[str, Any]:
        values = {"branch_id": "main", **fields}
        return request_row(
            request_id=ids[index],
            timestamp=start + timedelta(seconds=20 * index),
            conversation_id=conversation_id,
            **values,
        )

    return [
        row(0, message_count=1),
        row(1, parent_request_id=ids[0], message_count=3, task_tool_invocation=task, tool_call_count=1),
        row(2, branch_id="subtask_1", is_subtask=True, parent_task_request_id=ids[1], message_count=1),
        row(3, branch_id="subtask_1", is_subtask=True, parent_task_request_id=ids[1], parent_request_id=ids[2]),
        row(4, parent_request_id=ids[1], message_count=5),
    ]


def create_database(admin_url: str, created: list[str]) -> str:
    """A fresh database next to `admin_url`'s, recorded in `created` (the session drops those at its end)."""
    name = f"pt_test_{uuid.uuid4().hex[:12]}"

    async def run() -> None:
        import asyncpg

        connection = await asyncpg.connect(admin_url)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    run_async(run)
    created.append(name)
    return f"{admin_url.rpartition('/')[0]}/{name}"
