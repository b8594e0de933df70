"""The fake upstream served by real uvicorn, exercised with httpx and the official ``anthropic`` SDK.

These prove that what the fake sends is what Anthropic's clients understand (JSON and SSE, tool_use and
thinking blocks, errors as the SDK's exception types) and that scripted connection drops are real
connection-level failures, not HTTP error responses.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest

import prompttrain
from prompttrain.upstream_fake import FakeUpstreamServer, FakeUpstreamState

# The SDK warns about deprecated model names (and pytest turns warnings into errors); the fake does not
# care about the model, so tests use a name no SDK release will ever deprecate.
MODEL = "claude-fake-test-model"
BASIC: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "hi there"}]}

RATE_LIMIT_HEADERS = [
    "anthropic-ratelimit-unified-status",
    "anthropic-ratelimit-unified-5h-status",
    "anthropic-ratelimit-unified-5h-utilization",
    "anthropic-ratelimit-unified-5h-reset",
    "anthropic-ratelimit-unified-7d-status",
    "anthropic-ratelimit-unified-7d-utilization",
    "anthropic-ratelimit-unified-7d-reset",
    "anthropic-ratelimit-unified-representative-claim",
    "anthropic-ratelimit-unified-fallback-percentage",
    "anthropic-ratelimit-unified-reset",
]

RICH_CONTENT: list[dict[str, Any]] = [
    {"type": "thinking", "thinking": "The user wants a listing, so I will run ls."},
    {"type": "text", "text": "Let me list the files for you."},
    {"type": "tool_use", "name": "Bash", "input": {"command": "ls -la", "timeout": 30}},
]


@pytest.fixture(scope="module")
def served() -> Iterator[FakeUpstreamServer]:
    with FakeUpstreamServer() as server:
        yield server


@pytest.fixture
def state(served: FakeUpstreamServer) -> Iterator[FakeUpstreamState]:
    served.state.reset()
    yield served.state
    served.state.reset()


@pytest.fixture
def http(served: FakeUpstreamServer, state: FakeUpstreamState) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base_url, timeout=10) as client:
        yield client


@pytest.fixture
def sdk(served: FakeUpstreamServer, state: FakeUpstreamState) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=served.base_url, api_key="sk-test", max_retries=0, timeout=10) as client:
        yield client


def _sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in raw.split(b"\n\n"):
        if not frame:
            continue
        event_line, data_line = frame.split(b"\n")
        events.append((event_line.removeprefix(b"event: ").decode(), orjson.loads(data_line[6:])))
    return events


# ------------------------------------------------------------------------------------------------------------
# Wire format
# ------------------------------------------------------------------------------------------------------------


def test_default_json_reply_shape_headers_and_usage(http: httpx.Client, state: FakeUpstreamState) -> None:
    raw = orjson.dumps(BASIC)
    response = http.post("/v1/messages", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["request-id"].startswith("req_fake_")
    for name in RATE_LIMIT_HEADERS:
        assert name in response.headers
    assert response.headers["anthropic-ratelimit-unified-status"] == "allowed"
    assert response.headers["anthropic-ratelimit-unified-representative-claim"] == "five_hour"
    float(response.headers["anthropic-ratelimit-unified-5h-utilization"])
    assert int(response.headers["anthropic-ratelimit-unified-5h-reset"]) > time.time()
    body = response.json()
    assert body["id"].startswith("msg_") and body["model"] == MODEL
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["content"] == [{"type": "text", "text": "Hello from the fake upstream."}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["usage"] == {
        "input_tokens": len(raw) // 4,
        "output_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def test_sdk_parses_json_reply_with_thinking_and_tool_use(sdk: anthropic.Anthropic, state: FakeUpstreamState) -> None:
    state.add_reply({"content": RICH_CONTENT, "usage": {"cache_read_input_tokens": 1234}})
    message = sdk.messages.create(**BASIC)
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use"]
    thinking, text, tool = message.content
    assert thinking.thinking == RICH_CONTENT[0]["thinking"] and thinking.signature
    assert text.text == "Let me list the files for you."
    assert tool.name == "Bash" and tool.input == {"command": "ls -la", "timeout": 30}
    assert tool.id == "toolu_fake_1"
    assert message.stop_reason == "tool_use"
    assert message.usage.cache_read_input_tokens == 1234


def test_sdk_parses_stream_with_thinking_and_tool_use(sdk: anthropic.Anthropic, state: FakeUpstreamState) -> None:
    state.add_reply({"content": RICH_CONTENT, "usage": {"output_tokens": 77, "input_tokens": 12}})
    with sdk.messages.stream(**BASIC) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Let me list the files for you."
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use"]
    thinking, _, tool = final.content
    assert isinstance(thinking, anthropic.types.ThinkingBlock) and isinstance(tool, anthropic.types.ToolUseBlock)
    assert thinking.thinking == RICH_CONTENT[0]["thinking"] and thinking.signature
    assert tool.input == {"command": "ls -la", "timeout": 30}
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens == 77 and final.usage.input_tokens == 12


async def test_async_sdk_stream(served: FakeUpstreamServer, state: FakeUpstreamState) -> None:
    state.add_reply({"content": [{"type": "text", "text": "async hello"}]})
    client = anthropic.AsyncAnthropic(base_url=served.base_url, api_key="k", max_retries=0)
    async with client, client.messages.stream(**BASIC) as stream:
        final = await stream.get_final_message()
    assert [block.text for block in final.content if isinstance(block, anthropic.types.TextBlock)] == ["async hello"]


def test_sse_events_are_flushed_one_by_one(http: httpx.Client, state: FakeUpstreamState) -> None:
    state.add_reply({"delay_ms": 80})
    arrivals: list[tuple[float, bytes]] = []
    with http.stream("POST", "/v1/messages", json={**BASIC, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["request-id"].startswith("req_fake_")
        assert "anthropic-ratelimit-unified-5h-utilization" in response.headers
        for chunk in response.iter_raw():
            arrivals.append((time.monotonic(), chunk))
    # Each network read is exactly one event, and the reads are spaced by the scripted delay.
    assert all(chunk.count(b"\n\n") == 1 and chunk.startswith(b"event: ") for _, chunk in arrivals)
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(arrivals)]
    assert min(gaps) > 0.05
    events = _sse_events(b"".join(chunk for _, chunk in arrivals))
    assert [event for event, _ in events][:3] == ["message_start", "ping", "content_block_start"]
    assert events[-1] == ("message_stop", {"type": "message_stop"})


def test_request_validation_errors(http: httpx.Client, state: FakeUpstreamState) -> None:
    cases = [
        (b"{not json", "Invalid JSON"),
        (orjson.dumps({"messages": []}), "model: Field required"),
        (orjson.dumps({"model": MODEL}), "messages: Field required"),
    ]
    for raw, message in cases:
        response = http.post("/v1/messages", content=raw)
        assert response.status_code == 400
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert message in body["error"]["message"]
        assert response.headers["request-id"].startswith("req_fake_")
    assert state.received_requests()[0]["body"] is None


def test_count_tokens_models_and_unknown_routes(sdk: anthropic.Anthropic, http: httpx.Client) -> None:
    raw = orjson.dumps(BASIC)
    response = http.post("/v1/messages/count_tokens", content=raw)
    assert response.json() == {"input_tokens": len(raw) // 4}
    assert response.headers["request-id"].startswith("req_fake_")

    ids = [model.id for model in sdk.models.list()]
    assert "claude-sonnet-4-5-20250929" in ids
    assert any("opus-4-1" in i for i in ids) and any("haiku-4-5" in i for i in ids)
    listing = http.get("/v1/models").json()
    assert listing["has_more"] is False and listing["first_id"] == ids[0] and listing["last_id"] == ids[-1]

    for method, path in [("GET", "/v1/nothing/here"), ("GET", "/v1/messages"), ("DELETE", "/v1/models")]:
        response = http.request(method, path)
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error"
        assert "request-id" in response.headers


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


def test_error_replies_surface_as_sdk_exceptions(sdk: anthropic.Anthropic, state: FakeUpstreamState) -> None:
    state.add_replies(
        [
            {"error": {"status": 429, "retry_after": 7}},
            {"error": {"status": 529}},
            {"error": {"status": 500, "type": "api_error", "message": "boom"}},
        ]
    )
    with pytest.raises(anthropic.RateLimitError) as rate_limited:
        sdk.messages.create(**BASIC)
    assert rate_limited.value.response.headers["retry-after"] == "7"
    assert rate_limited.value.request_id is not None and rate_limited.value.request_id.startswith("req_fake_")
    assert rate_limited.value.response.json()["error"]["type"] == "rate_limit_error"

    with pytest.raises(anthropic.APIStatusError) as overloaded:
        sdk.messages.create(**BASIC)
    assert overloaded.value.status_code == 529
    assert overloaded.value.response.json()["error"]["type"] == "overloaded_error"

    with pytest.raises(anthropic.InternalServerError) as internal:
        sdk.messages.create(**BASIC)
    assert internal.value.status_code == 500 and "boom" in str(internal.value)


def test_stream_error_event_after_n_events(
    sdk: anthropic.Anthropic, http: httpx.Client, state: FakeUpstreamState
) -> None:
    state.add_replies([{"stream_error_after_events": 3}, {"stream_error_after_events": 3}])
    response = http.post("/v1/messages", json={**BASIC, "stream": True})
    events = _sse_events(response.content)
    assert [event for event, _ in events] == ["message_start", "ping", "content_block_start", "error"]
    assert events[-1][1] == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}

    with pytest.raises(anthropic.APIStatusError) as raised, sdk.messages.stream(**BASIC) as stream:
        stream.get_final_message()
    assert raised.value.body == events[-1][1]


# ------------------------------------------------------------------------------------------------------------
# Connection drops
# ------------------------------------------------------------------------------------------------------------


def test_drop_before_response_is_a_connection_error(
    http: httpx.Client, sdk: anthropic.Anthropic, state: FakeUpstreamState
) -> None:
    state.add_reply({"drop": "before_response", "repeat": 2})
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        http.post("/v1/messages", json=BASIC)
    with pytest.raises(anthropic.APIConnectionError):
        sdk.messages.create(**BASIC)
    # The server is unharmed: the next request gets the default reply.
    assert http.post("/v1/messages", json=BASIC).status_code == 200


def test_drop_mid_stream_truncates_the_chunked_body(http: httpx.Client, state: FakeUpstreamState) -> None:
    state.add_replies([{"drop": "mid_stream"}, {"drop": "mid_stream"}])
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"),
        http.stream("POST", "/v1/messages", json={**BASIC, "stream": True}) as response,
    ):
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
    kinds = [event for event, _ in _sse_events(received)]
    assert kinds == ["message_start", "ping", "content_block_start", "content_block_delta"]

    # Non-streaming: the announced content-length is never reached.
    with pytest.raises(httpx.RemoteProtocolError, match=r"incomplete|complete message body"):
        http.post("/v1/messages", json=BASIC)
    assert http.post("/v1/messages", json=BASIC).status_code == 200


# ------------------------------------------------------------------------------------------------------------
# Scripting through the control API
# ------------------------------------------------------------------------------------------------------------


def test_control_api_matching_repeat_headers_and_record(http: httpx.Client, state: FakeUpstreamState) -> None:
    replies = [
        {"match": {"has_tool_result": True}, "content": [{"type": "text", "text": "saw the result"}]},
        {"match": {"last_user_text_contains": "weather"}, "content": [{"type": "text", "text": "sunny"}]},
        {
            "match": {"system_contains": "terse", "model_contains": "fake-test"},
            "content": [{"type": "text", "text": "ok"}],
            "headers": {"anthropic-ratelimit-unified-5h-utilization": "0.97", "x-extra": "1"},
            "repeat": 2,
        },
    ]
    response = http.post("/_fake/replies", json={"replies": replies})
    assert response.json() == {"queued": 3, "pending": 3}
    assert http.post("/_fake/replies", json={"replies": [{"bad": 1}]}).status_code == 400
    assert len(http.get("/_fake/replies").json()["replies"]) == 3

    def ask(**overrides: Any) -> httpx.Response:
        return http.post("/v1/messages?beta=true", json={**BASIC, **overrides})

    assert ask().json()["content"][0]["text"] == "Hello from the fake upstream."
    weather = [{"role": "user", "content": [{"type": "text", "text": "what's the weather?"}]}]
    assert ask(messages=weather).json()["content"][0]["text"] == "sunny"
    assert ask(messages=weather).json()["content"][0]["text"] == "Hello from the fake upstream."
    for _ in range(2):
        terse = ask(system=[{"type": "text", "text": "be terse"}])
        assert terse.json()["content"][0]["text"] == "ok"
        assert terse.headers["anthropic-ratelimit-unified-5h-utilization"] == "0.97"
        assert terse.headers["x-extra"] == "1"
    assert ask(system="be terse").headers["anthropic-ratelimit-unified-5h-utilization"] == "0.42"
    tool_turn = [
        {"role": "user", "content": "list"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "Bash", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "a b c"}]},
    ]
    assert ask(messages=tool_turn).json()["content"][0]["text"] == "saw the result"

    # Global header overrides; null removes a header.
    http.post("/_fake/headers", json={"headers": {"anthropic-ratelimit-unified-status": "rejected", "x-gone": None}})
    assert ask().headers["anthropic-ratelimit-unified-status"] == "rejected"

    requests = http.get("/_fake/received").json()["requests"]
    assert len(requests) == 8 and all(entry["path"] == "/v1/messages" for entry in requests)
    first = requests[0]
    assert first["method"] == "POST" and first["query"] == {"beta": "true"}
    assert first["headers"]["content-type"] == "application/json" and first["body"] == BASIC
    assert isinstance(first["received_at"], float)
    assert http.get("/_fake/received", params={"path": "/v1/models"}).json() == {"requests": []}

    assert http.post("/_fake/reset").json() == {"ok": True}
    assert http.get("/_fake/received").json() == {"requests": []}
    assert http.get("/_fake/replies").json() == {"replies": []}
    assert ask().headers["anthropic-ratelimit-unified-status"] == "allowed"


def test_json_delay(http: httpx.Client, state: FakeUpstreamState) -> None:
    state.add_reply({"delay_ms": 300})
    started = time.monotonic()
    assert http.post("/v1/messages", json=BASIC).status_code == 200
    assert time.monotonic() - started >= 0.3


# ------------------------------------------------------------------------------------------------------------
# OAuth token endpoint
# ------------------------------------------------------------------------------------------------------------

REFRESH = {"grant_type": "refresh_token", "refresh_token": "seed-token", "client_id": "client-1"}


def test_oauth_token_issue_fail_and_strictness(http: httpx.Client, state: FakeUpstreamState) -> None:
    response = http.post("/v1/oauth/token", json=REFRESH)
    assert response.status_code == 200
    assert response.json() == {
        "access_token": "fake-access-1",
        "refresh_token": "fake-refresh-1",
        "expires_in": 3600,
        "token_type": "Bearer",
        "scope": "user:inference user:profile",
    }
    settings = {"expires_in": 120, "strict_refresh_tokens": True, "accepted_refresh_tokens": ["seed-2"]}
    assert http.post("/_fake/oauth", json=settings).status_code == 200
    assert http.post("/_fake/oauth", json={"fail": "yes"}).status_code == 400

    stale = http.post("/v1/oauth/token", json=REFRESH)
    assert stale.status_code == 400 and stale.json()["error"] == "invalid_grant"
    seeded = http.post("/v1/oauth/token", json={**REFRESH, "refresh_token": "seed-2"}).json()
    assert seeded["refresh_token"] == "fake-refresh-2" and seeded["expires_in"] == 120
    rotated = http.post("/v1/oauth/token", json={**REFRESH, "refresh_token": "fake-refresh-2"})
    assert rotated.json()["access_token"] == "fake-access-3"
    reused = http.post("/v1/oauth/token", json={**REFRESH, "refresh_token": "fake-refresh-2"})
    assert reused.status_code == 400

    http.post("/_fake/oauth", json={"fail": True})
    failed = http.post("/v1/oauth/token", json={**REFRESH, "refresh_token": "fake-refresh-3"})
    assert failed.status_code == 400 and failed.json()["error"] == "invalid_grant"

    snapshot = http.get("/_fake/oauth").json()
    assert snapshot["calls"] == 6
    assert snapshot["requests"][0] == REFRESH
    assert state.oauth_calls == 6
    # Token calls are /v1/* requests too, so they are in the general record.
    assert len(state.received_requests(path="/v1/oauth/token")) == 6


async def test_oauth_delay_lets_tests_observe_overlapping_calls(
    served: FakeUpstreamServer, state: FakeUpstreamState
) -> None:
    state.configure_oauth(delay_seconds=0.5, strict_refresh_tokens=True, accepted_refresh_tokens=["seed-token"])
    async with httpx.AsyncClient(base_url=served.base_url, timeout=10) as client:
        calls = [asyncio.ensure_future(client.post("/v1/oauth/token", json=REFRESH)) for _ in range(2)]
        await asyncio.sleep(0.25)
        # Both calls are counted on arrival, while both are still held by the delay.
        assert state.oauth_calls == 2 and not any(call.done() for call in calls)
        first, second = await asyncio.gather(*calls)
    # An uncoalesced second refresh with the same token is rejected, as the real endpoint would.
    assert sorted([first.status_code, second.status_code]) == [200, 400]


# ------------------------------------------------------------------------------------------------------------
# run() in another process, scripted through the control API
# ------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_run_in_subprocess_with_control_api() -> None:
    port = _free_port()
    src = str(Path(prompttrain.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    code = f"from prompttrain.upstream_fake.app import run; run('127.0.0.1', {port})"
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base_url, timeout=5) as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    http.get("/_fake/received")
                    break
                except httpx.TransportError:
                    assert process.poll() is None, "fake upstream process exited"
                    assert time.monotonic() < deadline, "fake upstream did not start"
                    time.sleep(0.05)
            script = {"content": [{"type": "tool_use", "name": "Read", "input": {"path": "/x"}}]}
            http.post("/_fake/replies", json={"replies": [script]})
            with anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0) as sdk:
                message = sdk.messages.create(**BASIC)
            assert message.content[0].type == "tool_use" and message.content[0].input == {"path": "/x"}
            assert message.stop_reason == "tool_use"
            assert len(http.get("/_fake/received").json()["requests"]) == 1
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert b"Traceback" not in stderr, stderr.decode()
