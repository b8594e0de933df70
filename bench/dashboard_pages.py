"""How fast the dashboard renders its heaviest pages with 100,000 recorded requests in PostgreSQL.

Method
------
1. Creates a temporary database on the local server (``--admin-url``; dropped at the end), migrates it with the
   project's migrations and creates the daily partitions the writer would have created over the last 8 days.
2. Bulk-inserts ``--rows`` synthetic ``api_requests`` rows (COPY) spread over 7 days: 6 trains, 8 accounts,
   4 models, 3 % errors, conversations of 20-80 requests with sub-agent and compaction branches, and one
   conversation of exactly 300 requests (main plus four ``subtask_N`` branches); then ANALYZE.
3. Starts ``prompttrain dashboard`` as a subprocess (a real uvicorn server, key authentication) and measures, over
   HTTP with a keep-alive client, ``--samples`` renders of each page after 3 unmeasured ones: the requests list
   (first page, 20 pages deep by keyset cursor, filtered by train), the 300-request conversation (tree and
   timeline), the overview (24 h and 7 d ranges) and their JSON equivalents. The baseline, measured in the same
   run, is ``GET /health`` (one HTTP round trip and one ``SELECT 1``): the ratio says what a page costs above it.

The target is p50 < 150 ms for the requests list, the 300-request conversation and the overview. The exit status
is 0 whether it passes or not: this is a benchmark, not a test.

Usage: ``.venv/bin/python bench/dashboard_pages.py [--rows 100000] [--samples 30] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from prompttrain.storage.engine import create_engine  # noqa: E402
from prompttrain.storage.migrate import migrate  # noqa: E402
from prompttrain.storage.partitions import ensure_partitions  # noqa: E402

PROMPTTRAIN = str(Path(sys.executable).with_name("prompttrain"))
KEY = "bench-dashboard-key-0123456789"
TARGET_MS = 150.0
COLUMNS = (
    "request_id",
    "timestamp",
    "train_id",
    "account_id",
    "method",
    "path",
    "model",
    "stream",
    "status_code",
    "outcome",
    "error_type",
    "duration_ms",
    "first_token_ms",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "tool_call_count",
    "request_bytes",
    "payload_shed",
    "conversation_id",
    "branch_id",
    "is_subtask",
    "parent_request_id",
    "parent_task_request_id",
    "message_count",
    "cost_usd",
    "cost_estimated",
    "ratelimit_status",
    "ratelimit_5h_utilization",
    "ratelimit_5h_reset",
    "ratelimit_7d_utilization",
    "ratelimit_7d_reset",
)
TRAINS = [f"team-{name}" for name in ("web", "data", "infra", "mobile", "ml", "docs")]
ACCOUNTS = [f"account-{index}" for index in range(8)]
MODELS = ["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5", "claude-sonnet-4-6"]


def record(
    rng: random.Random,
    when: datetime,
    *,
    conversation: uuid.UUID | None,
    branch: str = "main",
    parent: uuid.UUID | None = None,
    task_parent: uuid.UUID | None = None,
    train: str | None = None,
    account: str | None = None,
) -> tuple[Any, ...]:
    failed = rng.random() < 0.03
    input_tokens, output_tokens = rng.randint(10, 4000), rng.randint(20, 3000)
    reset = when.replace(minute=0, second=0, microsecond=0) + timedelta(hours=5)
    values = {
        "request_id": uuid.uuid4(),
        "timestamp": when,
        "train_id": train or rng.choice(TRAINS),
        "account_id": account or rng.choice(ACCOUNTS),
        "method": "POST",
        "path": "/v1/messages",
        "model": rng.choice(MODELS),
        "stream": True,
        "status_code": 529 if failed else 200,
        "outcome": "upstream_error" if failed else "completed",
        "error_type": "overloaded_error" if failed else None,
        "duration_ms": rng.uniform(300, 60000),
        "first_token_ms": rng.uniform(200, 3000),
        "input_tokens": 0 if failed else input_tokens,
        "output_tokens": 0 if failed else output_tokens,
        "cache_read_input_tokens": 0 if failed else rng.randint(0, 150000),
        "cache_creation_input_tokens": 0 if failed else rng.randint(0, 5000),
        "tool_call_count": rng.randint(0, 3),
        "request_bytes": rng.randint(2000, 400000),
        "payload_shed": False,
        "conversation_id": conversation,
        "branch_id": branch if conversation else None,
        "is_subtask": branch.startswith("subtask_"),
        "parent_request_id": parent,
        "parent_task_request_id": task_parent,
        "message_count": rng.randint(1, 300),
        "cost_usd": 0.0 if failed else (input_tokens * 3 + output_tokens * 15) / 1e6,
        "cost_estimated": False,
        "ratelimit_status": "allowed",
        "ratelimit_5h_utilization": rng.random(),
        "ratelimit_5h_reset": reset,
        "ratelimit_7d_utilization": rng.random(),
        "ratelimit_7d_reset": reset + timedelta(days=3),
    }
    return tuple(values[name] for name in COLUMNS)


def conversation_records(
    rng: random.Random, conversation: uuid.UUID, start: datetime, size: int, subagents: int
) -> list[tuple[Any, ...]]:
    train, account = rng.choice(TRAINS), rng.choice(ACCOUNTS)
    rows: list[tuple[Any, ...]] = []
    when = start
    previous: uuid.UUID | None = None
    main_ids: list[uuid.UUID] = []
    per_branch = max((size // 2) // max(subagents, 1), 1) if subagents else 0
    spawn_points = sorted(rng.sample(range(2, size - per_branch * subagents), subagents)) if subagents else []
    number = 0
    while len(rows) < size:
        when += timedelta(seconds=rng.uniform(2, 40))
        row = record(rng, when, conversation=conversation, parent=previous, train=train, account=account)
        rows.append(row)
        previous = row[0]
        main_ids.append(previous)
        if spawn_points and len(rows) >= spawn_points[0]:
            spawn_points.pop(0)
            number += 1
            branch_parent: uuid.UUID | None = None
            for _ in range(min(per_branch, size - len(rows))):
                when += timedelta(seconds=rng.uniform(1, 20))
                sub = record(
                    rng,
                    when,
                    conversation=conversation,
                    branch=f"subtask_{number}",
                    parent=branch_parent,
                    task_parent=main_ids[-1],
                    train=train,
                    account=account,
                )
                rows.append(sub)
                branch_parent = sub[0]
    return rows[:size]


async def seed(database_url: str, rows: int, rng: random.Random) -> uuid.UUID:
    engine = create_engine(database_url, pool_size=1)
    now = datetime.now(UTC)
    # The last 8 days, today and tomorrow.
    await ensure_partitions(engine, today=(now - timedelta(days=8)).date(), days_ahead=9)
    await engine.dispose()
    target = uuid.uuid4()
    records = conversation_records(rng, target, now - timedelta(hours=3), 300, 4)
    while len(records) < rows:
        start = now - timedelta(days=7) + timedelta(seconds=rng.uniform(0, 7 * 86400 - 3600))
        if rng.random() < 0.1:
            records.append(record(rng, start, conversation=None))
            continue
        size = min(rng.randint(20, 80), rows - len(records))
        subagents = rng.choice((0, 0, 1, 2)) if size > 10 else 0
        records.extend(conversation_records(rng, uuid.uuid4(), start, size, subagents))
    connection = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        await connection.copy_records_to_table("api_requests", records=records[:rows], columns=list(COLUMNS))
        await connection.execute("ANALYZE api_requests")
    finally:
        await connection.close()
    return target


def measure(client: httpx.Client, path: str, samples: int) -> dict[str, float]:
    for _ in range(3):
        client.get(path).raise_for_status()
    timings = []
    for _ in range(samples):
        started = time.perf_counter()
        response = client.get(path)
        timings.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    timings.sort()
    return {
        "p50_ms": statistics.median(timings),
        "p95_ms": timings[min(len(timings) - 1, int(len(timings) * 0.95))],
        "bytes": float(len(response.content)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("TEST_DATABASE_URL", "postgresql://postgres:postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--seed", type=int, default=7)
    arguments = parser.parse_args()

    name = f"pt_bench_{uuid.uuid4().hex[:10]}"
    base = arguments.admin_url.rpartition("/")[0]
    database_url = f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://")

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(arguments.admin_url)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        asyncio.run(migrate(database_url))
        started = time.perf_counter()
        conversation = asyncio.run(seed(database_url, arguments.rows, random.Random(arguments.seed)))
        print(f"seeded {arguments.rows} requests in {time.perf_counter() - started:.1f}s", flush=True)
        results = run_pages(database_url, conversation, arguments.samples)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    report(results, arguments)


def run_pages(database_url: str, conversation: uuid.UUID, samples: int) -> dict[str, dict[str, float]]:
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        environment = {
            **os.environ,
            "DATABASE_URL": database_url,
            "DASHBOARD_API_KEY": KEY,
            "CREDENTIALS_DIR": directory,
            "LOG_LEVEL": "warning",
        }
        with open(Path(directory) / "dashboard.log", "wb") as log:
            process = subprocess.Popen(
                [PROMPTTRAIN, "dashboard", "--host", "127.0.0.1", "--port", str(port)],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-Dashboard-Key": KEY}) as client:
                    wait_ready(client)
                    return pages(client, conversation, samples)
            finally:
                process.terminate()
                process.wait(timeout=30)


def pages(client: httpx.Client, conversation: uuid.UUID, samples: int) -> dict[str, dict[str, float]]:
    cursor = None
    for _ in range(20):
        page = client.get("/api/requests", params={"limit": 50, **({"before": cursor} if cursor else {})}).json()
        cursor = page["next_cursor"]
    paths = {
        "baseline: /health": "/health",
        "requests list": "/requests",
        "requests list, page 21 (keyset)": f"/requests?before={cursor}",
        "requests list, one train": f"/requests?train_id={TRAINS[2]}",
        "conversation (300 requests), tree": f"/conversations/{conversation}",
        "conversation (300 requests), timeline": f"/conversations/{conversation}?view=timeline",
        "overview, 24 h": "/?range=24h",
        "overview, 7 d (all rows)": "/?range=7d",
        "conversations list": "/conversations",
        "token usage": "/token-usage",
        "api: /api/requests": "/api/requests",
        "api: /api/conversations/{id}": f"/api/conversations/{conversation}",
        "api: /api/overview?range=7d": "/api/overview?range=7d",
    }
    return {label: measure(client, path, samples) for label, path in paths.items()}


def report(results: dict[str, dict[str, float]], arguments: argparse.Namespace) -> None:
    baseline = results["baseline: /health"]["p50_ms"]
    print(
        f"\n{arguments.rows} requests in PostgreSQL, {arguments.samples} samples per page "
        f"(target p50 < {TARGET_MS:.0f} ms)"
    )
    print(f"{'page':42} {'p50 ms':>8} {'p95 ms':>8} {'x /health':>10} {'KiB':>8}")
    for label, result in results.items():
        ratio = result["p50_ms"] / baseline if baseline else 0.0
        flag = "" if label.startswith(("baseline", "api")) or result["p50_ms"] < TARGET_MS else "  over target"
        print(
            f"{label:42} {result['p50_ms']:8.1f} {result['p95_ms']:8.1f} {ratio:10.1f} "
            f"{result['bytes'] / 1024:8.1f}{flag}"
        )
    if arguments.json:
        arguments.json.write_text(json.dumps({"rows": arguments.rows, "results": results}, indent=2))


def wait_ready(client: httpx.Client) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("the dashboard did not start")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    main()
