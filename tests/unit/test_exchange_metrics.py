"""Rows carry cost and subscription windows; metric labels stay bounded; the usage observer counts the right things."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY, generate_latest

from prompttrain.conversation.ratelimits import parse_windows, status_label
from prompttrain.proxy import exchange_metrics
from prompttrain.proxy.exchange_metrics import ModelLabels, UsageMeter, request_finished, status_class
from prompttrain.storage.records import ExchangeRecord, Outcome, build_rows
from prompttrain.upstream_fake.replies import rate_limit_headers

NOW = 1_790_000_000.0


def record(train: str, *, body: dict[str, Any] | None = None, status: int = 200, **fields: Any) -> ExchangeRecord:
    started = time.perf_counter()
    exchange = ExchangeRecord(
        request_id=uuid.uuid4(),
        started_at=datetime.now(UTC),
        started=started,
        method="POST",
        path="/v1/messages",
        train_id=train,
        account_id="acct",
        model="claude-sonnet-4-5",
        status_code=status,
        content_type="application/json",
        response_headers={**rate_limit_headers(NOW), "request-id": "req_1"},
        upstream_sent=started + 0.001,
        finished=started + 0.5,
        **fields,
    )
    if body is not None:
        exchange.chunks = [(started + 0.2, orjson.dumps(body))]
    return exchange


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


MESSAGE = {
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "hi"}],
    "stop_reason": "end_turn",
    "usage": {
        "input_tokens": 1000,
        "output_tokens": 200,
        "cache_read_input_tokens": 5000,
        "cache_creation_input_tokens": 400,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 300},
    },
}


def test_the_row_carries_cost_and_the_subscription_windows() -> None:
    row = build_rows(record("rows", body=MESSAGE)).metadata
    expected = (1000 * 3 + 200 * 15 + 5000 * 0.3 + 100 * 3.75 + 300 * 6) / 1e6
    assert row["cost_usd"] == pytest.approx(expected)
    assert row["cost_estimated"] is False
    assert row["ratelimit_status"] == "allowed"
    assert (row["ratelimit_5h_utilization"], row["ratelimit_7d_utilization"]) == (0.42, 0.18)
    assert row["ratelimit_5h_reset"] == datetime.fromtimestamp((int(NOW) // 18000 + 1) * 18000, UTC)
    assert row["ratelimit_7d_reset"] == datetime.fromtimestamp((int(NOW) // 604800 + 1) * 604800, UTC)


def test_errors_cost_nothing_and_api_key_responses_have_no_windows() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    exchange = record("rows", body=error, status=529)
    exchange.response_headers = {"request-id": "req_2"}
    row = build_rows(exchange).metadata
    assert (row["cost_usd"], row["cost_estimated"]) == (0.0, False)
    assert row["ratelimit_status"] is None and row["ratelimit_5h_reset"] is None


def test_window_headers_are_parsed_defensively() -> None:
    report = parse_windows(
        {
            "anthropic-ratelimit-unified-status": "rejected",
            "anthropic-ratelimit-unified-5h-utilization": "nan",
            "anthropic-ratelimit-unified-5h-reset": "2026-11-26T10:00:00Z",
            "anthropic-ratelimit-unified-7d-utilization": "1.02",
            "anthropic-ratelimit-unified-7d-reset": "not a time",
        }
    )
    assert report is not None
    assert report.status == "rejected" and status_label(report.status) == "rejected"
    assert report.window("5h").utilization is None
    assert report.window("5h").resets_at == datetime(2026, 11, 26, 10, tzinfo=UTC)
    assert report.window("7d").utilization == 1.02 and report.window("7d").resets_at is None
    assert parse_windows({"content-type": "application/json"}) is None
    assert status_label("surprise") == "other"


def test_the_usage_meter_counts_tokens_cost_windows_and_errors() -> None:
    meter = UsageMeter()
    exchange = record("meter", body=MESSAGE)
    meter(exchange, build_rows(exchange))
    labels = {"train": "meter", "account": "acct", "model": "sonnet"}
    assert sample("prompttrain_tokens_total", **labels, kind="input") == 1000
    assert sample("prompttrain_tokens_total", **labels, kind="cache_write_5m") == 100
    assert sample("prompttrain_tokens_total", **labels, kind="cache_write_1h") == 300
    assert sample("prompttrain_cost_usd_total", **labels, estimated="false") == pytest.approx(0.009675)
    assert sample("prompttrain_subscription_window_utilization_ratio", account="acct", window="5h") == 0.42
    assert sample("prompttrain_subscription_status", account="acct", status="allowed") == 1
    assert sample("prompttrain_subscription_status", account="acct", status="rejected") == 0

    stream_error = record("meter", stream=True)
    stream_error.content_type = "text/event-stream"
    stream_error.chunks = [
        (stream_error.started + 0.1, b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n')
    ]
    meter(stream_error, build_rows(stream_error))
    assert (
        sample(
            "prompttrain_upstream_errors_total",
            train="meter",
            account="acct",
            error_type="overloaded_error",
            in_stream="true",
        )
        == 1
    )


def test_a_rejected_request_is_no_usage() -> None:
    exchange = record("never-configured", body=MESSAGE)
    exchange.account_id = None
    UsageMeter()(exchange, build_rows(exchange))
    assert (
        sample("prompttrain_tokens_total", train="never-configured", account="acct", model="sonnet", kind="input") == 0
    )


def test_request_metrics_use_the_label_they_are_given_for_the_train() -> None:
    exchange = record("made-up-by-a-client", status=401, outcome=Outcome.REJECTED)
    exchange.account_id = None
    request_finished(exchange, exchange_metrics.train_label(exchange.train_id, known=False))
    assert (
        sample(
            "prompttrain_requests_total",
            train="unknown",
            account="none",
            model="sonnet",
            status_class="4xx",
            stream="false",
        )
        >= 1
    )
    assert "made-up-by-a-client" not in generate_latest().decode()


def test_model_labels_are_families_by_default_and_capped_when_exact() -> None:
    family = ModelLabels("family")
    assert family("claude-sonnet-4-5-20250929") == "sonnet"
    assert family("claude-3-opus-20240229") == "opus"
    assert family("totally-new-model-" + "x" * 500) == "other"
    assert family(None) == "none"

    exact = ModelLabels("model", cap=2)
    assert exact("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"
    assert exact("claude-opus-4-1") == "claude-opus-4-1"
    assert exact("claude-haiku-4-5") == "haiku"  # over the cap: its family
    assert exact("claude-sonnet-4-5") == "claude-sonnet-4-5"  # already counted
    assert exact("claude-<script>") == "other"
    with pytest.raises(ValueError, match="model label"):
        ModelLabels("everything")


@pytest.mark.parametrize(("status", "label"), [(200, "2xx"), (499, "4xx"), (529, "5xx"), (None, "none"), (999, "none")])
def test_status_classes(status: int | None, label: str) -> None:
    assert status_class(status) == label
