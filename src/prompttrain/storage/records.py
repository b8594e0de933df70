"""What the request path captures about one exchange, and how the writer turns it into a row.

The request path only fills an `ExchangeRecord` (cheap: references to bytes it already has, monotonic times);
everything that costs CPU — decompressing, parsing JSON or SSE, rebuilding the streamed message — happens in
`build_row`, which the background writer runs off the request path.
"""

from __future__ import annotations

import os
import random
import uuid
import zlib
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson

from prompttrain.conversation.attribution import tool_result_names
from prompttrain.conversation.hashing import Addresses
from prompttrain.conversation.linking import SUBAGENT_TOOLS, compact_summary_of, facts_of
from prompttrain.conversation.pricing import FREE, active_pricing
from prompttrain.conversation.ratelimits import parse_windows
from prompttrain.conversation.stream import summarise_stream
from prompttrain.conversation.usage import tool_calls_of, usage_of
from prompttrain.storage.content import DIGEST_SIZE, SplitBody, split_body

MAX_ERROR_MESSAGE = 2000
LINK_KEY = "_link"  # the row key carrying LinkFacts from the converter to the insert (not a column)
# Request ids are UUIDv4 drawn from a generator seeded once from the OS: unique, not secret (they are sent to the
# client), and without a getrandom() system call per request (`uuid.uuid4` showed up in the proxy's profile).
_ids = random.Random(os.urandom(32))


def new_request_id() -> uuid.UUID:
    return uuid.UUID(int=_ids.getrandbits(128), version=4)


class Outcome:
    COMPLETED = "completed"
    UPSTREAM_ERROR = "upstream_error"
    STREAM_ERROR = "stream_error"
    CLIENT_DISCONNECTED = "client_disconnected"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    REJECTED = "rejected"
    INTERRUPTED = "interrupted"


@dataclass
class ExchangeRecord:
    request_id: uuid.UUID
    started_at: datetime
    started: float  # time.perf_counter() when the request arrived
    method: str
    path: str
    train_id: str
    account_id: str | None = None
    request_headers: dict[str, str] = field(default_factory=dict)
    request_body: bytes | None = None
    model: str | None = None
    stream: bool = False
    session_id: str | None = None
    status_code: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    content_type: str = ""
    content_encoding: str = ""
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    upstream_sent: float | None = None
    upstream_headers: float | None = None
    finished: float | None = None
    overhead_ms: float | None = None
    outcome: str = Outcome.COMPLETED
    error_type: str | None = None
    error_message: str | None = None
    response_override: dict[str, Any] | None = None  # a proxy-generated error body
    payload_shed: bool = False
    parsed_body: Any = None  # the request body as the proxy parsed it, so the writer need not parse it again
    accounted_bytes: int = 0  # what the writer's payload budget counted for this record

    @property
    def size(self) -> int:
        """Bytes held in memory for this record (what payload shedding budgets)."""
        return len(self.request_body or b"") + sum(len(chunk) for _, chunk in self.chunks)

    def __getstate__(self) -> dict[str, Any]:
        # Sent to the recording process without the parsed body: pickling a parsed 200 KB body costs the request
        # path more than parsing it again costs the recorder (`request_json`).
        state = self.__dict__.copy()
        state["parsed_body"] = None
        return state

    def request_json(self) -> Any:
        """The parsed body of a Messages request (what the proxy validated), parsed again if it was not kept."""
        if self.parsed_body is None and self.request_body and self.is_messages_request:
            try:
                parsed = orjson.loads(self.request_body)
            except orjson.JSONDecodeError:
                return None
            self.parsed_body = parsed if isinstance(parsed, dict) else None
        return self.parsed_body

    @property
    def is_messages_request(self) -> bool:
        return self.method == "POST" and self.path.partition("?")[0] == "/v1/messages"


class RecordSink(Protocol):
    """Where the request path hands finished exchanges: `submit` returns at once and never raises."""

    def submit(self, record: ExchangeRecord) -> None: ...


@dataclass(frozen=True)
class PayloadRow:
    """The bodies of one request, ready for `request_payloads`, plus the content blobs they reference."""

    row: dict[str, Any]
    blobs: Mapping[bytes, str]
    size: int


def _decompress(body: bytes, encoding: str) -> bytes:
    encoding = encoding.lower().strip()
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)
    return body


def _millis(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000.0, 3)


