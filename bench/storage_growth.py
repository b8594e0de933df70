"""How much database space a long Claude Code conversation takes once recorded, compared with the bodies sent.

Method
------
Claude Code resends the whole conversation every turn, so storing each request body whole grows quadratically with
the conversation's length. The proxy stores bodies content-addressed (``storage/content.py``): every message, every
``system`` block and every tool is a row of ``content_blobs`` stored once, and ``request_payloads`` keeps a small
template plus the 32-byte digests of the blobs. This benchmark checks that the database grows about linearly:

1. It starts the fake upstream and ``prompttrain proxy`` (recording on) as subprocesses on free ports, in a
   temporary directory, reusing ``proxy_overhead.Services``. The database is PostgreSQL: by default a temporary
   database created on the local server (``--admin-url``), migrated with ``prompttrain migrate`` and dropped at
   the end; or the database given with ``--database-url``. With ``--sqlite`` the same replay is then recorded a
   second time, by a second proxy, into a fresh SQLite file.
2. It replays one synthetic but realistically shaped Claude Code conversation, sequentially, with
   ``"stream": true``: a ``system`` list (a small billing-header-like block, the identity line, a ~10 KB prompt
   block), ~15 tools (~30 KB), and ``messages`` growing each turn by ~``--turn-bytes`` (a user prompt, an
   assistant message with text and a ``tool_use`` block, a user message with the ``tool_result``). The text is
   real English (docstrings) and the tool results real code (source lines in ``cat -n`` form), both taken from
   the Python standard library, so compression ratios are realistic rather than flattered by a tiny vocabulary.
   Like Claude Code, the last block of the last message carries ``cache_control`` (so the previous last message
   is stored a second time without it), and bodies are serialised compactly with non-ASCII characters kept as
   UTF-8 (``JSON.stringify`` style), so they round-trip. Before each request the fake upstream is scripted to
   answer with the next turn's assistant message, so the recorded responses have realistic sizes.
3. It waits until every request has its ``api_requests`` and ``request_payloads`` row, then measures, per table
   and over every partition (``pg_partition_tree``): heap (main fork), free-space and visibility maps, TOAST
   (table and its index) and indexes; the sum is ``pg_total_relation_size``. The same measurement taken right
   after migration (empty daily partitions, which cost pages for their indexes) is reported as the fixed part,
   and one taken halfway through the replay gives the marginal growth per turn in the second half. The ratio
   compared with the target is total / sum of request bodies sent (<= 10 %: linear growth).
4. For comparison with storing every body whole, it inserts the same bodies into a throw-away table with a single
   ``text`` column in the same database (TOAST-compressed with the server's ``default_toast_compression``),
   measures it and drops it. SQLite stores text uncompressed, so its naive cost is the sum itself.
5. Correctness: for ``--verify`` random turns, ``load_payload`` (through the project's async engine) must return
   exactly the bytes that were sent; bodies that fell back to raw storage (``raw_request_body IS NOT NULL``) are
   counted.

SQLite sizes are the file plus its WAL after the proxy stopped and ``PRAGMA wal_checkpoint(TRUNCATE)``, broken
down per table (with its indexes) with the ``dbstat`` virtual table.

The exit status is 0 whether the target passes or not: this is a benchmark, not a test.

Usage: ``.venv/bin/python bench/storage_growth.py [--turns 100] [--turn-bytes 2048] [--sqlite] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import importlib.util
import inspect
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from prompttrain.settings import normalise_database_url
from prompttrain.storage.engine import create_engine
from prompttrain.storage.queries import load_payload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_overhead import HOST, MODEL, Services, asyncpg_url

TARGET_RATIO = 0.10
TABLES = ("api_requests", "request_payloads", "content_blobs")
DEFAULT_ADMIN_URL = "postgresql://postgres:postgres@127.0.0.1:5432/postgres"
SYSTEM_PROMPT_BYTES = 10_000
TOOL_BYTES = 2_000  # per tool: 15 tools, ~30 KB
CLAUDE_CODE_TOOLS = (
    "Task",
    "Bash",
    "Glob",
    "Grep",
    "ExitPlanMode",
    "Read",
    "Edit",
    "Write",
    "NotebookEdit",
    "WebFetch",
    "TodoWrite",
    "WebSearch",
    "BashOutput",
    "KillShell",
    "SlashCommand",
)
# Standard-library modules whose source lines (tool results) and docstrings (prose) make up the conversation.
CORPUS_MODULES = (
    "argparse",
    "asyncio.base_events",
    "collections",
    "concurrent.futures._base",
    "dataclasses",
    "email.message",
    "functools",
    "http.client",
    "inspect",
    "json.decoder",
    "logging",
    "pathlib",
    "shutil",
    "subprocess",
    "tempfile",
    "textwrap",
    "typing",
    "unittest.case",
    "zipfile",
)
SESSION_ID = "5f0c1e9a-3b7d-4c1e-9a55-0d3c2b1a9e77"
REQUEST_HEADERS = {
    "content-type": "application/json",
    "accept": "application/json",
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
    "anthropic-dangerous-direct-browser-access": "true",
    "user-agent": "claude-cli/2.0.14 (external, cli)",
    "x-app": "cli",
    "x-claude-code-session-id": SESSION_ID,
    "x-stainless-lang": "js",
    "x-stainless-package-version": "0.60.0",
    "x-stainless-os": "Linux",
    "x-stainless-arch": "x64",
    "x-stainless-runtime": "node",
    "x-stainless-runtime-version": "v22.19.0",
    "x-stainless-retry-count": "0",
    "x-stainless-timeout": "600",
    "x-api-key": "anything",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compact(value: Any) -> bytes:
    """What Claude Code sends: JSON.stringify output, no spaces, non-ASCII kept as UTF-8."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------------------------------------
