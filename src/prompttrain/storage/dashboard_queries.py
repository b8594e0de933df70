"""Read queries behind the dashboard: request lists (keyset pagination), one request, overview aggregates,
conversations, subscription windows and token usage, trains and accounts seen, storage statistics.

Every function takes an `AsyncConnection` and returns dataclasses (serialised as they are by the JSON API and
documented by its OpenAPI schema); nothing here knows about HTTP or HTML. The queries run on PostgreSQL and on the
embedded SQLite; where the dialects differ (time buckets, table sizes) the helper says so. SQLite returns naive
datetimes (stored as UTC): `utc()` makes every datetime leaving this module timezone-aware.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from prompttrain.storage.queries import load_payload
from prompttrain.storage.tables import api_requests, content_blobs, request_payloads

R = api_requests.c
FIVE_HOURS = timedelta(hours=5)
SEVEN_DAYS = timedelta(days=7)
RATELIMIT_HEADER = "anthropic-ratelimit-unified-"


def utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# -- requests -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """A position in the (timestamp, request_id) order of requests, opaque to clients."""

    timestamp: datetime
    key: str  # a request id, or a conversation id for conversation lists

    def encode(self) -> str:
        text = f"{_utc(self.timestamp).isoformat()}|{self.key}"
        return base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Raise ValueError when the text is not a cursor this module made."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("utf-8")
            stamp, _, key = raw.partition("|")
            return cls(_utc(datetime.fromisoformat(stamp)), str(uuid.UUID(key)))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise ValueError("not a valid cursor") from None


@dataclass(frozen=True)
class RequestFilters:
    train_id: str | None = None
    account_id: str | None = None
    model: str | None = None
    # "ok" (completed), "error" (anything else), "2xx" / "4xx" / "5xx", or one status code ("429").
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    search: str | None = None
    conversation_id: uuid.UUID | None = None


@dataclass(frozen=True)
class RequestSummary:
    request_id: uuid.UUID
    timestamp: datetime
    train_id: str
    account_id: str | None
    model: str | None
    stream: bool
    status_code: int | None
    outcome: str
    error_type: str | None
    error_message: str | None
    duration_ms: float | None
    first_token_ms: float | None
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int
    cost_usd: float
    cost_estimated: bool
    tool_call_count: int
    stop_reason: str | None
    session_id: str | None
    conversation_id: uuid.UUID | None
    branch_id: str | None
    is_subtask: bool


SUMMARY_COLUMNS = tuple(getattr(R, name) for name in RequestSummary.__dataclass_fields__)


@dataclass(frozen=True)
class RequestPage:
    requests: list[RequestSummary]
    # Older rows: pass as `before`. Newer rows (when this page is not the newest): pass as `after`.
    next_cursor: str | None
    prev_cursor: str | None


@dataclass(frozen=True)
class RequestRecord(RequestSummary):
    method: str
    path: str
    upstream_ms: float | None
    overhead_ms: float | None
    usage: dict[str, Any] | None
    upstream_request_id: str | None
    request_headers: dict[str, Any] | None
    response_headers: dict[str, Any] | None
    request_bytes: int
    payload_shed: bool
    parent_request_id: uuid.UUID | None
    parent_task_request_id: uuid.UUID | None
    message_count: int
    task_tool_invocation: Any
    tool_result_names: Any
    ratelimit_status: str | None
    ratelimit_5h_utilization: float | None
    ratelimit_5h_reset: datetime | None
    ratelimit_7d_utilization: float | None
    ratelimit_7d_reset: datetime | None


RECORD_COLUMNS = tuple(getattr(R, name) for name in RequestRecord.__dataclass_fields__)


@dataclass(frozen=True)
class RequestDetail:
    request: RequestRecord
    # The request body as the client sent it: parsed JSON, or the text when it is not JSON; None when not kept.
    request_body: Any
    response_body: Any
    payload_stored: bool


def _summary(row: Mapping[Any, Any]) -> RequestSummary:
    values = {name: row[name] for name in RequestSummary.__dataclass_fields__}
    values["timestamp"] = _utc(values["timestamp"])
    return RequestSummary(**values)


def _record(row: Mapping[Any, Any]) -> RequestRecord:
    values = {name: row[name] for name in RequestRecord.__dataclass_fields__}
    for name in ("timestamp", "ratelimit_5h_reset", "ratelimit_7d_reset"):
        values[name] = utc(values[name])
    return RequestRecord(**values)


def _bind_time(value: datetime) -> datetime:
    # SQLite stores UTC wall time as text: bind the same (aware datetimes are converted, never shifted by tz).
    return _utc(value)


def request_conditions(filters: RequestFilters) -> list[sa.ColumnElement[bool]]:
    conditions: list[sa.ColumnElement[bool]] = []
    if filters.train_id:
        conditions.append(R.train_id == filters.train_id)
    if filters.account_id:
        conditions.append(R.account_id == filters.account_id)
    if filters.model:
        conditions.append(R.model == filters.model)
    if filters.conversation_id:
        conditions.append(R.conversation_id == filters.conversation_id)
    if filters.since:
        conditions.append(R.timestamp >= _bind_time(filters.since))
    if filters.until:
        conditions.append(R.timestamp < _bind_time(filters.until))
    status = filters.status
    if status == "ok":
        conditions.append(R.outcome == "completed")
    elif status == "error":
        conditions.append(R.outcome != "completed")
    elif status in ("2xx", "3xx", "4xx", "5xx"):
        low = int(status[0]) * 100
        conditions.append(R.status_code.between(low, low + 99))
    elif status:
        conditions.append(R.status_code == int(status))
    if filters.search:
        conditions.append(_search_condition(filters.search))
    return conditions


def _search_condition(text: str) -> sa.ColumnElement[bool]:
    """Match ids exactly, or text (case-insensitive, wildcards escaped) in the metadata a person looks for."""
    try:
        identifier = uuid.UUID(text.strip())
    except ValueError:
        pass
    else:
        return sa.or_(
            R.request_id == identifier, R.conversation_id == identifier, R.parent_task_request_id == identifier
        )
    columns = (R.model, R.error_message, R.error_type, R.session_id, R.upstream_request_id, R.path, R.branch_id)
    return sa.or_(*(column.icontains(text, autoescape=True) for column in columns))


async def list_requests(
    connection: AsyncConnection,
    filters: RequestFilters,
    *,
    before: Cursor | None = None,
    after: Cursor | None = None,
    limit: int = 50,
) -> RequestPage:
    """Newest first, `limit` rows older than `before` (or newer than `after`): keyset pagination on
    (timestamp, request_id), so page 1000 costs what page 1 does."""
    conditions = request_conditions(filters)
    newest_first = after is None
    if before is not None:
        stamp, key = _bind_time(before.timestamp), uuid.UUID(before.key)
        # The first conjunct alone is what an index on `timestamp` can serve; the second breaks ties.
        conditions += [R.timestamp <= stamp, sa.or_(R.timestamp < stamp, R.request_id < key)]
    if after is not None:
        stamp, key = _bind_time(after.timestamp), uuid.UUID(after.key)
        conditions += [R.timestamp >= stamp, sa.or_(R.timestamp > stamp, R.request_id > key)]
    order = (R.timestamp.desc(), R.request_id.desc()) if newest_first else (R.timestamp.asc(), R.request_id.asc())
    query = sa.select(*SUMMARY_COLUMNS).where(*conditions).order_by(*order).limit(limit + 1)
    rows = [_summary(row) for row in (await connection.execute(query)).mappings()]
    more = len(rows) > limit
    rows = rows[:limit]
    if not newest_first:
        rows.reverse()
    older = more if newest_first else True
    newer = before is not None or (after is not None and more)
    return RequestPage(
        requests=rows,
        next_cursor=_cursor_of(rows[-1]) if rows and older else None,
        prev_cursor=_cursor_of(rows[0]) if rows and newer else None,
    )


def _cursor_of(row: RequestSummary) -> str:
    return Cursor(row.timestamp, str(row.request_id)).encode()


async def requests_by_id(
    connection: AsyncConnection, ids: Sequence[uuid.UUID], filters: RequestFilters
) -> list[RequestSummary]:
    """The rows among `ids` that match `filters`, newest first (what a live page inserts)."""
    if not ids:
        return []
    query = (
        sa.select(*SUMMARY_COLUMNS)
        .where(R.request_id.in_(list(ids)), *request_conditions(filters))
        .order_by(R.timestamp.desc(), R.request_id.desc())
    )
    return [_summary(row) for row in (await connection.execute(query)).mappings()]


async def get_request(connection: AsyncConnection, request_id: uuid.UUID) -> RequestDetail | None:
    row = (await connection.execute(sa.select(*RECORD_COLUMNS).where(R.request_id == request_id))).mappings().first()
    if row is None:
        return None
    payload = await load_payload(connection, request_id)
    request_body: Any = None
    if payload is not None and payload.request_body is not None:
        try:
            request_body = orjson.loads(payload.request_body)
        except orjson.JSONDecodeError:
            request_body = payload.request_body.decode("utf-8", "replace")
    return RequestDetail(
        request=_record(row),
        request_body=request_body,
        response_body=payload.response_body if payload is not None else None,
        payload_stored=payload is not None,
    )


# -- overview ---------------------------------------------------------------------------------------------------


@dataclass
class Totals:
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: Totals) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_input_tokens += other.cache_read_input_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.cost_usd += other.cost_usd

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens


@dataclass(frozen=True)
class SeriesPoint:
    start: datetime
    totals: Totals


@dataclass(frozen=True)
class NamedTotals:
    name: str
    totals: Totals


@dataclass(frozen=True)
class Overview:
    since: datetime
    until: datetime
    bucket_seconds: int
    totals: Totals
    series: list[SeriesPoint]
    by_train: list[NamedTotals]
    by_account: list[NamedTotals]
    by_model: list[NamedTotals]


BUCKET_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)


def time_bucket(connection: AsyncConnection, seconds: int) -> sa.ColumnElement[Any]:
    """The start of the `seconds`-wide bucket of a row's timestamp (read it with `bucket_start`). PostgreSQL:
    `date_bin` (14+), several times cheaper than arithmetic on `extract(epoch ...)`; SQLite: epoch seconds."""
    if connection.dialect.name == "postgresql":
        interval: sa.ColumnClause[Any] = sa.literal_column(f"INTERVAL '{int(seconds)} seconds'")
        return sa.func.date_bin(interval, R.timestamp, sa.literal(BUCKET_ORIGIN, sa.DateTime(timezone=True)))
    epoch = sa.cast(sa.func.strftime("%s", R.timestamp), sa.Integer)
    return (epoch // seconds) * seconds


def bucket_start(value: Any) -> int:
    """Epoch seconds of a `time_bucket` value."""
    return int(_utc(value).timestamp()) if isinstance(value, datetime) else int(value)


async def prefer_hash_aggregation(connection: AsyncConnection) -> None:
    """PostgreSQL estimates a GROUP BY on time buckets (an expression of the all but unique `timestamp`) as about
    one group per row; with the default hash memory (2 x work_mem) it then sorts every row of the range, spilling to
    disk, instead of hashing the few thousand groups there are (1.6x slower at 100,000 rows). Allow hash tables of
    16 x work_mem for the rest of this transaction."""
    if connection.dialect.name == "postgresql":
        await connection.execute(sa.text("SET LOCAL hash_mem_multiplier = 16"))


TOTAL_NAMES = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cost_usd",
)


def _totals_columns() -> list[sa.ColumnElement[Any]]:
    return [
        sa.func.count().label("requests"),
        sa.func.sum(sa.case((R.outcome != "completed", 1), else_=0)).label("errors"),
        sa.func.sum(R.input_tokens).label("input_tokens"),
        sa.func.sum(R.output_tokens).label("output_tokens"),
        sa.func.sum(R.cache_read_input_tokens).label("cache_read_input_tokens"),
        sa.func.sum(R.cache_creation_input_tokens).label("cache_creation_input_tokens"),
        sa.func.sum(R.cost_usd).label("cost_usd"),
    ]


def _totals(row: Mapping[Any, Any]) -> Totals:
    return Totals(
        requests=int(row["requests"] or 0),
        errors=int(row["errors"] or 0),
        input_tokens=int(row["input_tokens"] or 0),
        output_tokens=int(row["output_tokens"] or 0),
        cache_read_input_tokens=int(row["cache_read_input_tokens"] or 0),
        cache_creation_input_tokens=int(row["cache_creation_input_tokens"] or 0),
        cost_usd=float(row["cost_usd"] or 0.0),
    )


async def overview(
    connection: AsyncConnection, filters: RequestFilters, since: datetime, until: datetime, bucket_seconds: int
) -> Overview:
    """Totals, a time series and per train/account/model breakdowns in one pass over the range."""
    bucket = time_bucket(connection, bucket_seconds).label("bucket")
    scoped = RequestFilters(
        train_id=filters.train_id, account_id=filters.account_id, model=filters.model, since=since, until=until
    )
    dimensions = (bucket, R.train_id, R.account_id, R.model)
    # One hash aggregation over the rows by all four dimensions (thousands of groups at most) ...
    query: Any = sa.select(*dimensions, sa.literal(0).label("which"), *_totals_columns()).where(
        *request_conditions(scoped)
    )
    query = query.group_by(*dimensions)
    if connection.dialect.name == "postgresql":
        await prefer_hash_aggregation(connection)
        # ... then, on PostgreSQL, GROUPING SETS over those groups (cheap to sort), so a few hundred rows come back.
        inner = query.subquery()
        keys = (inner.c.bucket, inner.c.train_id, inner.c.account_id, inner.c.model)
        sums = [sa.func.sum(inner.c[name]).label(name) for name in TOTAL_NAMES]
        query = sa.select(*keys, sa.func.grouping(*keys).label("which"), *sums).group_by(
            sa.func.grouping_sets(*(sa.tuple_(key) for key in keys))
        )
    series: dict[int, Totals] = defaultdict(Totals)
    groups: dict[str, dict[str, Totals]] = {
        "train": defaultdict(Totals),
        "account": defaultdict(Totals),
        "model": defaultdict(Totals),
    }
    for row in (await connection.execute(query)).mappings():
        part = _totals(row)
        present = ~int(row["which"]) & 0b1111  # GROUPING() sets the bit of an absent dimension
        if present & 0b1000:
            series[bucket_start(row["bucket"])].add(part)
        if present & 0b0100:
            groups["train"][row["train_id"]].add(part)
        if present & 0b0010:
            groups["account"][row["account_id"] or "(none)"].add(part)
        if present & 0b0001:
            groups["model"][row["model"] or "(none)"].add(part)
    totals = Totals()
    for part in series.values():
        totals.add(part)
    models = groups["model"]
    first = int(_utc(since).timestamp()) // bucket_seconds * bucket_seconds
    points = [
        SeriesPoint(datetime.fromtimestamp(start, UTC), series.get(start, Totals()))
        for start in range(first, int(_utc(until).timestamp()) + 1, bucket_seconds)
    ]
    return Overview(
        since=_utc(since),
        until=_utc(until),
        bucket_seconds=bucket_seconds,
        totals=totals,
        series=points,
        by_train=_ranked(groups["train"]),
        by_account=_ranked(groups["account"]),
        by_model=_ranked(models),
    )


def _ranked(groups: Mapping[str, Totals]) -> list[NamedTotals]:
    return sorted(
        (NamedTotals(name, totals) for name, totals in groups.items()),
        key=lambda item: (-item.totals.requests, item.name),
    )


# -- storage statistics -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageStats:
    since: datetime | None
    totals: Totals
    tool_calls: int
    avg_duration_ms: float | None
    trains: int
    accounts: int
    conversations: int
    payloads: int
    content_blobs: int
    by_model: list[NamedTotals]
    # Bytes on disk per table (PostgreSQL, partitions included); None on SQLite.
    table_bytes: dict[str, int] | None


async def storage_stats(connection: AsyncConnection, since: datetime | None, train_id: str | None) -> StorageStats:
    filters = RequestFilters(since=since, train_id=train_id)
    conditions = request_conditions(filters)
    row = (
        (
            await connection.execute(
                sa.select(
                    *_totals_columns(),
                    sa.func.sum(R.tool_call_count).label("tool_calls"),
                    sa.func.avg(R.duration_ms).label("avg_duration_ms"),
                    sa.func.count(sa.distinct(R.train_id)).label("trains"),
                    sa.func.count(sa.distinct(R.account_id)).label("accounts"),
                    sa.func.count(sa.distinct(R.conversation_id)).label("conversations"),
                ).where(*conditions)
            )
        )
        .mappings()
        .one()
    )
    by_model = (
        await connection.execute(
            sa.select(R.model, *_totals_columns()).where(*conditions).group_by(R.model).order_by(sa.desc("requests"))
        )
    ).mappings()
    payload_conditions = [request_payloads.c.timestamp >= _bind_time(since)] if since else []
    payloads = (
        await connection.execute(sa.select(sa.func.count()).select_from(request_payloads).where(*payload_conditions))
    ).scalar_one()
    blobs = (await connection.execute(sa.select(sa.func.count()).select_from(content_blobs))).scalar_one()
    table_bytes = await _table_bytes(connection)
    average = row["avg_duration_ms"]
    return StorageStats(
        since=utc(since),
        totals=_totals(row),
        tool_calls=int(row["tool_calls"] or 0),
        avg_duration_ms=float(average) if average is not None else None,
        trains=int(row["trains"] or 0),
        accounts=int(row["accounts"] or 0),
        conversations=int(row["conversations"] or 0),
        payloads=int(payloads),
        content_blobs=int(blobs),
        by_model=[NamedTotals(item["model"] or "(none)", _totals(item)) for item in by_model],
        table_bytes=table_bytes,
    )


async def _table_bytes(connection: AsyncConnection) -> dict[str, int] | None:
    if connection.dialect.name != "postgresql":
        return None
    sizes: dict[str, int] = {}
    for table in ("api_requests", "request_payloads", "content_blobs"):
        # A partitioned table has no storage of its own: add up its partitions.
        size = await connection.execute(
            sa.text(
                "SELECT pg_total_relation_size(CAST(:table AS regclass)) + COALESCE(("
                " SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits"
                " WHERE inhparent = CAST(:table AS regclass)), 0)"
            ),
            {"table": table},
        )
        sizes[table] = int(size.scalar_one() or 0)
    return sizes


# -- conversations ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversationSummary:
    conversation_id: uuid.UUID
    first_timestamp: datetime
    last_timestamp: datetime
    requests: int
    branches: int  # distinct branches, main included
    subagent_branches: int
    compactions: int
    trains: list[str]
    accounts: list[str]
    models: list[str]
    totals: Totals


@dataclass(frozen=True)
class ConversationPage:
    conversations: list[ConversationSummary]
    next_cursor: str | None


def branch_kind(branch_id: str | None, is_subtask: bool = False) -> str:
    """main | branch | subagent | compaction (branch-id formats of the reference §4.4)."""
    name = branch_id or "main"
    if is_subtask or name.startswith("subtask_"):
        return "subagent"
    if name.startswith("compact_"):
        return "compaction"
    return "main" if name == "main" else "branch"


async def list_conversations(
    connection: AsyncConnection, filters: RequestFilters, *, before: Cursor | None = None, limit: int = 50
) -> ConversationPage:
    """Conversations by last activity, newest first; keyset pagination on (last activity, conversation id)."""
    last = sa.func.max(R.timestamp).label("last")
    conditions = [R.conversation_id.is_not(None), *request_conditions(filters)]
    query = sa.select(R.conversation_id, last).where(*conditions).group_by(R.conversation_id)
    if before is not None:
        stamp, key = _bind_time(before.timestamp), uuid.UUID(before.key)
        query = query.having(sa.or_(last < stamp, sa.and_(last == stamp, R.conversation_id < key)))
    query = query.order_by(last.desc(), R.conversation_id.desc()).limit(limit + 1)
    page = list((await connection.execute(query)).mappings())
    more = len(page) > limit
    page = page[:limit]
    ids = [row["conversation_id"] for row in page]
    summaries = await conversation_summaries(connection, ids)
    ordered = [summaries[identifier] for identifier in ids if identifier in summaries]
    next_cursor = None
    if more and ordered:
        tail = ordered[-1]
        next_cursor = Cursor(tail.last_timestamp, str(tail.conversation_id)).encode()
    return ConversationPage(conversations=ordered, next_cursor=next_cursor)


async def conversation_summaries(
    connection: AsyncConnection, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, ConversationSummary]:
    if not ids:
        return {}
    rows = (
        await connection.execute(
            sa.select(
                R.conversation_id,
                R.branch_id,
                R.is_subtask,
                R.train_id,
                R.account_id,
                R.model,
                sa.func.min(R.timestamp).label("first"),
                sa.func.max(R.timestamp).label("last"),
                *_totals_columns(),
            )
            .where(R.conversation_id.in_(list(ids)))
            .group_by(R.conversation_id, R.branch_id, R.is_subtask, R.train_id, R.account_id, R.model)
        )
    ).mappings()
    grouped: dict[uuid.UUID, list[Mapping[Any, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["conversation_id"]].append(row)
    summaries = {}
    for identifier, parts in grouped.items():
        totals = Totals()
        kinds: dict[str, str] = {}
        for part in parts:
            totals.add(_totals(part))
            kinds[part["branch_id"] or "main"] = branch_kind(part["branch_id"], bool(part["is_subtask"]))
        summaries[identifier] = ConversationSummary(
            conversation_id=identifier,
            first_timestamp=min(_utc(part["first"]) for part in parts),
            last_timestamp=max(_utc(part["last"]) for part in parts),
            requests=totals.requests,
            branches=len(kinds),
            subagent_branches=sum(1 for kind in kinds.values() if kind == "subagent"),
            compactions=sum(1 for kind in kinds.values() if kind == "compaction"),
            trains=sorted({part["train_id"] for part in parts}),
            accounts=sorted({part["account_id"] for part in parts if part["account_id"]}),
            models=sorted({part["model"] for part in parts if part["model"]}),
            totals=totals,
        )
    return summaries


@dataclass(frozen=True)
class ConversationRequest:
    request_id: uuid.UUID
    timestamp: datetime
    train_id: str
    account_id: str | None
    model: str | None
    status_code: int | None
    outcome: str
    duration_ms: float | None
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int
    cost_usd: float
    tool_call_count: int
    stop_reason: str | None
    branch_id: str
    is_subtask: bool
    parent_request_id: uuid.UUID | None
    parent_task_request_id: uuid.UUID | None
    message_count: int
    task_tool_invocation: Any
    tool_result_names: Any


@dataclass(frozen=True)
class BranchSummary:
    branch_id: str
    kind: str
    requests: int
    first_timestamp: datetime
    last_timestamp: datetime
    totals: Totals
    # For a sub-agent branch: the request whose Agent/Task tool_use started it, and that call's description.
    parent_task_request_id: uuid.UUID | None = None
    task_description: str | None = None


@dataclass(frozen=True)
class ConversationDetail:
    summary: ConversationSummary
    branches: list[BranchSummary]
    requests: list[ConversationRequest]
    costs: Any = field(default=None)  # conversation_costs() of the linking work, when available


CONVERSATION_COLUMNS = tuple(getattr(R, name) for name in ConversationRequest.__dataclass_fields__)


async def get_conversation(connection: AsyncConnection, conversation_id: uuid.UUID) -> ConversationDetail | None:
    rows = (
        await connection.execute(
            sa.select(*CONVERSATION_COLUMNS)
            .where(R.conversation_id == conversation_id)
            .order_by(R.timestamp.asc(), R.request_id.asc())
        )
    ).mappings()
    requests = []
    for row in rows:
        values = dict(row)
        values["timestamp"] = _utc(values["timestamp"])
        values["branch_id"] = values["branch_id"] or "main"
        requests.append(ConversationRequest(**values))
    if not requests:
        return None
    summary = (await conversation_summaries(connection, [conversation_id]))[conversation_id]
    return ConversationDetail(summary=summary, branches=summarise_branches(requests), requests=requests)


def summarise_branches(requests: Sequence[ConversationRequest]) -> list[BranchSummary]:
    """One entry per branch in order of first appearance (main first), sub-agents tied to their Agent call."""
    by_id = {request.request_id: request for request in requests}
    order: dict[str, list[ConversationRequest]] = {}
    for request in requests:
        order.setdefault(request.branch_id, []).append(request)
    branches = []
    for name, members in order.items():
        totals = Totals()
        for member in members:
            totals.add(
                Totals(
                    requests=1,
                    errors=int(member.outcome != "completed"),
                    input_tokens=member.input_tokens,
                    output_tokens=member.output_tokens,
                    cache_read_input_tokens=member.cache_read_input_tokens,
                    cache_creation_input_tokens=member.cache_creation_input_tokens,
                    cost_usd=member.cost_usd,
                )
            )
        parent = next((m.parent_task_request_id for m in members if m.parent_task_request_id), None)
        branches.append(
            BranchSummary(
                branch_id=name,
                kind=branch_kind(name, any(member.is_subtask for member in members)),
                requests=len(members),
                first_timestamp=members[0].timestamp,
                last_timestamp=members[-1].timestamp,
                totals=totals,
                parent_task_request_id=parent,
                task_description=_task_description(by_id.get(parent) if parent else None, members[0]),
            )
        )
    branches.sort(key=lambda branch: (branch.branch_id != "main", branch.first_timestamp))
    return branches


def _task_description(parent: ConversationRequest | None, first: ConversationRequest) -> str | None:
    """The description (or prompt) of the parent's Agent/Task call; with several calls, the one whose position
    matches the branch number when it can tell (`subtask_<n>`), else the first."""
    if parent is None or not isinstance(parent.task_tool_invocation, list):
        return None
    calls = [call for call in parent.task_tool_invocation if isinstance(call, dict)]
    if not calls:
        return None
    chosen = calls[0]
    suffix = first.branch_id.removeprefix("subtask_")
    if suffix.isdigit() and 0 < int(suffix) <= len(calls):
        chosen = calls[int(suffix) - 1]
    tool_input = chosen.get("input")
    if not isinstance(tool_input, dict):
        return None
    text = tool_input.get("description") or tool_input.get("prompt")
    return str(text)[:300] if text else None


# -- subscription windows and token usage -----------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    utilization: float | None  # 0..1 as Anthropic reports it
    resets_at: datetime | None
    tokens: Totals


@dataclass(frozen=True)
class AccountUsage:
    account_id: str
    status: str | None  # anthropic-ratelimit-unified-status of the latest response that carried it
    observed_at: datetime | None
    five_hour: Window
    seven_day: Window
    last_request: datetime | None


@dataclass(frozen=True)
class TrainUsage:
    train_id: str
    five_hour: Totals
    seven_day: Totals


@dataclass(frozen=True)
class UsagePoint:
    start: datetime
    account_id: str
    output_tokens: int
    input_tokens: int


@dataclass(frozen=True)
class TokenUsage:
    now: datetime
    accounts: list[AccountUsage]
    trains: list[TrainUsage]
    hourly: list[UsagePoint]  # the last 7 days, per account


@dataclass(frozen=True)
class WindowReading:
    status: str | None
    observed_at: datetime
    five_hour_utilization: float | None
    five_hour_reset: datetime | None
    seven_day_utilization: float | None
    seven_day_reset: datetime | None


def window_from_headers(headers: Mapping[str, Any], observed_at: datetime) -> WindowReading | None:
    """Read Anthropic's `anthropic-ratelimit-unified-*` response headers (utilisation 0..1, resets in epoch s)."""
    values = {str(key).lower(): value for key, value in headers.items()}
    if not any(key.startswith(RATELIMIT_HEADER) for key in values):
        return None

    def number(name: str) -> float | None:
        try:
            return float(values[RATELIMIT_HEADER + name])
        except (KeyError, TypeError, ValueError):
            return None

    def moment(name: str) -> datetime | None:
        seconds = number(name)
        if seconds is None:
            return None
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None

    status = values.get(RATELIMIT_HEADER + "status")
    return WindowReading(
        status=str(status) if status is not None else None,
        observed_at=observed_at,
        five_hour_utilization=number("5h-utilization"),
        five_hour_reset=moment("5h-reset"),
        seven_day_utilization=number("7d-utilization"),
        seven_day_reset=moment("7d-reset"),
    )


