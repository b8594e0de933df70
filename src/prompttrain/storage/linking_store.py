"""Conversation linking against the database, inside the writer's insert transaction.

Each linked row is looked up and inserted in the same transaction, one after the other, so a later row of the same
batch sees an earlier one as its parent. On PostgreSQL the transaction first takes advisory locks on the rows'
parent hashes (sorted, so two writers never deadlock): two replicas inserting siblings of one parent serialise, and
the second sees the first and opens a branch, as a single writer would.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from prompttrain.conversation.linking import LinkFacts, ParentRow, TaskMatch, link, summary_matches
from prompttrain.storage.records import LINK_KEY
from prompttrain.storage.tables import api_requests, task_invocations

log = logging.getLogger(__name__)

PARENT_COLUMNS = (
    api_requests.c.request_id,
    api_requests.c.conversation_id,
    api_requests.c.branch_id,
    api_requests.c.current_message_hash,
    api_requests.c.is_subtask,
    api_requests.c.parent_task_request_id,
)
COMPLETED = api_requests.c.outcome == "completed"


def _parent(row: Any) -> ParentRow:
    return ParentRow(
        request_id=row.request_id,
        conversation_id=row.conversation_id,
        branch_id=row.branch_id,
        current_message_hash=row.current_message_hash,
        is_subtask=bool(row.is_subtask),
        parent_task_request_id=row.parent_task_request_id,
    )


class DatabaseHistory:
    """`conversation.linking.History` for one train, on the writer's connection.

    `live` (the writer, rows arriving in completion order): any sibling already stored counts, whenever it started,
    so that of two siblings in flight at once exactly one stays on the parent's branch. Relinking stored history
    (rows in start order) counts only siblings that started earlier.
    """

    def __init__(self, connection: AsyncConnection, train_id: str, *, live: bool = True) -> None:
        self.connection = connection
        self.train_id = train_id
        self.live = live

    async def find_parent(
        self, message_hash: str, system_hash: str | None, before: datetime, session_id: str | None
    ) -> ParentRow | None:
        query = sa.select(*PARENT_COLUMNS).where(
            api_requests.c.train_id == self.train_id,
            api_requests.c.current_message_hash == message_hash,
            api_requests.c.timestamp < before,
            COMPLETED,
        )
        order: list[Any] = []
        if system_hash is not None:
            order.append(sa.case((api_requests.c.system_hash == system_hash, 0), else_=1))
        if session_id is not None:
            order.append(sa.case((api_requests.c.session_id == session_id, 0), else_=1))
        query = query.order_by(*order, api_requests.c.timestamp.desc()).limit(1)
        row = (await self.connection.execute(query)).first()
        return _parent(row) if row is not None else None

    async def has_children(
        self, conversation_id: uuid.UUID, parent_hash: str, before: datetime, exclude: uuid.UUID
    ) -> bool:
        query = sa.select(api_requests.c.request_id).where(
            api_requests.c.conversation_id == conversation_id,
            api_requests.c.parent_message_hash == parent_hash,
            api_requests.c.request_id != exclude,
            COMPLETED,
        )
        if not self.live:
            query = query.where(api_requests.c.timestamp < before)
        query = query.limit(1)
        return (await self.connection.execute(query)).first() is not None

    async def find_task(self, prompt_digest: str, since: datetime, before: datetime) -> TaskMatch | None:
        query = (
            sa.select(task_invocations.c.request_id, task_invocations.c.conversation_id, task_invocations.c.ordinal)
            .where(
                task_invocations.c.train_id == self.train_id,
                task_invocations.c.prompt_digest == prompt_digest,
                task_invocations.c.timestamp >= since,
                task_invocations.c.timestamp < before,
            )
            .order_by(task_invocations.c.timestamp.desc())
            .limit(1)
        )
        row = (await self.connection.execute(query)).first()
        return TaskMatch(row.request_id, row.conversation_id, row.ordinal) if row is not None else None

    async def find_compacted(self, probe: str, legacy: str, since: datetime, before: datetime) -> ParentRow | None:
        summary = api_requests.c.compact_summary
        query = (
            sa.select(*PARENT_COLUMNS)
            .where(
                api_requests.c.train_id == self.train_id,
                summary.is_not(None),
                sa.or_(summary.contains(probe, autoescape=True), summary.startswith(legacy, autoescape=True)),
                api_requests.c.timestamp >= since,
                api_requests.c.timestamp < before,
                COMPLETED,
            )
            .order_by(api_requests.c.timestamp.desc())
            .limit(1)
        )
        row = (await self.connection.execute(query)).first()
        return _parent(row) if row is not None else None


def lock_key(row: dict[str, Any], facts: LinkFacts) -> int:
    anchor = facts.parent_hash or facts.subtask_prompt_digest or facts.current_hash or ""
    digest = hashlib.sha256(f"{row['train_id']}:{anchor}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def insert_linked(connection: AsyncConnection, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Link each row that carries facts, then insert it (and its Agent/Task calls), in the caller's transaction.

    Returns the rows as inserted (with their conversation columns).
    """
    pending = [(row, LinkFacts.from_json(row[LINK_KEY])) for row in rows if row.get(LINK_KEY)]
    plain = [_without_facts(row) for row in rows if not row.get(LINK_KEY)]
    postgres = connection.dialect.name == "postgresql"
    insert = postgresql.insert if postgres else sqlite.insert
    if postgres and pending:
        # All of the batch's locks in one round trip, in key order (two writers never wait on each other in a cycle).
        keys = sorted({lock_key(row, facts) for row, facts in pending})
        await connection.execute(
            sa.text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS k ORDER BY k"),
            {"keys": keys},
        )
    batch = BatchHistory(connection)
    await batch.prefetch(pending)
    inserted = []
    for row, facts in pending:
        values = _without_facts(row)
        inserted.append(values)
        values.update(await _link_in_batch(batch.for_train(values["train_id"]), values, facts))
        batch.add_linked(values, facts)
        if facts.task_calls and values.get("conversation_id") is not None:
            await batch.number_task_calls(values, facts)
    everything = [*inserted, *plain]
    if everything:
        # One statement for the whole batch: the rows linked above saw each other through `batch`.
        await connection.execute(
            insert(api_requests).on_conflict_do_nothing(index_elements=["request_id", "timestamp"]), everything
        )
    if batch.new_tasks:
        await connection.execute(insert(task_invocations).on_conflict_do_nothing(), batch.new_tasks)
    return everything


