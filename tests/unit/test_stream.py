"""Rebuilding a streamed Messages response from the captured SSE chunks."""

from __future__ import annotations

import gzip
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from prompttrain.conversation.stream import summarise_stream
from prompttrain.storage.records import ExchangeRecord, Outcome, build_row


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)


START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-opus-5",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 500, "output_tokens": 1},
    },
}
EVENTS = [
    START,
    {"type": "ping"},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me "}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "think."}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig=="}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "opaque"}},
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "Running "}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "text_delta", "text": "it."}},
    {"type": "content_block_stop", "index": 2},
    {
        "type": "content_block_start",
        "index": 3,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "Agent", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 3,
        "delta": {"type": "input_json_delta", "partial_json": '{"prompt": "Find'},
    },
    {
        "type": "content_block_delta",
        "index": 3,
        "delta": {"type": "input_json_delta", "partial_json": ' bugs", "n": 2}'},
    },
    {"type": "content_block_stop", "index": 3},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 42},
    },
    {"type": "message_stop"},
]
EXPECTED = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-opus-5",
    "content": [
        {"type": "thinking", "thinking": "Let me think.", "signature": "sig=="},
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "text", "text": "Running it."},
        {"type": "tool_use", "id": "toolu_1", "name": "Agent", "input": {"prompt": "Find bugs", "n": 2}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "cache_read_input_tokens": 500, "output_tokens": 42},
}


def test_rebuilds_every_block_kind_whatever_the_chunking() -> None:
    body = sse(*EVENTS)
    for size in (1, 7, 64, len(body)):
        chunks = [(float(i), body[i : i + size]) for i in range(0, len(body), size)]
        summary = summarise_stream(chunks)
        assert summary.message == EXPECTED
        assert summary.complete and summary.error is None


def test_first_token_time_is_the_first_content_delta() -> None:
    parts = [sse(START), sse(*EVENTS[1:3]), sse(*EVENTS[3:])]
    summary = summarise_stream([(1.0, parts[0]), (2.0, parts[1]), (3.0, parts[2])])
    assert summary.first_token_at == 3.0


def test_crlf_framing_and_an_in_band_error() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    body = sse(START, error).replace(b"\n", b"\r\n")
    summary = summarise_stream([(0.0, body)])
    assert summary.error == {"type": "overloaded_error", "message": "Overloaded"}
    assert not summary.complete


def record(**fields: Any) -> ExchangeRecord:
    base = ExchangeRecord(
        request_id=uuid.uuid4(),
        started_at=datetime.now(UTC),
        started=100.0,
        method="POST",
        path="/v1/messages",
        train_id="t",
    )
    for key, value in fields.items():
        setattr(base, key, value)
    return base


def test_build_row_from_a_gzipped_stream() -> None:
    body = gzip.compress(sse(*EVENTS))
    row = build_row(
        record(
            status_code=200,
            content_type="text/event-stream",
            content_encoding="gzip",
            chunks=[(100.5, body[:10]), (101.0, body[10:])],
            upstream_sent=100.1,
            finished=102.0,
            stream=True,
        )
    )
    assert row["response_body"] == EXPECTED
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_input_tokens"]) == (10, 42, 500)
    assert (row["tool_call_count"], row["stop_reason"], row["outcome"]) == (1, "tool_use", Outcome.COMPLETED)
    assert row["duration_ms"] == 2000.0 and row["upstream_ms"] == 1900.0


def test_build_row_marks_truncated_streams_and_upstream_errors() -> None:
    truncated = build_row(record(status_code=200, content_type="text/event-stream", chunks=[(101.0, sse(*EVENTS[:5]))]))
    assert (truncated["outcome"], truncated["error_type"]) == (Outcome.STREAM_ERROR, "incomplete_stream")
    error_body = orjson.dumps({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}})
    limited = build_row(record(status_code=429, content_type="application/json", chunks=[(101.0, error_body)]))
    assert (limited["outcome"], limited["error_type"], limited["error_message"]) == (
        Outcome.UPSTREAM_ERROR,
        "rate_limit_error",
        "slow",
    )
    assert limited["input_tokens"] == 0
    garbage = build_row(record(status_code=502, content_type="text/html", chunks=[(101.0, b"<html>bad gateway")]))
    assert garbage["outcome"] == Outcome.UPSTREAM_ERROR
    assert garbage["response_body"] == {"unparsed_body": "<html>bad gateway"}
