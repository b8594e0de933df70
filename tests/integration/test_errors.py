"""Bad input, refused clients and upstream failures: Anthropic's error shape, the right status, always recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import ProxyFactory
from tests.helpers import FakeUpstream, free_port, wait_for_rows, write_json

BODY: dict[str, Any] = {"model": "claude-haiku-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
USER_KEY = {"x-api-key": "sk-ant-user"}


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    payload: dict[str, Any] = response.json()
    assert payload["type"] == "error"
    assert payload["error"]["type"] == error_type
    assert payload["error"]["message"]
    assert response.headers["x-prompttrain-request-id"] == payload["request_id"]
    return payload


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"messages": []}', "model"),
        (b'{"model": "claude-haiku-4-5"}', "messages"),
        (b'{"model": "m", "messages": [], "stream": "yes"}', "stream"),
    ],
)
def test_invalid_requests_get_400(
    start_proxy: ProxyFactory, upstream: FakeUpstream, sqlite_url: str, content: bytes, expected: str
) -> None:
    proxy = start_proxy(sqlite_url)
    response = httpx.post(f"{proxy.url}/v1/messages", content=content, headers=USER_KEY)
    payload = assert_error(response, 400, "invalid_request_error")
    assert expected in payload["error"]["message"]
    assert upstream.received() == []
    row = wait_for_rows(sqlite_url, "SELECT * FROM api_requests", 1)[0]
    assert (row["status_code"], row["outcome"], row["error_type"]) == (400, "rejected", "invalid_request_error")


def test_body_over_the_limit_gets_413(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    proxy = start_proxy(max_request_body_bytes=1000)
    big = BODY | {"messages": [{"role": "user", "content": "x" * 2000}]}
    assert_error(httpx.post(f"{proxy.url}/v1/messages", json=big, headers=USER_KEY), 413, "request_too_large")

    def chunked() -> Any:
        yield b'{"model": "m", "messages": [{"role": "user", "content": "'
        yield b"y" * 4000
        yield b'"}]}'

    response = httpx.post(f"{proxy.url}/v1/messages", content=chunked(), headers=USER_KEY)
    assert_error(response, 413, "request_too_large")
    assert upstream.received() == []


def test_unknown_train_and_bad_client_keys_get_401(
    start_proxy: ProxyFactory, upstream: FakeUpstream, credentials_dir: Path
) -> None:
    from prompttrain.credentials import digest_client_key

    write_json(
        credentials_dir / "accounts" / "team-key.credentials.json", {"type": "api_key", "api_key": "sk-ant-team"}
    )
    write_json(
        credentials_dir / "trains" / "team.json",
        {"auth": "client-keys", "client_key_sha256": [digest_client_key("pt_good").hex()], "accounts": ["team-key"]},
    )
    proxy = start_proxy()
    url = f"{proxy.url}/v1/messages"
    assert_error(httpx.post(url, json=BODY, headers={"train-id": "nope", **USER_KEY}), 401, "authentication_error")
    assert_error(httpx.post(url, json=BODY, headers={"train-id": "team"}), 401, "authentication_error")
    wrong = {"train-id": "team", "authorization": "Bearer pt_bad"}
    payload = assert_error(httpx.post(url, json=BODY, headers=wrong), 401, "authentication_error")
    assert "pt_bad" not in payload["error"]["message"]
    assert_error(httpx.post(url, json=BODY, headers={"train-id": "../etc", **USER_KEY}), 401, "authentication_error")
    # The passthrough default train still needs the client's own credential to forward.
    assert_error(httpx.post(url, json=BODY), 401, "authentication_error")
    assert upstream.received() == []
    good = httpx.post(url, json=BODY, headers={"train-id": "team", "authorization": "Bearer pt_good"})
    assert good.status_code == 200


def test_account_not_allowed_for_the_train_gets_403(
    start_proxy: ProxyFactory, upstream: FakeUpstream, credentials_dir: Path
) -> None:
    from prompttrain.credentials import digest_client_key

    for name in ("mine", "theirs"):
        write_json(
            credentials_dir / "accounts" / f"{name}.credentials.json", {"type": "api_key", "api_key": f"sk-{name}"}
        )
    write_json(
        credentials_dir / "trains" / "team.json",
        {"auth": "client-keys", "client_key_sha256": [digest_client_key("pt_k").hex()], "accounts": ["mine"]},
    )
    proxy = start_proxy()
    headers = {"train-id": "team", "x-api-key": "pt_k", "x-train-account": "theirs"}
    assert_error(httpx.post(f"{proxy.url}/v1/messages", json=BODY, headers=headers), 403, "permission_error")
    assert upstream.received() == []


def test_upstream_unreachable_gets_502_after_two_retries(start_proxy: ProxyFactory, sqlite_url: str) -> None:
    proxy = start_proxy(sqlite_url, upstream_url=f"http://127.0.0.1:{free_port()}")
    response = httpx.post(f"{proxy.url}/v1/messages", json=BODY, headers=USER_KEY)
    assert_error(response, 502, "api_error")
    row = wait_for_rows(sqlite_url, "SELECT * FROM api_requests", 1)[0]
    assert (row["status_code"], row["outcome"]) == (502, "unreachable")


def test_upstream_timeout_gets_504(start_proxy: ProxyFactory, upstream: FakeUpstream, sqlite_url: str) -> None:
    upstream.script({"delay_ms": 3000})
    proxy = start_proxy(sqlite_url, upstream_read_timeout_seconds=0.5)
    assert_error(httpx.post(f"{proxy.url}/v1/messages", json=BODY, headers=USER_KEY), 504, "timeout_error")
    row = wait_for_rows(sqlite_url, "SELECT * FROM api_requests", 1)[0]
    assert (row["status_code"], row["outcome"]) == (504, "timeout")


def test_dropped_connections_before_a_response_are_retried_twice(
    start_proxy: ProxyFactory, upstream: FakeUpstream
) -> None:
    proxy = start_proxy()
    upstream.script({"drop": "before_response", "repeat": 2})
    response = httpx.post(f"{proxy.url}/v1/messages", json=BODY, headers=USER_KEY)
    assert response.status_code == 200
    assert len(upstream.received()) == 3
    upstream.reset()
    upstream.script({"drop": "before_response", "repeat": 3})
    assert_error(httpx.post(f"{proxy.url}/v1/messages", json=BODY, headers=USER_KEY), 502, "api_error")
    assert len(upstream.received()) == 3


def test_rate_limit_and_overload_pass_through_verbatim(
    start_proxy: ProxyFactory, upstream: FakeUpstream, sqlite_url: str, request: pytest.FixtureRequest
) -> None:
    proxy = start_proxy(sqlite_url)
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-user", max_retries=0)
    request.addfinalizer(client.close)
    upstream.script({"error": {"status": 429, "type": "rate_limit_error", "message": "slow down", "retry_after": 7}})
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(**BODY)
    assert limited.value.response.headers["retry-after"] == "7"
    assert isinstance(limited.value.body, dict)
    assert limited.value.body["error"] == {"type": "rate_limit_error", "message": "slow down"}
    upstream.script({"error": {"status": 529, "type": "overloaded_error", "message": "Overloaded"}})
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        client.messages.create(**BODY)
    assert overloaded.value.status_code == 529
    assert len(upstream.received()) == 2  # never retried by the proxy
    rows = wait_for_rows(sqlite_url, "SELECT * FROM api_requests ORDER BY timestamp", 2)
    assert [(r["status_code"], r["outcome"], r["error_type"]) for r in rows] == [
        (429, "upstream_error", "rate_limit_error"),
        (529, "upstream_error", "overloaded_error"),
    ]


def test_in_band_stream_error_is_recorded_as_a_failure(
    start_proxy: ProxyFactory, upstream: FakeUpstream, database_url: str, request: pytest.FixtureRequest
) -> None:
    proxy = start_proxy(database_url)
    upstream.script(
        {"content": [{"type": "text", "text": "partial answer that will break"}], "stream_error_after_events": 4}
    )
    client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-user", max_retries=0)
    request.addfinalizer(client.close)
    with pytest.raises(anthropic.APIStatusError), client.messages.stream(**BODY) as stream:
        stream.get_final_message()
    row = wait_for_rows(database_url, "SELECT * FROM api_requests", 1)[0]
    assert (row["status_code"], row["outcome"], row["error_type"]) == (200, "stream_error", "overloaded_error")


def test_upstream_connection_lost_mid_stream_is_recorded(
    start_proxy: ProxyFactory, upstream: FakeUpstream, sqlite_url: str
) -> None:
    proxy = start_proxy(sqlite_url)
    upstream.script({"content": [{"type": "text", "text": "a b c d e f g h"}], "drop": "mid_stream"})
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream("POST", f"{proxy.url}/v1/messages", json=BODY | {"stream": True}, headers=USER_KEY) as response,
    ):
        for _ in response.iter_raw():
            pass
    row = wait_for_rows(sqlite_url, "SELECT * FROM api_requests", 1)[0]
    assert row["outcome"] == "stream_error"
    assert len(upstream.received()) == 1