async def token_usage(connection: AsyncConnection, now: datetime, accounts: Iterable[str] = ()) -> TokenUsage:
    """Per account: 5-hour and 7-day utilisation with reset times, and the tokens sent within each window (the
    window Anthropic reports when a reset time is known, else the trailing 5 hours / 7 days); per train: tokens in
    the trailing windows; hourly tokens per account over 7 days.

    At most five queries, however many accounts there are: one pass over the week grouped by hour, account and
    train; the accounts' last requests stamped after `now`; the newest reading per account; stored headers for
    accounts without one; the rows between a window's start and the next full hour."""
    now = _utc(now)
    week_ago = now - SEVEN_DAYS
    week = await _week_by_hour(connection, week_ago, now)
    last_request = dict(week.last_request)
    for account, stamp in await _requests_after(connection, now):
        last_request[account] = max(stamp, last_request.get(account, stamp))
    names = sorted(set(last_request) | set(accounts))
    readings = await _latest_windows(connection, names, week_ago - timedelta(days=1))
    without = [name for name in names if name not in readings and name in last_request]
    readings.update(await _windows_from_headers(connection, without, week_ago))
    starts: dict[tuple[str, timedelta], datetime] = {}
    for name in names:
        reading = readings.get(name)
        starts[(name, FIVE_HOURS)] = _window_start(reading.five_hour_reset if reading else None, FIVE_HOURS, now)
        starts[(name, SEVEN_DAYS)] = _window_start(reading.seven_day_reset if reading else None, SEVEN_DAYS, now)
    tokens = await _window_tokens(connection, week, starts, now)
    usage = []
    for name in names:
        reading = readings.get(name)
        usage.append(
            AccountUsage(
                account_id=name,
                status=reading.status if reading else None,
                observed_at=reading.observed_at if reading else None,
                five_hour=Window(
                    reading.five_hour_utilization if reading else None,
                    reading.five_hour_reset if reading else None,
                    tokens[(name, FIVE_HOURS)],
                ),
                seven_day=Window(
                    reading.seven_day_utilization if reading else None,
                    reading.seven_day_reset if reading else None,
                    tokens[(name, SEVEN_DAYS)],
                ),
                last_request=last_request.get(name),
            )
        )
    return TokenUsage(now=now, accounts=usage, trains=week.trains, hourly=week.hourly())