async def _link_in_batch(history: BatchHistory, row: dict[str, Any], facts: LinkFacts) -> dict[str, Any]:
    try:
        result = await link(
            facts, history, request_id=row["request_id"], timestamp=row["timestamp"], session_id=row.get("session_id")
        )
    except sa_exc.SQLAlchemyError:
        raise  # the database's trouble: the writer retries or spools the batch
    except Exception:
        log.exception("could not link request %s; recording it as a new conversation", row["request_id"])
        return {"conversation_id": uuid.uuid4(), "branch_id": "main"}
    return result.as_columns()


async def link_row(
    connection: AsyncConnection, row: dict[str, Any], facts: LinkFacts, *, live: bool = True
) -> dict[str, Any]:
    """The conversation columns of one row, linked against what the database holds before it."""
    history = DatabaseHistory(connection, row["train_id"], live=live)
    try:
        result = await link(
            facts,
            history,
            request_id=row["request_id"],
            timestamp=row["timestamp"],
            session_id=row.get("session_id"),
        )
    except sa_exc.SQLAlchemyError:
        raise  # the database's trouble: the writer retries or spools the batch
    except Exception:
        # A linking bug must not lose the record: store it as the start of a conversation of its own.
        log.exception("could not link request %s; recording it as a new conversation", row["request_id"])
        return {"conversation_id": uuid.uuid4(), "branch_id": "main"}
    return result.as_columns()


