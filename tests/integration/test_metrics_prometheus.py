"""A real Prometheus scrapes a proxy and a dashboard after known traffic through the fake upstream.

PromQL over Prometheus's HTTP API must return the series and values the traffic implies (requests by status class,
tokens by kind, cost, first-token times, upstream errors in and out of streams, subscription windows, OAuth
refreshes, cooldowns, the writer), `promtool check metrics` must accept both `/metrics` outputs, the shipped alert
rules must load and evaluate, and every expression of the Grafana dashboard must parse and evaluate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ProxyFactory
from tests.helpers import FakeUpstream, Service, free_port, services, wait_until
from tests.integration.test_trains_and_accounts import api_key_account, oauth_account, train
from tests.monitoring import MONITORING, FakeSlack, Prometheus, fake_slack, promtool  # noqa: F401 - fixture

SONNET_USAGE = {
    "input_tokens": 1000,
    "output_tokens": 200,
    "cache_read_input_tokens": 5000,
    "cache_creation_input_tokens": 400,
}
OPUS_USAGE = {"input_tokens": 100, "output_tokens": 50}
# Per million tokens: Sonnet 3 in, 15 out, 0.30 cache read, 3.75 five-minute cache write; Opus 4.5 5 in, 25 out.
SONNET_COST = (1000 * 3 + 200 * 15 + 5000 * 0.3 + 400 * 3.75) / 1e6
OPUS_COST = (100 * 5 + 50 * 25) / 1e6
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$train": ".*",
    "$account": ".*",
}


def send(proxy: str, model: str, *, train_id: str, key: str, stream: bool = False) -> httpx.Response:
    body = {"model": model, "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"train-id": train_id, "authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
    response = httpx.post(f"{proxy}/v1/messages", json=body, headers=headers, timeout=30)
    response.read()
    return response


def known_traffic(proxy: str, upstream: FakeUpstream) -> None:
    a = {"train_id": "team-a", "key": "pt_team_a"}
    for _ in range(3):
        upstream.script({"usage": SONNET_USAGE})
        assert send(proxy, "claude-sonnet-4-5-20250929", **a).status_code == 200
    for _ in range(2):
        upstream.script({"usage": OPUS_USAGE})
        assert send(proxy, "claude-opus-4-5", stream=True, **a).status_code == 200
    upstream.script({"error": {"status": 529}})
    assert send(proxy, "claude-sonnet-4-5", **a).status_code == 529
    upstream.script({"stream_error_after_events": 3})
    assert send(proxy, "claude-3-5-haiku-20241022", stream=True, **a).status_code == 200
    assert send(proxy, "claude-sonnet-4-5", train_id="no-such-train-123", key="whatever").status_code == 401
    upstream.script({"usage": {"input_tokens": 10, "output_tokens": 5}})
    assert send(proxy, "claude-haiku-4-5", train_id="team-b", key="pt_team_b").status_code == 200
    upstream.script({"error": {"status": 429, "retry_after": 1}})
    assert send(proxy, "claude-sonnet-4-5", **a).status_code == 429


def grafana_expression(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr}"
    return expr


def test_prometheus_scrapes_proxy_and_dashboard_after_known_traffic(
    tmp_path: Path,
    start_proxy: ProxyFactory,
    upstream: FakeUpstream,
    credentials_dir: Path,
    sqlite_url: str,
    fake_slack: FakeSlack,  # noqa: F811 - the fixture
) -> None:
    api_key_account(credentials_dir, "acct-key", "sk-ant-api-team-a")
    oauth_account(credentials_dir, "acct-oauth", expires_in_ms=-1000)
    train(credentials_dir, "team-a", ["pt_team_a"], ["acct-key"])
    train(credentials_dir, "team-b", ["pt_team_b"], ["acct-oauth"])
    upstream.oauth(expires_in=3600)
    proxy = start_proxy(sqlite_url, slack_webhook_url=f"{fake_slack.url}/global")
    port = free_port()
    dashboard = Service(
        "dashboard",
        ["dashboard", "--host", "127.0.0.1", "--port", str(port)],
        {
            "DATABASE_URL": sqlite_url,
            "DASHBOARD_API_KEY": "dashboard-test-key",
            "CREDENTIALS_DIR": str(credentials_dir),
        },
        port,
        tmp_path,
    )
    prometheus: Prometheus | None = None
    with services(dashboard):
        dashboard.wait_ready("/metrics")
        started = time.monotonic()
        known_traffic(proxy.url, upstream)
        prometheus = Prometheus(
            tmp_path / "prometheus",
            {"proxy": f"127.0.0.1:{proxy.port}", "dashboard": f"127.0.0.1:{dashboard.port}"},
            rule_files=[MONITORING / "prometheus-rules.yaml"],
        )
        try:
            check_series(prometheus)
            check_exposition(proxy.url, dashboard.url)
            check_dashboard_expressions(prometheus, proxy.url)
            check_rules_evaluate(prometheus)
        except AssertionError:
            print(prometheus.log())
            raise
        finally:
            prometheus.stop()
        # The three upstream failures reached the global Slack webhook as error notices.
        errors = [body["text"] for body in fake_slack.wait_for(3)]
        assert sorted(text.split(":")[1].strip().split(" ")[0] for text in errors) == [
            "overloaded_error",
            "overloaded_error",
            "rate_limit_error",
        ]
        assert time.monotonic() - started < 90


def check_series(prometheus: Prometheus) -> None:
    p = prometheus
    p.wait_for('sum(prompttrain_requests_total{job="proxy", train="team-a"})', 8)
    p.wait_for('sum(prompttrain_requests_total{train="team-a", status_class="2xx"})', 6)
    p.wait_for('sum(prompttrain_requests_total{train="team-a", status_class="4xx"})', 1)
    p.wait_for('sum(prompttrain_requests_total{train="team-a", status_class="5xx"})', 1)
    p.wait_for('sum(prompttrain_requests_total{train="team-a", stream="true"})', 3)
    # A train-id nobody configured is counted, under "unknown", and creates no series of its own.
    p.wait_for('sum(prompttrain_requests_total{train="unknown", account="none", status_class="4xx"})', 1)
    assert p.query('{train="no-such-train-123"}') == []
    p.wait_for('sum(prompttrain_request_duration_seconds_count{train="team-a"})', 8)
    p.wait_for('sum(prompttrain_proxy_overhead_seconds_count{train="team-a"})', 8)
    p.wait_for('sum(prompttrain_upstream_duration_seconds_count{train="team-a"})', 8)
    p.wait_for("sum(prompttrain_requests_in_flight)", 0)
    # Usage, from the writer's observer.
    sonnet = 'train="team-a", account="acct-key", model="sonnet"'
    p.wait_for(f'sum(prompttrain_tokens_total{{{sonnet}, kind="input"}})', 3000)
    p.wait_for(f'sum(prompttrain_tokens_total{{{sonnet}, kind="output"}})', 600)
    p.wait_for(f'sum(prompttrain_tokens_total{{{sonnet}, kind="cache_read"}})', 15000)
    p.wait_for(f'sum(prompttrain_tokens_total{{{sonnet}, kind="cache_write_5m"}})', 1200)
    p.wait_for(f'sum(prompttrain_cost_usd_total{{{sonnet}, estimated="false"}})', 3 * SONNET_COST, tolerance=1e-6)
    p.wait_for('sum(prompttrain_cost_usd_total{train="team-a", model="opus"})', 2 * OPUS_COST, tolerance=1e-6)
    p.wait_for('sum(prompttrain_tokens_total{train="team-b", account="acct-oauth", model="haiku"})', 15)
    p.wait_for('sum(prompttrain_time_to_first_token_seconds_count{train="team-a", model="opus"})', 2)
    p.wait_for('sum(prompttrain_upstream_errors_total{error_type="overloaded_error", in_stream="false"})', 1)
    p.wait_for('sum(prompttrain_upstream_errors_total{error_type="overloaded_error", in_stream="true"})', 1)
    p.wait_for('sum(prompttrain_upstream_errors_total{error_type="rate_limit_error"})', 1)
    # Subscription windows, as the fake upstream's anthropic-ratelimit-unified-* headers state them.
    now = int(time.time())
    p.wait_for('prompttrain_subscription_window_utilization_ratio{account="acct-oauth", window="5h"}', 0.42)
    p.wait_for('prompttrain_subscription_window_utilization_ratio{account="acct-oauth", window="7d"}', 0.18)
    p.wait_for(
        'prompttrain_subscription_window_reset_timestamp_seconds{account="acct-oauth", window="5h"}',
        (now // 18000 + 1) * 18000,
    )
    p.wait_for('prompttrain_subscription_status{account="acct-oauth", status="allowed"}', 1)
    p.wait_for('prompttrain_subscription_status{account="acct-oauth", status="rejected"}', 0)
    # OAuth refresh (the account's token had expired), the 429 cooldown, the writer, Slack.
    p.wait_for('sum(prompttrain_oauth_refreshes_total{account="acct-oauth", result="success"})', 1)
    p.wait_for('sum(prompttrain_account_cooldowns_total{account="acct-key"})', 1)
    p.wait_for('sum(prompttrain_records_written_total{job="proxy", lane="metadata"})', 10)
    p.wait_for('sum(prompttrain_records_lost_total{job="proxy"})', 0)
    p.wait_for('sum(prompttrain_slack_messages_total{kind="error", result="sent"})', 3)
    p.wait_for('up{job="dashboard"}', 1)
    p.wait_for('up{job="proxy"}', 1)


def check_exposition(*urls: str) -> None:
    for url in urls:
        text = httpx.get(f"{url}/metrics", timeout=5).content
        result = promtool("check", "metrics", stdin=text)
        assert result.returncode == 0 and not result.stdout.strip(), (url, result.stdout, result.stderr)


def exposed_names(url: str) -> set[str]:
    """Sample names a `/metrics` output declares, with or without samples yet (HELP/TYPE lines count)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in suffixes.get(family.type, [""])
    }