def _window_start(reset: datetime | None, length: timedelta, now: datetime) -> datetime:
    if reset is not None and reset > now and reset - length <= now:
        return reset - length
    return now - length


HOUR = timedelta(hours=1)


@dataclass
class _Week:
    """The rows of [since, until] summed per hour and account, and per train (all, and the last 5 hours)."""

    since: datetime
    hours: dict[str, dict[datetime, Totals]] = field(default_factory=dict)  # account -> hour start -> totals
    last_request: dict[str, datetime] = field(default_factory=dict)
    trains: list[TrainUsage] = field(default_factory=list)

    def hourly(self) -> list[UsagePoint]:
        points = [
            UsagePoint(start, account, totals.output_tokens, totals.input_tokens)
            for account, hours in self.hours.items()
            for start, totals in hours.items()
        ]
        points.sort(key=lambda point: (point.start, point.account_id))
        return points


async def _week_by_hour(connection: AsyncConnection, since: datetime, until: datetime) -> _Week:
    """One pass over the rows: grouped by hour, train, account and whether the row is from the last 5 hours, then (on
    PostgreSQL) regrouped by (hour, account) and (train, last 5 hours), so a few hundred rows come back."""
    bucket = time_bucket(connection, int(HOUR.total_seconds())).label("bucket")  # whole UTC hours
    recent = (R.timestamp >= _bind_time(until - FIVE_HOURS)).label("recent")
    dimensions = (bucket, R.train_id, R.account_id, recent)
    query: Any = (
        sa.select(*dimensions, sa.literal(0).label("which"), *_totals_columns(), sa.func.max(R.timestamp).label("last"))
        .where(R.timestamp >= _bind_time(since), R.timestamp <= _bind_time(until))
        .group_by(*dimensions)
    )
    if connection.dialect.name == "postgresql":
        await prefer_hash_aggregation(connection)
        inner = query.subquery()
        keys = (inner.c.bucket, inner.c.train_id, inner.c.account_id, inner.c.recent)
        sums = [sa.func.sum(inner.c[name]).label(name) for name in TOTAL_NAMES]
        query = (
            sa.select(*keys, sa.func.grouping(*keys).label("which"), *sums, sa.func.max(inner.c["last"]).label("last"))
            .group_by(sa.func.grouping_sets(sa.tuple_(keys[0], keys[2]), sa.tuple_(keys[1], keys[3])))
            .order_by(inner.c.train_id)
        )
    else:
        query = query.order_by(R.train_id)
    week = _Week(since)
    trains: dict[str, tuple[Totals, Totals]] = {}
    for row in (await connection.execute(query)).mappings():
        part = _totals(row)
        present = ~int(row["which"]) & 0b1111  # GROUPING() sets the bit of an absent dimension
        account = row["account_id"]
        if present & 0b1010 == 0b1010 and account is not None:
            start = datetime.fromtimestamp(bucket_start(row["bucket"]), UTC)
            week.hours.setdefault(account, {}).setdefault(start, Totals()).add(part)
            last = _utc(row["last"])
            week.last_request[account] = max(last, week.last_request.get(account, last))
        if present & 0b0101 == 0b0101:
            seven, five = trains.setdefault(row["train_id"], (Totals(), Totals()))
            seven.add(part)
            if row["recent"]:
                five.add(part)
    week.trains = [
        TrainUsage(train_id=train, five_hour=five, seven_day=seven) for train, (seven, five) in trains.items()
    ]
    return week