async def record_task_calls(connection: AsyncConnection, row: dict[str, Any], facts: LinkFacts) -> None:
    """Number the row's Agent/Task calls after the conversation's earlier ones, for its sub-agents to find."""
    insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    conversation_id = row["conversation_id"]
    latest = await connection.execute(
        sa.select(sa.func.coalesce(sa.func.max(task_invocations.c.ordinal), 0)).where(
            task_invocations.c.conversation_id == conversation_id
        )
    )
    first = int(latest.scalar_one()) + 1
    await connection.execute(
        insert(task_invocations).on_conflict_do_nothing(),
        [
            {
                "request_id": row["request_id"],
                "tool_use_id": call.tool_use_id,
                "timestamp": row["timestamp"],
                "train_id": row["train_id"],
                "conversation_id": conversation_id,
                "prompt_digest": call.prompt_digest,
                "ordinal": first + index,
            }
            for index, call in enumerate(facts.task_calls)
        ],
    )


def _without_facts(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key != LINK_KEY}


# -- the writer's path: a whole batch linked with a handful of queries -------------------------------------------

CANDIDATES_PER_HASH = 20


@dataclass
class Candidate:
    parent: ParentRow
    train_id: str
    system_hash: str | None
    session_id: str | None
    timestamp: datetime
    parent_message_hash: str | None = None