def check_dashboard_expressions(prometheus: Prometheus, proxy_url: str) -> None:
    board: dict[str, Any] = orjson.loads((MONITORING / "grafana-dashboard.json").read_bytes())
    scraped = set(prometheus.api("label/__name__/values"))
    # Most metrics have series after the traffic above; a few appear only once their feature is used (telemetry).
    names = scraped | exposed_names(proxy_url)
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = grafana_expression(target["expr"])
            prometheus.query(expr)  # raises with Prometheus's parse or evaluation error
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            metric = variable["definition"].split("(")[1].split(",")[0]
            assert metric in scraped, variable["definition"]
    used = {name for panel in board["panels"] for target in panel.get("targets", []) for name in _names(target["expr"])}
    assert used - names == set(), f"the dashboard uses metrics the proxy does not expose: {sorted(used - names)}"
    # Telemetry and the operator (another process) have no series here.
    assert len(used & scraped) >= len(used) - 2, f"without series in Prometheus: {sorted(used - scraped)}"


def _names(expr: str) -> set[str]:
    import re

    return set(re.findall(r"\b(prompttrain_[a-z0-9_]+)\b", expr))


def check_rules_evaluate(prometheus: Prometheus) -> None:
    def evaluated() -> bool:
        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == 11
        bad = [rule for rule in rules if rule["health"] == "err"]
        assert not bad, bad
        return all(rule["health"] == "ok" for rule in rules)

    wait_until(evaluated, timeout=20, interval=0.5)