async def _requests_after(connection: AsyncConnection, moment: datetime) -> list[tuple[str, datetime]]:
    """Per account, the newest request stamped after `moment` (a proxy whose clock is ahead of this one's)."""
    rows = await connection.execute(
        sa.select(R.account_id, sa.func.max(R.timestamp))
        .where(R.timestamp > _bind_time(moment), R.account_id.is_not(None))
        .group_by(R.account_id)
    )
    return [(account, _utc(stamp)) for account, stamp in rows]


def _names(names: Sequence[str]) -> sa.Subquery:
    """The account names as a table with an `account_id` column (a UNION ALL of one-row selects: both dialects)."""
    selects = [sa.select(sa.literal(name, sa.String).label("account_id")) for name in names]
    return (selects[0] if len(selects) == 1 else sa.union_all(*selects)).subquery("names")


async def _latest_windows(
    connection: AsyncConnection, names: Sequence[str], since: datetime
) -> dict[str, WindowReading]:
    """Per account, the newest row since `since` with ratelimit_* columns (one index look-up per account)."""
    if not names:
        return {}
    accounts = _names(names)
    other = api_requests.alias("other")
    latest = (
        sa.select(sa.func.max(other.c.timestamp))
        .where(
            other.c.account_id == accounts.c.account_id,
            other.c.timestamp >= _bind_time(since),
            sa.or_(other.c.ratelimit_5h_utilization.is_not(None), other.c.ratelimit_7d_utilization.is_not(None)),
        )
        .scalar_subquery()
    )
    newest = sa.select(accounts.c.account_id, latest.label("latest")).subquery("newest")
    rows = (
        await connection.execute(
            sa.select(
                R.account_id,
                R.timestamp,
                R.ratelimit_status,
                R.ratelimit_5h_utilization,
                R.ratelimit_5h_reset,
                R.ratelimit_7d_utilization,
                R.ratelimit_7d_reset,
            )
            .join(newest, sa.and_(R.account_id == newest.c.account_id, R.timestamp == newest.c.latest))
            .where(R.timestamp >= _bind_time(since))
        )
    ).mappings()
    return {
        row["account_id"]: WindowReading(
            status=row["ratelimit_status"],
            observed_at=_utc(row["timestamp"]),
            five_hour_utilization=row["ratelimit_5h_utilization"],
            five_hour_reset=utc(row["ratelimit_5h_reset"]),
            seven_day_utilization=row["ratelimit_7d_utilization"],
            seven_day_reset=utc(row["ratelimit_7d_reset"]),
        )
        for row in rows
    }


