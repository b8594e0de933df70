"""Faithful forwarding through a real proxy process to the fake upstream, recorded in SQLite and PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx
import orjson

from tests.conftest import ProxyFactory
from tests.helpers import FakeUpstream, query, wait_for_payload, wait_for_rows

MESSAGES_BODY: dict[str, Any] = {
    "model": "claude-sonnet-5-5",
    "max_tokens": 256,
    "messages": [{"role": "user", "content": "Say hello"}],
}


def sdk(proxy_url: str, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=proxy_url, api_key="sk-ant-user-own-key", default_headers=headers, max_retries=0
    )


def test_non_streaming_reply_reaches_the_sdk_and_is_recorded(
    start_proxy: ProxyFactory, upstream: FakeUpstream, database_url: str
) -> None:
    upstream.script(
        {
            "content": [{"type": "text", "text": "Hello, recorded world."}],
            "usage": {
                "input_tokens": 12,
                "output_tokens": 4,
                "cache_read_input_tokens": 100,
                "cache_creation_input_tokens": 7,
            },
        }
    )
    proxy = start_proxy(database_url)

    with sdk(proxy.url, **{"x-claude-code-session-id": "session-42"}) as client:
        message = client.messages.create(**MESSAGES_BODY)

    assert message.content[0].type == "text" and message.content[0].text == "Hello, recorded world."
    rows = wait_for_rows(database_url, "SELECT * FROM api_requests", 1)
    row = rows[0]
    assert (row["train_id"], row["account_id"], row["status_code"], row["outcome"]) == (
        "default",
        "passthrough",
        200,
        "completed",
    )
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_input_tokens"]) == (12, 4, 100)
    assert row["cache_creation_input_tokens"] == 7
    assert row["model"] == MESSAGES_BODY["model"]
    assert not row["stream"]
    assert row["session_id"] == "session-42"
    assert row["duration_ms"] > 0 and row["overhead_ms"] is not None
    payload = wait_for_payload(database_url, row["request_id"])
    assert orjson.loads(payload.request_body) == MESSAGES_BODY
    headers = _json(row["request_headers"])
    assert "x-api-key" not in headers and "authorization" not in headers
    assert headers["x-claude-code-session-id"] == "session-42"
    assert _json(payload.response_body)["content"][0]["text"] == "Hello, recorded world."
    assert "anthropic-ratelimit-unified-5h-utilization" in _json(row["response_headers"])
    dump = str(query(database_url, "SELECT * FROM api_requests"))
    assert "sk-ant-user-own-key" not in dump


def test_streaming_with_thinking_and_tool_use(
    start_proxy: ProxyFactory, upstream: FakeUpstream, database_url: str
) -> None:
    upstream.script(
        {
            "content": [
                {"type": "thinking", "thinking": "The user wants a listing; I will run ls."},
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "name": "Bash", "input": {"command": "ls -la", "description": "List files"}},
            ],
            "usage": {"input_tokens": 30, "output_tokens": 25},
        }
    )
    proxy = start_proxy(database_url)

    with sdk(proxy.url) as client, client.messages.stream(**MESSAGES_BODY) as stream:
        final = stream.get_final_message()

    assert [block.type for block in final.content] == ["thinking", "text", "tool_use"]
    tool = final.content[2]
    assert tool.type == "tool_use" and tool.input == {"command": "ls -la", "description": "List files"}
    row = wait_for_rows(database_url, "SELECT * FROM api_requests", 1)[0]
    assert row["stream"] in (True, 1) and row["outcome"] == "completed"
    assert (row["input_tokens"], row["output_tokens"], row["tool_call_count"]) == (30, 25, 1)
    assert row["stop_reason"] == "tool_use"
    assert row["first_token_ms"] is not None and row["first_token_ms"] <= row["duration_ms"]
    stored = _json(wait_for_payload(database_url, row["request_id"]).response_body)
    without_nulls = {key: value for key, value in stored.items() if value is not None}
    assert without_nulls == final.model_dump(mode="json", exclude_none=True)


def test_stream_bytes_and_headers_are_relayed_unchanged(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    reply = {
        "content": [{"type": "text", "text": "exactly these bytes " * 20}],
        "headers": {"request-id": "req_fixed", "anthropic-ratelimit-unified-5h-reset": "1800000000"},
        "message_id": "msg_fixed",
    }
    proxy = start_proxy()
    results = {}
    for name, base in (("direct", upstream.url), ("proxied", proxy.url)):
        for stream in (False, True):
            upstream.script(reply)
            response = httpx.post(
                f"{base}/v1/messages",
                json=MESSAGES_BODY | {"stream": stream},
                headers={"x-api-key": "sk-test", "anthropic-version": "2023-06-01"},
            )
            results[name, stream] = response
    for stream in (False, True):
        direct, proxied = results["direct", stream], results["proxied", stream]
        assert proxied.status_code == direct.status_code == 200
        assert proxied.content == direct.content
        comparable = {"date", "server", "x-prompttrain-request-id", "x-prompttrain-overhead-ms"}
        assert [(k, v) for k, v in proxied.headers.multi_items() if k not in comparable] == [
            (k, v) for k, v in direct.headers.multi_items() if k not in comparable
        ]
        assert proxied.headers["x-prompttrain-request-id"]
        assert float(proxied.headers["x-prompttrain-overhead-ms"]) >= 0


def test_events_reach_the_client_as_they_are_sent(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    upstream.script({"content": [{"type": "text", "text": " ".join(f"word{i}" for i in range(40))}], "delay_ms": 50})
    proxy = start_proxy()
    arrivals: list[float] = []
    started = time.perf_counter()
    with httpx.stream(
        "POST", f"{proxy.url}/v1/messages", json=MESSAGES_BODY | {"stream": True}, headers={"x-api-key": "k"}
    ) as response:
        for line in response.iter_lines():
            if line.startswith("event:"):
                arrivals.append(time.perf_counter() - started)
    assert len(arrivals) >= 8
    # With 50 ms between upstream events, a buffering proxy would deliver everything at the end.
    assert arrivals[-1] - arrivals[0] >= 0.05 * (len(arrivals) - 2)
    assert arrivals[0] < arrivals[-1] / 2


def test_other_v1_endpoints_pass_through_and_telemetry_is_dropped(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    proxy = start_proxy()
    with sdk(proxy.url) as client:
        count = client.messages.count_tokens(model=MESSAGES_BODY["model"], messages=MESSAGES_BODY["messages"])
    assert count.input_tokens > 0
    models = httpx.get(f"{proxy.url}/v1/models?limit=5", headers={"x-api-key": "k"})
    assert models.status_code == 200 and models.json()["data"]
    telemetry = httpx.post(f"{proxy.url}/api/event_logging/batch", json={"events": [1, 2, 3]})
    assert telemetry.status_code == 200 and telemetry.json() == {"status": "ok"}
    paths = [(item["path"], item["query"]) for item in upstream.received()]
    assert ("/v1/messages/count_tokens", {}) in paths or any(p == "/v1/messages/count_tokens" for p, _ in paths)
    assert any(p == "/v1/models" and q.get("limit") == "5" for p, q in paths)
    assert not any("event_logging" in p for p, _ in paths)


def test_health_endpoints(start_proxy: ProxyFactory, sqlite_url: str) -> None:
    proxy = start_proxy(sqlite_url)
    assert httpx.get(f"{proxy.url}/health/live").json()["alive"] is True
    ready = httpx.get(f"{proxy.url}/health/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert httpx.get(f"{proxy.url}/health").json()["database"] == "connected"


def test_readiness_reflects_an_unreachable_database(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    from tests.helpers import free_port

    proxy = start_proxy(
        f"postgresql://nobody:nothing@127.0.0.1:{free_port()}/none",
        migrate_on_start="false",
        writer_shutdown_seconds=0.5,
    )
    assert httpx.get(f"{proxy.url}/health/live").status_code == 200
    ready = httpx.get(f"{proxy.url}/health/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    # Forwarding does not depend on the database.
    response = httpx.post(f"{proxy.url}/v1/messages", json=MESSAGES_BODY, headers={"x-api-key": "k"})
    assert response.status_code == 200
    assert "nothing" not in httpx.get(f"{proxy.url}/health").text


def test_readiness_can_ignore_the_database(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    from tests.helpers import free_port

    proxy = start_proxy(
        f"postgresql://nobody:nothing@127.0.0.1:{free_port()}/none",
        migrate_on_start="false",
        writer_shutdown_seconds=0.5,
        readiness_requires_database="false",
    )
    ready = httpx.get(f"{proxy.url}/health/ready")
    assert ready.status_code == 200 and ready.json()["database"] is False


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value