# The conversation
# --------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Real text to fill the conversation with: standard-library source lines and docstring sentences."""

    files: list[tuple[str, list[str]]]
    sentences: list[str]

    @classmethod
    def load(cls) -> Corpus:
        files: list[tuple[str, list[str]]] = []
        sentences: list[str] = []
        for name in CORPUS_MODULES:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
                continue
            source = Path(spec.origin).read_text(encoding="utf-8")
            files.append((name.replace(".", "/") + ".py", source.splitlines()))
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    docstring = ast.get_docstring(node)
                    if docstring:
                        sentences.extend(_sentences(docstring))
        if not files or not sentences:
            raise RuntimeError("could not read the standard library's sources for the corpus")
        return cls(files, sentences)

    def prose(self, rng: random.Random, chars: int) -> str:
        """Consecutive docstring sentences from a random place, about `chars` long."""
        start = rng.randrange(len(self.sentences))
        parts: list[str] = []
        size = 0
        index = start
        while size < chars:
            sentence = self.sentences[index % len(self.sentences)]
            parts.append(sentence)
            size += len(sentence) + 1
            index += 1
        return " ".join(parts)[: max(chars, 1)].rstrip()

    def code(self, rng: random.Random, escaped_bytes: int) -> str:
        """A Read tool result (numbered source lines, `cat -n` style) whose JSON string is ~`escaped_bytes` long."""
        _, lines = rng.choice(self.files)
        number = rng.randrange(max(1, len(lines) - 200))
        out: list[str] = []
        size = 0
        while size < escaped_bytes:
            line = f"{number + 1:>6}\t{lines[number % len(lines)]}"
            out.append(line)
            size += len(json.dumps(line, ensure_ascii=False))  # the quotes stand for the "\n" escape between lines
            number += 1
        excess = size - escaped_bytes
        if 0 < excess < len(out[-1]) - 7:  # cut the last line short rather than overshoot
            out[-1] = out[-1][:-excess]
        return "\n".join(out)


def _sentences(docstring: str) -> list[str]:
    text = re.sub(r"\s+", " ", inspect.cleandoc(docstring)).strip()
    return [s for s in re.split(r"(?<=[.!?]) ", text) if 20 <= len(s) <= 400 and ">>>" not in s]


def _tool(corpus: Corpus, rng: random.Random, name: str) -> dict[str, Any]:
    properties = {
        f"{word}_{index}": {"type": "string", "description": corpus.prose(rng, 90)}
        for index, word in enumerate(("path", "pattern", "mode", "limit"))
    }
    tool: dict[str, Any] = {
        "name": name,
        "description": "",
        "input_schema": {
            "type": "object",
            "properties": properties,
            "required": list(properties)[:2],
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        },
    }
    tool["description"] = corpus.prose(rng, TOOL_BYTES - len(compact(tool)))
    return tool


def _tool_input(rng: random.Random, name: str, path: str) -> dict[str, Any]:
    if name == "Bash":
        return {"command": f"python -m pytest tests/test_{Path(path).stem}.py -q", "description": "Run the tests"}
    if name == "Grep":
        return {
            "pattern": rng.choice(("def __init__", "raise ", "return self")),
            "path": "Lib",
            "output_mode": "content",
        }
    return {"file_path": f"/home/user/cpython/Lib/{path}"}


@dataclass
class Turn:
    messages: list[dict[str, Any]]  # user prompt, assistant (text + tool_use), user (tool_result)