@dataclass
class BatchHistory:
    """`History` for one batch: what the database held when the batch's locks were taken (fetched in a few
    queries for all rows at once), plus the batch's own rows as they are linked, in order.

    The writer links rows in completion order, so any stored sibling counts (whenever it started); see
    DatabaseHistory for the relink path, which asks the database row by row.
    """

    connection: AsyncConnection
    train_id: str = ""
    candidates: dict[str, list[Candidate]] = field(default_factory=dict)  # current hash -> newest first
    children: set[tuple[uuid.UUID, str]] = field(default_factory=set)  # (conversation, parent hash) with a child
    tasks: dict[str, TaskMatch] = field(default_factory=dict)  # (train, digest) key -> newest call
    task_times: dict[str, datetime] = field(default_factory=dict)
    ordinals: dict[uuid.UUID, int] = field(default_factory=dict)  # conversation -> highest sub-agent ordinal
    new_tasks: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[tuple[Candidate, str]] = field(default_factory=list)  # this batch's compaction rows

    async def prefetch(self, pending: Sequence[tuple[dict[str, Any], LinkFacts]]) -> None:
        hashes = {h for _, f in pending for h in (f.parent_hash, f.grandparent_hash) if h is not None}
        trains = {row["train_id"] for row, _ in pending}
        if hashes:
            ranked = (
                sa.select(
                    *PARENT_COLUMNS,
                    api_requests.c.train_id,
                    api_requests.c.system_hash,
                    api_requests.c.session_id,
                    api_requests.c.timestamp,
                    sa.func.row_number()
                    .over(partition_by=api_requests.c.current_message_hash, order_by=api_requests.c.timestamp.desc())
                    .label("rank"),
                )
                .where(
                    api_requests.c.current_message_hash.in_(hashes),
                    api_requests.c.train_id.in_(trains),
                    COMPLETED,
                )
                .subquery()
            )
            rows = await self.connection.execute(sa.select(ranked).where(ranked.c.rank <= CANDIDATES_PER_HASH))
            for row in rows:
                self._add_candidate(
                    Candidate(_parent(row), row.train_id, row.system_hash, row.session_id, _aware(row.timestamp))
                )
            parents = {c.parent.current_message_hash for cs in self.candidates.values() for c in cs}
            if parents:
                found = await self.connection.execute(
                    sa.select(api_requests.c.conversation_id, api_requests.c.parent_message_hash)
                    .where(api_requests.c.parent_message_hash.in_(parents), COMPLETED)
                    .distinct()
                )
                self.children.update((conversation, parent) for conversation, parent in found if conversation)
        digests = {f.subtask_prompt_digest for _, f in pending if f.subtask_prompt_digest is not None}
        if digests:
            calls = await self.connection.execute(
                sa.select(task_invocations)
                .where(task_invocations.c.prompt_digest.in_(digests), task_invocations.c.train_id.in_(trains))
                .order_by(task_invocations.c.timestamp)
            )
            for call in calls.mappings():
                self._add_task(call)

    def _add_candidate(self, candidate: Candidate) -> None:
        key = f"{candidate.train_id}\\0{candidate.parent.current_message_hash}"
        self.candidates.setdefault(key, []).append(candidate)  # `find_parent` picks among them whatever the order

    def _add_task(self, call: Any) -> None:
        key = f"{call['train_id']}\\0{call['prompt_digest']}"
        when = _aware(call["timestamp"])
        if key not in self.task_times or when >= self.task_times[key]:
            self.tasks[key] = TaskMatch(call["request_id"], call["conversation_id"], call["ordinal"])
            self.task_times[key] = when

    def for_train(self, train_id: str) -> BatchHistory:
        self.train_id = train_id
        return self

    async def find_parent(
        self, message_hash: str, system_hash: str | None, before: datetime, session_id: str | None
    ) -> ParentRow | None:
        group = [c for c in self.candidates.get(f"{self.train_id}\\0{message_hash}", []) if c.timestamp < before]
        if not group:
            return None
        best = min(
            group,
            key=lambda c: (
                system_hash is not None and c.system_hash != system_hash,
                session_id is not None and c.session_id != session_id,
                -c.timestamp.timestamp(),
            ),
        )
        return best.parent

    async def has_children(
        self, conversation_id: uuid.UUID, parent_hash: str, before: datetime, exclude: uuid.UUID
    ) -> bool:
        return (conversation_id, parent_hash) in self.children

    async def find_task(self, prompt_digest: str, since: datetime, before: datetime) -> TaskMatch | None:
        key = f"{self.train_id}\\0{prompt_digest}"
        when = self.task_times.get(key)
        if when is None or not since <= when < before:
            return None
        return self.tasks[key]

    async def find_compacted(self, probe: str, legacy: str, since: datetime, before: datetime) -> ParentRow | None:
        # Rare (one request per compaction): this batch's compaction rows first, then the database.
        for candidate, summary in reversed(self.summaries):
            if (
                candidate.train_id == self.train_id
                and since <= candidate.timestamp < before
                and summary_matches(summary, probe, legacy)
            ):
                return candidate.parent
        return await DatabaseHistory(self.connection, self.train_id).find_compacted(probe, legacy, since, before)

    def add_linked(self, row: dict[str, Any], facts: LinkFacts) -> None:
        """A row of this batch, now linked: a parent, sibling or sub-agent caller for the rows after it."""
        conversation = row.get("conversation_id")
        if row.get("outcome") != "completed" or conversation is None or facts.current_hash is None:
            return
        parent = ParentRow(
            row["request_id"],
            conversation,
            row.get("branch_id"),
            facts.current_hash,
            bool(row.get("is_subtask")),
            row.get("parent_task_request_id"),
        )
        candidate = Candidate(
            parent, row["train_id"], row.get("system_hash"), row.get("session_id"), _aware(row["timestamp"])
        )
        self._add_candidate(candidate)
        if row.get("compact_summary"):
            self.summaries.append((candidate, row["compact_summary"]))
        if row.get("parent_message_hash"):
            self.children.add((conversation, row["parent_message_hash"]))

    async def number_task_calls(self, row: dict[str, Any], facts: LinkFacts) -> None:
        conversation = row["conversation_id"]
        if conversation not in self.ordinals:
            latest = await self.connection.execute(
                sa.select(sa.func.coalesce(sa.func.max(task_invocations.c.ordinal), 0)).where(
                    task_invocations.c.conversation_id == conversation
                )
            )
            self.ordinals[conversation] = int(latest.scalar_one())
        for call in facts.task_calls:
            self.ordinals[conversation] += 1
            task = {
                "request_id": row["request_id"],
                "tool_use_id": call.tool_use_id,
                "timestamp": row["timestamp"],
                "train_id": row["train_id"],
                "conversation_id": conversation,
                "prompt_digest": call.prompt_digest,
                "ordinal": self.ordinals[conversation],
            }
            self.new_tasks.append(task)
            self._add_task(task)


def _aware(value: datetime) -> datetime:
    """SQLite hands timestamps back without their zone (they are stored in UTC)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