HEADER_LOOKBACK = 50


async def _windows_from_headers(
    connection: AsyncConnection, names: Sequence[str], since: datetime
) -> dict[str, WindowReading]:
    """For accounts whose rows predate the ratelimit_* columns: the stored headers of each one's latest responses (a
    bounded look-back on the (account_id, timestamp) index, so an account without such headers costs little)."""
    if not names:
        return {}
    accounts = _names(names)
    other = api_requests.alias("other")
    # The timestamp of the account's HEADER_LOOKBACK-th newest row (none when it has fewer).
    cutoff = (
        sa.select(other.c.timestamp)
        .where(other.c.account_id == accounts.c.account_id, other.c.timestamp >= _bind_time(since))
        .order_by(other.c.timestamp.desc())
        .limit(1)
        .offset(HEADER_LOOKBACK - 1)
        .scalar_subquery()
    )
    oldest = sa.func.coalesce(cutoff, sa.literal(_bind_time(since), sa.DateTime(timezone=True)))
    bounds = sa.select(accounts.c.account_id, oldest.label("oldest")).subquery("bounds")
    rows = await connection.execute(
        sa.select(R.account_id, R.timestamp, R.response_headers)
        .join(bounds, sa.and_(R.account_id == bounds.c.account_id, R.timestamp >= bounds.c.oldest))
        .where(R.timestamp >= _bind_time(since))
        .order_by(R.account_id, R.timestamp.desc())
    )
    readings: dict[str, WindowReading] = {}
    looked: dict[str, int] = defaultdict(int)
    for account, stamp, headers in rows:
        looked[account] += 1
        if account in readings or looked[account] > HEADER_LOOKBACK or not isinstance(headers, dict):
            continue
        reading = window_from_headers(headers, _utc(stamp))
        if reading is not None:
            readings[account] = reading
    return readings