def build_conversation(turns: int, turn_bytes: int, seed: int) -> tuple[dict[str, Any], list[Turn]]:
    """The request fields that never change, and the messages each turn appends."""
    corpus = Corpus.load()
    rng = random.Random(seed)
    fixed: dict[str, Any] = {
        "model": MODEL,
        "temperature": 1,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0.14.a1b; cc_entrypoint=cli"},
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
            {
                "type": "text",
                "text": corpus.prose(rng, SYSTEM_PROMPT_BYTES),
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "tools": [_tool(corpus, rng, name) for name in CLAUDE_CODE_TOOLS],
        "metadata": {"user_id": f"user_{rng.getrandbits(256):064x}_account__session_{SESSION_ID}"},
        "max_tokens": 32_000,
        "stream": True,
    }
    conversation: list[Turn] = []
    for number in range(turns):
        tool_id = f"toolu_01{rng.getrandbits(96):024x}"
        name = rng.choice(("Read", "Read", "Read", "Bash", "Grep"))
        prompt = [{"type": "text", "text": corpus.prose(rng, turn_bytes * 12 // 100)}]
        if number == 0:  # Claude Code's first message carries the project context in a system reminder
            reminder = "<system-reminder>\n" + corpus.prose(rng, 1500) + "\n</system-reminder>"
            prompt.insert(0, {"type": "text", "text": reminder})
        text = corpus.prose(rng, turn_bytes * 22 // 100)
        if number % 3 == 0:
            text = text.replace(", ", " — ", 1) + " →"
        path, _ = rng.choice(corpus.files)
        user = {"role": "user", "content": prompt}
        assistant = {
            "role": "assistant",
            "content": [
                {"type": "text", "text": text},
                {"type": "tool_use", "id": tool_id, "name": name, "input": _tool_input(rng, name, path)},
            ],
        }
        result: dict[str, Any] = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_id}]}
        budget = turn_bytes - len(compact([user, assistant, result])) - len(',"content":""')
        if number == 0:
            budget += len(compact(prompt[0])) + 1  # the reminder comes on top of the turn's bytes
        result["content"][0]["content"] = corpus.code(rng, max(budget, 40))
        conversation.append(Turn([user, assistant, result]))
    return fixed, conversation


def request_bodies(fixed: dict[str, Any], conversation: Sequence[Turn]) -> list[bytes]:
    """Body of request t: everything up to turn t, the last block of the last message marked for caching."""
    bodies: list[bytes] = []
    messages: list[dict[str, Any]] = []
    for turn in conversation:
        messages.extend(turn.messages)
        last = messages[-1]
        *blocks, final = last["content"]
        marked = {**last, "content": [*blocks, {**final, "cache_control": {"type": "ephemeral"}}]}
        body = {
            "model": fixed["model"],
            "messages": [*messages[:-1], marked],
            "temperature": fixed["temperature"],
            "system": fixed["system"],
            "tools": fixed["tools"],
            "metadata": fixed["metadata"],
            "max_tokens": fixed["max_tokens"],
            "stream": fixed["stream"],
        }
        bodies.append(compact(body))
    return bodies


def reply_scripts(conversation: Sequence[Turn], body_sizes: Sequence[int]) -> list[dict[str, Any]]:
    """What the fake upstream answers to request t: the assistant message that request t + 1 carries back."""
    scripts = []
    for number, size in enumerate(body_sizes):
        if number + 1 < len(conversation):
            content = conversation[number + 1].messages[1]["content"]
            stop_reason = "tool_use"
        else:
            content = [{"type": "text", "text": "Done: the tests pass now."}]
            stop_reason = "end_turn"
        usage = {
            "input_tokens": 4,
            "cache_read_input_tokens": max(size - 2_000, 0) // 4,
            "cache_creation_input_tokens": 500,
            "output_tokens": 180,
        }
        scripts.append({"content": content, "stop_reason": stop_reason, "usage": usage, "repeat": 1})
    return scripts


# --------------------------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------------------------


@dataclass
class Replay:
    request_ids: list[uuid.UUID] = field(default_factory=list)
    seconds: float = 0.0


def replay(
    services: Services,
    bodies: Sequence[bytes],
    scripts: Sequence[dict[str, Any]],
    on_turn: Callable[[int, list[uuid.UUID]], None] | None = None,
) -> Replay:
    """Send every body through the proxy, one after another, reading each SSE stream to its end."""
    result = Replay()
    started = time.monotonic()
    fake = f"http://{HOST}:{services.fake_port}/_fake"
    with httpx.Client(timeout=60.0) as client:
        client.post(f"{fake}/reset").raise_for_status()
        for number, (body, script) in enumerate(zip(bodies, scripts, strict=True)):
            client.post(f"{fake}/replies", json={"replies": [script]}).raise_for_status()
            url = f"http://{HOST}:{services.proxy_port}/v1/messages?beta=true"
            with client.stream("POST", url, content=body, headers=REQUEST_HEADERS) as response:
                data = b"".join(response.iter_bytes())
                if response.status_code != 200 or b"message_stop" not in data:
                    raise RuntimeError(f"turn {number + 1}: HTTP {response.status_code}: {data[:300]!r}")
                result.request_ids.append(uuid.UUID(response.headers["x-prompttrain-request-id"]))
            if on_turn is not None:
                on_turn(number + 1, result.request_ids)
    result.seconds = time.monotonic() - started
    return result


# --------------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------------

SIZES_SQL = """
WITH rels AS (
    SELECT t.name, p.relid, p.isleaf
    FROM unnest($1::text[]) AS t(name)
    CROSS JOIN LATERAL pg_partition_tree(t.name::regclass) AS p
    UNION ALL  -- a table that is not partitioned has no partition tree: itself
    SELECT t.name, t.name::regclass, true
    FROM unnest($1::text[]) AS t(name)
    WHERE NOT EXISTS (SELECT FROM pg_partition_tree(t.name::regclass))
)
SELECT name,
       count(*) FILTER (WHERE isleaf) AS partitions,
       count(*) FILTER (WHERE isleaf AND pg_relation_size(relid) > 0) AS nonempty,
       sum(pg_relation_size(relid, 'main')) AS heap,
       sum(pg_relation_size(relid, 'fsm') + pg_relation_size(relid, 'vm')) AS maps,
       sum(pg_table_size(relid) - pg_relation_size(relid, 'main') - pg_relation_size(relid, 'fsm')
           - pg_relation_size(relid, 'vm') - pg_relation_size(relid, 'init')) AS toast,
       sum(pg_indexes_size(relid)) AS indexes,
       sum(pg_total_relation_size(relid)) AS total
FROM rels GROUP BY name
"""
COUNT_SQL = {
    "api_requests": "SELECT count(*) FROM api_requests WHERE request_id = ANY($1::uuid[])",
    "request_payloads": "SELECT count(*) FROM request_payloads WHERE request_id = ANY($1::uuid[])",
}
# Where the bytes of each table go, column by column, as stored (pg_column_size: compressed or TOAST-pointer size
# inline, the compressed size when out of line).
COLUMNS_SQL = {
    "api_requests": """
        SELECT count(*) AS rows, sum(pg_column_size(r.*)) AS row_bytes,
               sum(pg_column_size(request_headers)) AS request_headers,
               sum(pg_column_size(response_headers)) AS response_headers,
               sum(pg_column_size(usage)) AS usage
        FROM api_requests r WHERE request_id = ANY($1::uuid[])""",
    "request_payloads": """
        SELECT count(*) AS rows, sum(pg_column_size(p.*)) AS row_bytes,
               sum(pg_column_size(request_template)) AS template,
               sum(coalesce(pg_column_size(message_refs), 0) + coalesce(pg_column_size(system_refs), 0)
                   + coalesce(pg_column_size(tools_refs), 0)) AS refs,
               sum(octet_length(message_refs)) AS message_refs_raw,
               sum(pg_column_size(response_body)) AS response_body,
               coalesce(sum(pg_column_size(raw_request_body)), 0) AS raw_request_body,
               count(raw_request_body) AS raw_fallbacks
        FROM request_payloads p WHERE request_id = ANY($1::uuid[])""",
    "content_blobs": """
        SELECT count(*) AS rows, sum(pg_column_size(b.*)) AS row_bytes,
               sum(octet_length(content)) AS content_raw, sum(pg_column_size(content)) AS content_stored,
               count(*) FILTER (WHERE octet_length(content) > 2000) AS over_2kb,
               count(*) FILTER (WHERE octet_length(content) <= 2000) AS small,
               coalesce(sum(pg_column_size(content)) FILTER (WHERE octet_length(content) <= 2000), 0) AS small_stored,
               count(*) FILTER (WHERE content LIKE '%"cache_control"%') AS marked,
               coalesce(sum(pg_column_size(content)) FILTER (WHERE content LIKE '%"cache_control"%'), 0)
                   AS marked_stored
        FROM content_blobs b""",
}


@dataclass
class TempDatabase:
    admin_url: str
    name: str = field(default_factory=lambda: f"prompttrain_storage_{os.getpid()}_{secrets.token_hex(3)}")

    @property
    def url(self) -> str:
        return make_url(self.admin_url).set(database=self.name).render_as_string(hide_password=False)

    async def _admin(self, statement: str) -> None:
        connection = await asyncpg.connect(asyncpg_url(self.admin_url))
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    def create(self) -> None:
        asyncio.run(self._admin(f'CREATE DATABASE "{self.name}"'))

    def drop(self) -> None:
        asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))

    def checkpoint(self) -> None:
        """Flush the server's dirty pages now (superuser only; skipped otherwise), so that an earlier run's writes
        are not flushed in the middle of the next timed phase."""
        try:
            asyncio.run(self._admin("CHECKPOINT"))
        except asyncpg.PostgresError as error:
            print(f"(no CHECKPOINT before the timed phase: {error})", file=sys.stderr)