@dataclass(frozen=True)
class BuiltRows:
    """What the writer makes of one exchange."""

    metadata: dict[str, Any]  # the api_requests row
    payload: PayloadRow | None  # None when the bodies are shed or not stored
    message: dict[str, Any] | None  # the response message (JSON, or rebuilt from the stream)


def build_rows(
    record: ExchangeRecord,
    *,
    keep_payload: bool = True,
    known_blobs: Container[bytes] = frozenset(),
    split: SplitBody | None = None,
) -> BuiltRows:
    """The `api_requests` row and, unless shed, the `request_payloads` row of a captured exchange.

    `split` is the request body's `split_body` when the caller already has it (`storage/recent_bodies.py`).
    """
    row, message = _metadata_row(record)
    if record.payload_shed or not keep_payload:
        row.update(conversation_columns(record.parsed_body, message, addresses_of(record.parsed_body, split)))
        row["payload_shed"] = record.payload_shed
        return BuiltRows(row, None, message)
    body = record.request_body
    if split is None and body:
        split = split_body(body, record.parsed_body, known_blobs)
    # The content digests just computed spare linking the normalisation of messages it has seen before.
    row.update(conversation_columns(record.parsed_body, message, addresses_of(record.parsed_body, split)))
    return BuiltRows(row, payload_row(record, message, known_blobs, split), message)


def addresses_of(body: Any, split: SplitBody | None) -> Addresses | None:
    if split is None or not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return None
    digests = split.message_digests
    return Addresses(
        messages={
            id(item): digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
            for index, item in enumerate(body["messages"])
        },
        system=split.system_refs,
    )


def conversation_columns(
    body: Any, message: dict[str, Any] | None, addresses: Addresses | None = None
) -> dict[str, Any]:
    """Hashes and markers for conversation linking (done at insert, storage/linking_store.py)."""
    facts = facts_of(body, message, addresses)
    if facts is None:
        return {}
    return {
        LINK_KEY: facts.to_json(),
        "current_message_hash": facts.current_hash,
        "system_hash": facts.system_hash,
        "message_count": facts.message_count,
        "compact_summary": compact_summary_of(facts, message),
        "tool_result_names": tool_result_names(body) or None,
        "task_tool_invocation": [
            {"id": block.get("id"), "name": block.get("name"), "input": block.get("input")}
            for block in tool_calls_of(message)
            if block.get("name") in SUBAGENT_TOOLS
        ]
        or None,
    }


def build_row(record: ExchangeRecord) -> dict[str, Any]:
    """The `api_requests` row plus `response_body` (the rebuilt message): what tests and tools inspect."""
    row, message = _metadata_row(record)
    return {**row, **conversation_columns(record.parsed_body, message), "response_body": message}


def payload_row(
    record: ExchangeRecord,
    message: dict[str, Any] | None,
    known_blobs: Container[bytes] = frozenset(),
    split: SplitBody | None = None,
) -> PayloadRow:
    body = record.request_body
    if split is None and body:
        split = split_body(body, record.parsed_body, known_blobs)
    row: dict[str, Any] = {
        "request_id": record.request_id,
        "timestamp": record.started_at,
        "request_template": None,
        "system_refs": None,
        "tools_refs": None,
        "message_chunks": None,
        "message_refs": None,
        "raw_request_body": None,
        "response_body": message,
    }
    blobs: Mapping[bytes, str] = {}
    if split is not None:
        row.update(
            request_template=split.template,
            system_refs=split.system_refs,
            tools_refs=split.tools_refs,
            message_chunks=split.message_chunks,
            message_refs=split.message_refs,
        )
        blobs = split.blobs
    elif body is not None:
        row["raw_request_body"] = body.decode("utf-8", "replace")
    return PayloadRow(row=row, blobs=blobs, size=record.size)


