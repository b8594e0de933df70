"""Metrics and token stats through real proxy processes: bounded series, OAuth results, opt-in labels, and
`/token-stats` answered from the database (the same on every replica, before and after a restart)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ProxyFactory
from tests.helpers import FakeUpstream, wait_until
from tests.integration.test_trains_and_accounts import api_key_account, oauth_account, train
from tests.monitoring import Series, scrape, value

BODY: dict[str, Any] = {"model": "claude-sonnet-4-5", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}


def prompttrain_series(url: str) -> set[Series]:
    return {series for series in scrape(url) if series[0].startswith("prompttrain_")}


def written(url: str) -> float:
    return value(scrape(url), "prompttrain_records_written_total", lane="metadata")


def test_a_thousand_conversations_and_sessions_add_no_series(
    start_proxy: ProxyFactory, upstream: FakeUpstream, sqlite_url: str
) -> None:
    proxy = start_proxy(sqlite_url)
    upstream.script({"usage": {"input_tokens": 3, "output_tokens": 2}, "repeat": -1})

    def converse(client: httpx.Client, n: int) -> None:
        body = {**BODY, "messages": [{"role": "user", "content": f"conversation {n}: a question nobody asked before"}]}
        body["metadata"] = {"user_id": f"user-{n}"}
        headers = {"x-api-key": "sk-ant-own-key", "x-claude-code-session-id": f"session-{n:04d}"}
        assert client.post("/v1/messages", json=body, headers=headers).status_code == 200

    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        for n in range(5):
            converse(client, n)
        wait_until(lambda: written(proxy.url) == 5)
        before = prompttrain_series(proxy.url)
        started = time.monotonic()
        for n in range(5, 1005):
            converse(client, n)
        elapsed = time.monotonic() - started
    wait_until(lambda: written(proxy.url) == 1005, timeout=30)

    after = prompttrain_series(proxy.url)
    assert after == before, f"new series: {sorted(after - before)[:10]}"
    labels = {value for _, pairs in after for _, value in pairs}
    assert not any(label.startswith(("session-", "user-", "conversation")) for label in labels)
    samples = scrape(proxy.url)
    assert value(samples, "prompttrain_requests_total", train="default", status_class="2xx") == 1005
    assert value(samples, "prompttrain_tokens_total", kind="input") == 3 * 1005
    print(f"1000 conversations in {elapsed:.1f}s, {len(after)} prompttrain series before and after")


def test_oauth_refresh_results_are_counted_and_metrics_work_without_storage(
    start_proxy: ProxyFactory, upstream: FakeUpstream, credentials_dir: Path
) -> None:
    oauth_account(credentials_dir, "acct-broken", expires_in_ms=-1000)
    train(credentials_dir, "team-o", ["pt_o"], ["acct-broken"])
    upstream.oauth(fail=True)
    proxy = start_proxy(None)

    headers = {"train-id": "team-o", "authorization": "Bearer pt_o"}
    response = httpx.post(f"{proxy.url}/v1/messages", json=BODY, headers=headers, timeout=30)

    assert response.status_code == 401
    samples = scrape(proxy.url)
    assert value(samples, "prompttrain_oauth_refreshes_total", account="acct-broken", result="rejected") == 1
    assert value(samples, "prompttrain_oauth_refreshes_total", result="success") == 0
    wait_until(lambda: value(scrape(proxy.url), "prompttrain_requests_total", train="team-o", status_class="4xx") == 1)


def test_exact_model_labels_are_opt_in(start_proxy: ProxyFactory, upstream: FakeUpstream) -> None:
    proxy = start_proxy(None, metrics_model_label="model")
    for model in ("claude-sonnet-4-5-20250929", "not-a-claude-model"):
        response = httpx.post(
            f"{proxy.url}/v1/messages", json={**BODY, "model": model}, headers={"x-api-key": "k"}, timeout=30
        )
        assert response.status_code == 200

    def counted() -> bool:
        samples = scrape(proxy.url)
        exact = value(samples, "prompttrain_requests_total", model="claude-sonnet-4-5")
        return exact == 1 and value(samples, "prompttrain_requests_total", model="other") == 1

    wait_until(counted)


def token_stats(url: str, **params: str) -> httpx.Response:
    return httpx.get(f"{url}/token-stats", params=params, timeout=10)


def without_time(stats: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in stats.items() if key != "generated_at"}


def test_token_stats_come_from_the_database_and_agree_across_replicas_and_restarts(
    start_proxy: ProxyFactory, upstream: FakeUpstream, credentials_dir: Path, postgres_url: str, tmp_path: Path
) -> None:
    api_key_account(credentials_dir, "acct-key", "sk-ant-api-team-a")
    train(credentials_dir, "team-a", ["pt_a"], ["acct-key"])
    first = start_proxy(postgres_url, data_dir=tmp_path / "replica-1")
    second = start_proxy(postgres_url, data_dir=tmp_path / "replica-2")
    usage = {
        "input_tokens": 1000,
        "output_tokens": 100,
        "cache_read_input_tokens": 50,
        "cache_creation_input_tokens": 20,
    }
    upstream.script({"usage": usage, "repeat": 5})
    headers = {"train-id": "team-a", "authorization": "Bearer pt_a"}
    for replica in (first, second, first, second, second):
        assert httpx.post(f"{replica.url}/v1/messages", json=BODY, headers=headers, timeout=30).status_code == 200
    rejected = httpx.post(f"{first.url}/v1/messages", json=BODY, headers={"train-id": "nobody"}, timeout=30)
    assert rejected.status_code == 401

    def complete() -> bool:
        stats = token_stats(second.url).json()
        return stats["trains"].get("team-a", {}).get("total", {}).get("requests") == 5

    wait_until(complete, timeout=15)
    one, two = token_stats(first.url).json(), token_stats(second.url).json()
    assert without_time(one) == without_time(two)

    team = one["trains"]["team-a"]
    assert team["total"] == team["last_5h"]
    total = team["total"]
    assert (total["requests"], total["errors"], total["input_tokens"], total["output_tokens"]) == (5, 0, 5000, 500)
    assert (total["cache_read_input_tokens"], total["cache_creation_input_tokens"]) == (250, 100)
    per_request = (1000 * 3 + 100 * 15 + 50 * 0.3 + 20 * 3.75) / 1e6
    assert abs(total["cost_usd"] - 5 * per_request) < 1e-6
    assert "nobody" not in one["trains"], "rejected requests are not usage"
    assert one["trains"]["default"]["total"]["requests"] == 0  # configured, unused

    account = one["accounts"]["acct-key"]
    assert account["total"]["requests"] == 5
    window = account["window_5h"]
    now = int(time.time())
    assert window["status"] == "allowed" and window["utilization"] == 0.42
    reset = (now // 18000 + 1) * 18000
    assert window["resets_at"].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(reset)))
    assert window["usage"]["requests"] == 5
    assert account["window_7d"]["utilization"] == 0.18

    first.stop()
    restarted = start_proxy(postgres_url, data_dir=tmp_path / "replica-3")
    assert without_time(token_stats(restarted.url).json()) == without_time(two)

    only = token_stats(second.url, train_id="team-a").json()
    assert list(only["trains"]) == ["team-a"] and only["train_id"] == "team-a"
    assert only["trains"]["team-a"] == team


def test_token_stats_refuse_a_bad_train_id_in_anthropic_shape(start_proxy: ProxyFactory, sqlite_url: str) -> None:
    proxy = start_proxy(sqlite_url)
    for bad in ("not a train!", "never-seen-train", ""):
        response = token_stats(proxy.url, train_id=bad)
        assert response.status_code == 400, bad
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert body["error"]["message"].startswith("train_id")
    assert token_stats(proxy.url, train_id="default").status_code == 200


def test_token_stats_need_storage(start_proxy: ProxyFactory) -> None:
    response = token_stats(start_proxy(None).url)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "api_error"