async def pg_sizes(url: str) -> dict[str, dict[str, int]]:
    connection = await asyncpg.connect(asyncpg_url(url))
    try:
        rows = await connection.fetch(SIZES_SQL, list(TABLES))
    finally:
        await connection.close()
    return {row["name"]: {key: int(value or 0) for key, value in row.items() if key != "name"} for row in rows}


async def pg_wait(url: str, ids: Sequence[uuid.UUID], timeout: float) -> dict[str, int]:
    """Poll until every request has its metadata and payload row (or the timeout passes): rows found per table."""
    connection = await asyncpg.connect(asyncpg_url(url))
    try:
        deadline = time.monotonic() + timeout
        while True:
            counts = {table: int(await connection.fetchval(sql, list(ids))) for table, sql in COUNT_SQL.items()}
            if all(count >= len(ids) for count in counts.values()) or time.monotonic() > deadline:
                return counts
            await asyncio.sleep(0.1)
    finally:
        await connection.close()


async def pg_details(url: str, ids: Sequence[uuid.UUID]) -> dict[str, Any]:
    connection = await asyncpg.connect(asyncpg_url(url))
    try:
        columns = {}
        for table, sql in COLUMNS_SQL.items():
            row = await connection.fetchrow(sql, *([list(ids)] if "$1" in sql else []))
            columns[table] = {key: int(value or 0) for key, value in row.items()} if row else {}
        return {
            "columns": columns,
            "server_version": str(await connection.fetchval("SHOW server_version")).split()[0],
            "toast_compression": await connection.fetchval("SHOW default_toast_compression"),
        }
    finally:
        await connection.close()