def _metadata_row(record: ExchangeRecord) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Pure CPU work; never raises on bad payloads."""
    message: dict[str, Any] | None = record.response_override
    first_token: float | None = None
    outcome, error_type, error_message = record.outcome, record.error_type, record.error_message
    if record.chunks:
        raw = b"".join(chunk for _, chunk in record.chunks)
        if "text/event-stream" in record.content_type:
            summary = summarise_stream(record.chunks) if not record.content_encoding else None
            if summary is None:
                summary = summarise_stream([(record.chunks[0][0], _safe_decompress(raw, record.content_encoding))])
            message, first_token = summary.message, summary.first_token_at
            if summary.error is not None:
                outcome = Outcome.STREAM_ERROR
                error_type = str(summary.error.get("type") or "stream_error")
                error_message = str(summary.error.get("message") or "")
            elif not summary.complete and outcome == Outcome.COMPLETED and (record.status_code or 0) < 400:
                outcome, error_type = Outcome.STREAM_ERROR, "incomplete_stream"
                error_message = "the upstream stream ended before message_stop"
        else:
            decoded = _safe_decompress(raw, record.content_encoding)
            try:
                parsed = orjson.loads(decoded) if decoded else None
            except orjson.JSONDecodeError:
                parsed = {"unparsed_body": decoded[:MAX_ERROR_MESSAGE].decode("utf-8", "replace")}
            message = parsed if isinstance(parsed, dict) else {"body": parsed}
            first_token = record.chunks[0][0]
    status = record.status_code
    if status is not None and status >= 400 and outcome == Outcome.COMPLETED:
        outcome = Outcome.UPSTREAM_ERROR
    if status is not None and status >= 400 and error_type is None and isinstance(message, dict):
        error = message.get("error")
        if isinstance(error, dict):
            error_type = str(error.get("type") or "error")
            error_message = str(error.get("message") or "")
    usage = usage_of(message) if status is not None and status < 400 else usage_of(None)
    tools = tool_calls_of(message) if status is not None and status < 400 else []
    upstream_usage = message.get("usage") if isinstance(message, dict) else None
    row = {
        "request_id": record.request_id,
        "timestamp": record.started_at,
        "train_id": record.train_id,
        "account_id": record.account_id,
        "method": record.method,
        "path": record.path[:2048],
        "model": record.model[:255] if record.model else None,
        "stream": record.stream,
        "status_code": status,
        "outcome": outcome,
        "error_type": error_type[:100] if error_type else None,
        "error_message": error_message[:MAX_ERROR_MESSAGE] if error_message else None,
        "duration_ms": _millis(record.started, record.finished),
        "upstream_ms": _millis(record.upstream_sent, record.finished),
        "first_token_ms": _millis(record.started, first_token),
        "overhead_ms": record.overhead_ms,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "usage": upstream_usage if isinstance(upstream_usage, dict) else None,
        "stop_reason": _stop_reason(message),
        "tool_call_count": len(tools),
        "session_id": record.session_id[:255] if record.session_id else None,
        "upstream_request_id": record.response_headers.get("request-id"),
        "request_headers": record.request_headers,
        "response_headers": record.response_headers or None,
        "request_bytes": len(record.request_body or b""),
        "payload_shed": False,
    }
    row.update(_cost_and_windows(record, message, status))
    return row, message


def _safe_decompress(body: bytes, encoding: str) -> bytes:
    try:
        return _decompress(body, encoding)
    except zlib.error:
        return b""


def _stop_reason(message: dict[str, Any] | None) -> str | None:
    if not isinstance(message, dict):
        return None
    value = message.get("stop_reason")
    return str(value)[:64] if value is not None else None


def _cost_and_windows(record: ExchangeRecord, message: dict[str, Any] | None, status: int | None) -> dict[str, Any]:
    """`cost_usd`/`cost_estimated` (pricing table) and the subscription windows (rate-limit response headers)."""
    cost = FREE
    if status is not None and status < 400 and isinstance(message, dict):
        # The response names the model that served (and billed) the request; the request's is the fallback.
        served = message.get("model")
        model = served if isinstance(served, str) and served else record.model
        cost = active_pricing().cost(model, message.get("usage"), record.started_at)
    windows = parse_windows(record.response_headers) if record.response_headers else None
    five_hours = windows.window("5h") if windows is not None else None
    seven_days = windows.window("7d") if windows is not None else None
    return {
        "cost_usd": round(cost.usd, 9),
        "cost_estimated": cost.estimated,
        "ratelimit_status": windows.status if windows is not None else None,
        "ratelimit_5h_utilization": five_hours.utilization if five_hours is not None else None,
        "ratelimit_5h_reset": five_hours.resets_at if five_hours is not None else None,
        "ratelimit_7d_utilization": seven_days.utilization if seven_days is not None else None,
        "ratelimit_7d_reset": seven_days.resets_at if seven_days is not None else None,
    }