async def _window_tokens(
    connection: AsyncConnection, week: _Week, starts: Mapping[tuple[str, timedelta], datetime], now: datetime
) -> dict[tuple[str, timedelta], Totals]:
    """The totals of each account's rows from its window's start to `now`: the hours of `week` that lie wholly
    inside the window, plus (one query for all windows) the rows between a start and the next full hour."""
    tokens: dict[tuple[str, timedelta], Totals] = {}
    edges: list[tuple[tuple[str, timedelta], datetime, datetime]] = []
    for key, start in starts.items():
        first = start.replace(minute=0, second=0, microsecond=0)
        if first < start and start > week.since:
            first += HOUR
            edges.append((key, start, first))
        totals = Totals()
        for hour, part in week.hours.get(key[0], {}).items():
            if hour >= first:
                totals.add(part)
        tokens[key] = totals
    if edges:
        ranges = [
            sa.select(
                sa.literal(index).label("edge"),
                sa.literal(account, sa.String).label("account_id"),
                sa.literal(_bind_time(start), sa.DateTime(timezone=True)).label("start"),
                sa.literal(_bind_time(stop), sa.DateTime(timezone=True)).label("stop"),
            )
            for index, ((account, _), start, stop) in enumerate(edges)
        ]
        table = (ranges[0] if len(ranges) == 1 else sa.union_all(*ranges)).subquery("edges")
        rows = (
            await connection.execute(
                sa.select(table.c.edge, *_totals_columns())
                .join_from(
                    table,
                    api_requests,
                    sa.and_(
                        R.account_id == table.c.account_id, R.timestamp >= table.c.start, R.timestamp < table.c.stop
                    ),
                )
                .where(R.timestamp >= _bind_time(min(start for _, start, _ in edges)), R.timestamp <= _bind_time(now))
                .group_by(table.c.edge)
            )
        ).mappings()
        for row in rows:
            tokens[edges[row["edge"]][0]].add(_totals(row))
    return tokens