async def pg_naive(url: str, bodies: Sequence[bytes]) -> dict[str, int]:
    """Every body whole in a one-column text table (TOAST-compressed by the server), measured, then dropped."""
    table = f"storage_growth_naive_{secrets.token_hex(4)}"
    connection = await asyncpg.connect(asyncpg_url(url))
    try:
        await connection.execute(f"CREATE TABLE {table} (body text NOT NULL)")
        try:
            await connection.executemany(
                f"INSERT INTO {table} (body) VALUES ($1)",  # noqa: S608 - a generated table name
                [(body.decode("utf-8"),) for body in bodies],
            )
            row = await connection.fetchrow(
                f"SELECT pg_total_relation_size('{table}') AS total, pg_relation_size('{table}') AS heap, "  # noqa: S608
                f"(SELECT sum(pg_column_size(body)) FROM {table}) AS stored"
            )
            assert row is not None
            return {"total": int(row["total"]), "heap": int(row["heap"]), "stored_values": int(row["stored"] or 0)}
        finally:
            await connection.execute(f"DROP TABLE {table}")
    finally:
        await connection.close()


async def verify(database_url: str, sent: dict[uuid.UUID, bytes]) -> list[dict[str, Any]]:
    """Rebuild each request's body with load_payload and compare it with what was sent."""
    engine = create_engine(normalise_database_url(database_url), pool_size=1)
    checks = []
    try:
        async with engine.connect() as connection:
            for request_id, body in sent.items():
                payload = await load_payload(connection, request_id)
                rebuilt = payload.request_body if payload is not None else None
                checks.append({"request_id": str(request_id), "bytes": len(body), "exact": rebuilt == body})
    finally:
        await engine.dispose()
    return checks


# --------------------------------------------------------------------------------------------------------
# SQLite
# --------------------------------------------------------------------------------------------------------


def sqlite_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return dict.fromkeys(COUNT_SQL, 0)
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as connection:
        try:
            return {
                table: int(connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608
                for table in COUNT_SQL
            }
        except sqlite3.OperationalError:  # not migrated yet
            return dict.fromkeys(COUNT_SQL, 0)


def sqlite_wait(path: Path, expected: int, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    counts = sqlite_counts(path)
    while any(count < expected for count in counts.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
        counts = sqlite_counts(path)
    return counts


def sqlite_sizes(path: Path) -> dict[str, Any]:
    """File sizes after a WAL checkpoint, and bytes per table (its indexes included) from dbstat."""
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        owner = dict(connection.execute("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"))
        tables: dict[str, int] = dict.fromkeys(TABLES, 0)
        other = 0
        for name, size in connection.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
            table = owner.get(name, name)
            if table in tables:
                tables[table] += int(size)
            else:
                other += int(size)
        (page_size,) = connection.execute("PRAGMA page_size").fetchone()
        (free_pages,) = connection.execute("PRAGMA freelist_count").fetchone()
    wal = path.with_name(path.name + "-wal")
    return {
        "file": path.stat().st_size,
        "wal": wal.stat().st_size if wal.exists() else 0,
        "tables": tables,
        "other_tables": other,
        "free_bytes": int(free_pages) * int(page_size),
        "page_size": int(page_size),
    }


# --------------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------------


def pick_turns(turns: int, count: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(turns), min(count, turns)))


def run_postgres(
    args: argparse.Namespace,
    workdir: Path,
    bodies: Sequence[bytes],
    scripts: Sequence[dict[str, Any]],
    database_url: str,
) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    services = Services(workdir, database_url)
    halfway = len(bodies) // 2
    snapshots: dict[str, Any] = {}

    def on_turn(number: int, ids: list[uuid.UUID]) -> None:
        if number == halfway and halfway > 0:
            asyncio.run(pg_wait(database_url, ids, args.drain_timeout))
            snapshots["halfway"] = asyncio.run(pg_sizes(database_url))

    try:
        log("postgresql: starting the fake upstream and the proxy (after prompttrain migrate)")
        services.start()
        before = asyncio.run(pg_sizes(database_url))
        log(f"postgresql: replaying {len(bodies)} turns")
        replayed = replay(services, bodies, scripts, on_turn)
        counts = asyncio.run(pg_wait(database_url, replayed.request_ids, args.drain_timeout))
    finally:
        services.stop()
    after = asyncio.run(pg_sizes(database_url))
    details = asyncio.run(pg_details(database_url, replayed.request_ids))
    log("postgresql: measuring a naive one-text-column table with the same bodies")
    naive = asyncio.run(pg_naive(database_url, bodies))
    chosen = pick_turns(len(bodies), args.verify, args.seed)
    checks = asyncio.run(verify(database_url, {replayed.request_ids[t]: bodies[t] for t in chosen}))
    for check, turn in zip(checks, chosen, strict=True):
        check["turn"] = turn + 1
    return {
        "replay_s": replayed.seconds,
        "rows": counts,
        "before": before,
        "halfway": snapshots.get("halfway"),
        "after": after,
        "naive": naive,
        "verify": checks,
        **details,
    }


def run_sqlite(
    args: argparse.Namespace, workdir: Path, bodies: Sequence[bytes], scripts: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    services = Services(workdir, None)
    try:
        log("sqlite: starting the fake upstream and the proxy")
        services.start()
        log(f"sqlite: replaying {len(bodies)} turns")
        replayed = replay(services, bodies, scripts)
        counts = sqlite_wait(services.sqlite_path, len(bodies), args.drain_timeout)
    finally:
        services.stop()  # the writer flushes on SIGTERM; then nothing holds the file
    sizes = sqlite_sizes(services.sqlite_path)
    with contextlib.closing(sqlite3.connect(services.sqlite_path)) as connection:
        (raw,) = connection.execute(
            "SELECT count(*) FROM request_payloads WHERE raw_request_body IS NOT NULL"
        ).fetchone()
    chosen = pick_turns(len(bodies), args.verify, args.seed)
    checks = asyncio.run(verify(services.database_url, {replayed.request_ids[t]: bodies[t] for t in chosen}))
    for check, turn in zip(checks, chosen, strict=True):
        check["turn"] = turn + 1
    return {"replay_s": replayed.seconds, "rows": counts, "raw_fallbacks": int(raw), "verify": checks, **sizes}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    fixed, conversation = build_conversation(args.turns, args.turn_bytes, args.seed)
    bodies = request_bodies(fixed, conversation)
    scripts = reply_scripts(conversation, [len(body) for body in bodies])
    workdir = Path(tempfile.mkdtemp(prefix="prompttrain-storage-"))
    temp_db = None if args.database_url else TempDatabase(args.admin_url)
    report: dict[str, Any] = {
        "environment": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {"turns": args.turns, "turn_bytes": args.turn_bytes, "seed": args.seed, "stream": True},
        "bodies": {
            "count": len(bodies),
            "sum": sum(map(len, bodies)),
            "first": len(bodies[0]),
            "last": len(bodies[-1]),
            "fixed_part": len(compact({**fixed, "messages": []})),
            "messages": sum(len(turn.messages) for turn in conversation),
        },
    }
    try:
        if temp_db is not None:
            log(f"postgresql: creating the temporary database {temp_db.name}")
            temp_db.create()
        database_url = args.database_url or (temp_db.url if temp_db else "")
        report["postgresql"] = run_postgres(args, workdir / "postgresql", bodies, scripts, database_url)
        report["postgresql"]["temporary_database"] = temp_db is not None
        if args.sqlite:
            report["sqlite"] = run_sqlite(args, workdir / "sqlite", bodies, scripts)
    finally:
        if temp_db is not None:
            with contextlib.suppress(Exception):
                temp_db.drop()
        if args.keep_temp:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    summarise(report)
    report["elapsed_s"] = time.monotonic() - started
    return report


def total_of(sizes: dict[str, dict[str, int]] | None) -> int:
    return sum(table["total"] for table in sizes.values()) if sizes else 0


def summarise(report: dict[str, Any]) -> None:
    """Derived numbers: ratios, fixed part, marginal growth, target verdicts."""
    bodies = report["bodies"]
    turns = bodies["count"]
    targets = []
    pg = report["postgresql"]
    total = total_of(pg["after"])
    pg["total"] = total
    pg["ratio"] = total / bodies["sum"]
    pg["fixed"] = total_of(pg["before"])
    pg["growth_ratio"] = (total - pg["fixed"]) / bodies["sum"]
    pg["naive"]["ratio"] = pg["naive"]["total"] / bodies["sum"]
    pg["raw_fallbacks"] = pg["columns"]["request_payloads"].get("raw_fallbacks", 0)
    if pg["halfway"] and turns >= 2:
        half = turns // 2
        pg["marginal_bytes_per_turn"] = (total - total_of(pg["halfway"])) / (turns - half)
    targets.append({"database": "postgresql", "ratio": pg["ratio"], "pass": pg["ratio"] <= TARGET_RATIO})
    if "sqlite" in report:
        lite = report["sqlite"]
        lite["total"] = sum(lite["tables"].values())
        lite["ratio"] = lite["total"] / bodies["sum"]
        lite["file_ratio"] = (lite["file"] + lite["wal"]) / bodies["sum"]
        targets.append({"database": "sqlite", "ratio": lite["ratio"], "pass": lite["ratio"] <= TARGET_RATIO})
    report["targets"] = targets


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def kib(value: float) -> str:
    return f"{value / 1024:,.1f}"


def print_report(report: dict[str, Any]) -> None:
    bodies, pg, env = report["bodies"], report["postgresql"], report["environment"]
    total_sum = bodies["sum"]
    where = "temporary database" if pg["temporary_database"] else "--database-url"
    print(
        f"\nprompttrain storage growth: {bodies['count']} turns of ~{report['settings']['turn_bytes']} B, SSE, "
        f"PostgreSQL {pg['server_version']} ({where}, TOAST {pg['toast_compression']}), {env['cpus']} CPUs, "
        f"Python {env['python']}"
    )
    print(
        f"Request bodies sent: {bodies['count']} ({bodies['messages']} messages), first {kib(bodies['first'])} KiB "
        f"(fixed part: system + tools + settings {kib(bodies['fixed_part'])} KiB), last {kib(bodies['last'])} KiB, "
        f"sum {kib(total_sum)} KiB"
    )
    rows = pg["rows"]
    print(
        f"Recorded: {rows['api_requests']} api_requests, {rows['request_payloads']} request_payloads rows; "
        f"{pg['raw_fallbacks']} bodies stored raw (fallback); replay took {pg['replay_s']:.1f}s\n"
    )
    if min(rows.values()) < bodies["count"]:
        print("WARNING: rows were still missing after --drain-timeout; sizes below are incomplete\n")
    header = (
        f"{'PostgreSQL (KiB)':<18}{'rows':>6}{'parts':>8}{'heap':>10}{'fsm+vm':>8}{'toast':>10}"
        f"{'indexes':>10}{'total':>10}{'% of sum':>10}{'empty':>8}"
    )
    print(header)
    print("-" * len(header))
    columns = pg["columns"]
    for table in TABLES:
        size = pg["after"][table]
        print(
            f"{table:<18}{columns[table].get('rows', 0):>6}{size['nonempty']:>4}/{size['partitions']:<3}"
            f"{kib(size['heap']):>10}{kib(size['maps']):>8}{kib(size['toast']):>10}{kib(size['indexes']):>10}"
            f"{kib(size['total']):>10}{size['total'] / total_sum:>10.1%}{kib(pg['before'][table]['total']):>8}"
        )
    keys = ("heap", "maps", "toast", "indexes")
    sums = {key: sum(pg["after"][table][key] for table in TABLES) for key in keys}
    print("-" * len(header))
    print(
        f"{'total':<18}{'':>14}{kib(sums['heap']):>10}{kib(sums['maps']):>8}{kib(sums['toast']):>10}"
        f"{kib(sums['indexes']):>10}{kib(pg['total']):>10}{pg['ratio']:>10.1%}{kib(pg['fixed']):>8}"
    )
    print(
        "parts = non-empty / all partitions; empty = the same tables right after migration (daily partitions "
        "with their empty indexes)"
    )
    naive = pg["naive"]
    print("\nStoring every body whole instead (same bodies):")
    print(f"  uncompressed (the sum of the bodies)          {kib(total_sum):>10} KiB  100.0%")
    print(
        f"  one text column, TOAST {pg['toast_compression']:<6} compressed      {kib(naive['total']):>10} KiB "
        f"{naive['ratio']:>6.1%}   (content-addressed: {pg['ratio']:.1%}; naive = "
        f"{naive['total'] / pg['total']:.1f}x that)"
    )
    print("\nWhere the bytes go (pg_column_size, as stored):")
    payloads, blobs, meta = columns["request_payloads"], columns["content_blobs"], columns["api_requests"]
    print(
        f"  request_payloads: refs {kib(payloads['refs'])} KiB, of which message refs "
        f"{kib(payloads['message_refs_raw'])} (32 B per message per request: quadratic, incompressible, "
        f"{kib(payloads['message_refs_raw'] / max(payloads['rows'], 1))} KiB a row on average); "
        f"templates {kib(payloads['template'])}, responses {kib(payloads['response_body'])}, "
        f"raw bodies {kib(payloads['raw_request_body'])}"
    )
    print(
        f"  content_blobs: {blobs['rows']} blobs, content {kib(blobs['content_raw'])} KiB as JSON, "
        f"{kib(blobs['content_stored'])} KiB stored; {blobs['small']} blobs <= 2 KB take "
        f"{kib(blobs['small_stored'])} KiB, uncompressed (under the TOAST threshold); {blobs['marked']} carry "
        f"cache_control, {kib(blobs['marked_stored'])} KiB (each last message is stored again without it)"
    )
    print(
        f"  api_requests: {kib(meta['row_bytes'])} KiB of rows ({meta['row_bytes'] // max(meta['rows'], 1)} B each), "
        f"of which request headers {kib(meta['request_headers'])}, response headers {kib(meta['response_headers'])}"
    )
    if "marginal_bytes_per_turn" in pg:
        added = report["settings"]["turn_bytes"]
        print(
            f"  growth in the second half: {kib(pg['marginal_bytes_per_turn'])} KiB stored per turn for ~"
            f"{kib(added)} KiB of new messages per turn, while each body grew to {kib(bodies['last'])} KiB"
        )
    print(
        f"  without the fixed part (empty partitions' pages): {kib(pg['total'] - pg['fixed'])} KiB = "
        f"{pg['growth_ratio']:.1%} of the sum"
    )
    if "sqlite" in report:
        lite = report["sqlite"]
        print(
            f"\nSQLite: file {kib(lite['file'])} KiB + WAL {kib(lite['wal'])} KiB after checkpoint = "
            f"{lite['file_ratio']:.1%} of the sum; {lite['rows']['api_requests']} + {lite['rows']['request_payloads']} "
            f"rows, {lite['raw_fallbacks']} raw"
        )
        parts = ", ".join(f"{table} {kib(size)}" for table, size in lite["tables"].items())
        print(
            f"  per table with indexes (KiB): {parts}; other tables {kib(lite['other_tables'])}, "
            f"free pages {kib(lite['free_bytes'])}; three tables = {lite['ratio']:.1%} of the sum "
            f"(naive: 100%, SQLite does not compress)"
        )
    print("\nCorrectness (load_payload returns exactly the bytes sent):")
    for name in ("postgresql", "sqlite"):
        if name in report:
            checks = report[name]["verify"]
            good = sum(check["exact"] for check in checks)
            turns = ", ".join(f"{check['turn']}{'' if check['exact'] else ' WRONG'}" for check in checks)
            print(f"  {name:<10} {good}/{len(checks)} exact (turns {turns})")
    print("\nTarget: database bytes (3 tables, all partitions, table + indexes + TOAST) <= 10 % of the bodies sent")
    for target in report["targets"]:
        verdict = "PASS" if target["pass"] else "MISS"
        print(f"  {verdict}  {target['database']:<10} {target['ratio']:.1%}")
    print(f"\nRun took {report['elapsed_s']:.0f}s.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--turns", type=int, default=100, help="requests in the conversation (100)")
    parser.add_argument("--turn-bytes", type=int, default=2048, help="bytes of messages each turn adds (2048)")
    parser.add_argument("--database-url", help="a postgresql:// database to use instead of a temporary one")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="where to create the temporary database")
    parser.add_argument("--sqlite", action="store_true", help="also record the replay into a SQLite file")
    parser.add_argument("--verify", type=int, default=5, help="random turns rebuilt with load_payload (5)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the conversation and of the checked turns")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to wait for recording (30)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary directory (logs, SQLite)")
    return parser


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.turns < 1 or args.turn_bytes < 200:
        raise SystemExit("--turns must be >= 1 and --turn-bytes >= 200")
    signal.signal(signal.SIGTERM, _exit_on_signal)  # unwind like Ctrl-C: stop the subprocesses, drop the database
    report = run_benchmark(args)
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"Results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