# -- trains and accounts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainAccountActivity:
    train_id: str
    account_id: str | None
    requests: int
    last_request: datetime
    totals: Totals


async def train_account_activity(connection: AsyncConnection) -> list[TrainAccountActivity]:
    rows = (
        await connection.execute(
            sa.select(R.train_id, R.account_id, sa.func.max(R.timestamp).label("last"), *_totals_columns())
            .group_by(R.train_id, R.account_id)
            .order_by(R.train_id, R.account_id)
        )
    ).mappings()
    return [
        TrainAccountActivity(
            train_id=row["train_id"],
            account_id=row["account_id"],
            requests=int(row["requests"]),
            last_request=_utc(row["last"]),
            totals=_totals(row),
        )
        for row in rows
    ]


@dataclass(frozen=True)
class FilterChoices:
    trains: list[str]
    accounts: list[str]
    models: list[str]


async def filter_choices(connection: AsyncConnection, since: datetime) -> FilterChoices:
    """Distinct trains, accounts and models seen since `since` (for the filter inputs' suggestions)."""
    rows = (
        await connection.execute(
            sa.select(R.train_id, R.account_id, R.model)
            .where(R.timestamp >= _bind_time(since))
            .group_by(R.train_id, R.account_id, R.model)
        )
    ).all()
    return FilterChoices(
        trains=sorted({train for train, _, _ in rows}),
        accounts=sorted({account for _, account, _ in rows if account}),
        models=sorted({model for _, _, model in rows if model}),
    )


def json_default(value: Any) -> Any:
    """orjson fallback for the few types it does not know: asyncpg's own UUID class, Decimal from aggregates."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if hasattr(value, "__float__"):
        return float(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def to_json(value: Any) -> bytes:
    return orjson.dumps(value, default=json_default, option=orjson.OPT_NON_STR_KEYS)
