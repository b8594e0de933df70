"""Slack notifications through a real proxy to a fake incoming webhook on 127.0.0.1: per-train and global
webhooks, the reference's payload format, error notices, rate limiting, and a hanging Slack that slows nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ProxyFactory
from tests.helpers import FakeUpstream, wait_until
from tests.integration.test_trains_and_accounts import api_key_account, train
from tests.monitoring import FakeSlack, fake_slack, scrape, value  # noqa: F401 - fixture

TOOLS = [{"name": "Bash", "description": "Run a shell command", "input_schema": {"type": "object"}}]


def turn_body(text: str) -> dict[str, Any]:
    """The last request of a Claude Code turn: the user's text, one tool round trip, now the final answer."""
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "stream": True,
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": text}]},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls -la"}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "main.py"}]},
        ],
    }


def post(proxy: str, train_id: str, key: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"train-id": train_id, "authorization": f"Bearer {key}"}
    response = httpx.post(f"{proxy}/v1/messages", json=body, headers=headers, timeout=30)
    response.read()
    return response


def setup_trains(credentials_dir: Path, slack_url: str) -> None:
    api_key_account(credentials_dir, "acct-key", "sk-ant-api-secret-account-key")
    train(
        credentials_dir,
        "team-s",
        ["pt_s"],
        ["acct-key"],
        slack={"webhook_url": f"{slack_url}/team-s", "channel": "#team-s"},
    )
    train(credentials_dir, "team-g", ["pt_g"], ["acct-key"])
    train(
        credentials_dir,
        "team-off",
        ["pt_off"],
        ["acct-key"],
        slack={"webhook_url": f"{slack_url}/off", "enabled": False},
    )


def test_turn_summaries_and_errors_reach_the_trains_webhook_or_the_global_one(
    start_proxy: ProxyFactory,
    upstream: FakeUpstream,
    credentials_dir: Path,
    sqlite_url: str,
    fake_slack: FakeSlack,  # noqa: F811
) -> None:
    setup_trains(credentials_dir, fake_slack.url)
    proxy = start_proxy(sqlite_url, slack_webhook_url=f"{fake_slack.url}/global", slack_channel="#platform")
    done = {
        "content": [{"type": "text", "text": "All done: <main.py> is fixed."}],
        "usage": {"input_tokens": 12, "output_tokens": 3},
    }

    upstream.script(done)
    assert post(proxy.url, "team-s", "pt_s", turn_body("Fix main.py please")).status_code == 200
    [summary] = fake_slack.wait_for(1)
    assert fake_slack.paths == ["/team-s"]
    assert summary["text"] == (
        ":bust_in_silhouette: User: Fix main.py please\n"
        ":robot_face: Claude: All done: &lt;main.py&gt; is fixed.\n"
        "    :wrench: Bash - ls -la"
    )
    footer = summary["attachments"][0]["footer"]
    assert footer.startswith("team-s | claude-sonnet-4-5 | acct-key | Tokens: 12/3 | $")
    assert abs(summary["attachments"][0]["ts"] - time.time()) < 60
    assert (summary["channel"], summary["username"], summary["icon_emoji"]) == (
        "#team-s",
        "Agent Prompt Train",
        ":robot_face:",
    )

    # The same turn again (a client retry) is not repeated; a disabled train sends nothing, not even globally;
    # a train without its own webhook uses the global one; an upstream failure is an error notice.
    upstream.script(done, done, done, {"error": {"status": 529}})
    assert post(proxy.url, "team-s", "pt_s", turn_body("Fix main.py please")).status_code == 200
    assert post(proxy.url, "team-off", "pt_off", turn_body("Quiet please")).status_code == 200
    assert post(proxy.url, "team-g", "pt_g", turn_body("Global turn")).status_code == 200
    assert post(proxy.url, "team-s", "pt_s", {**turn_body("x"), "stream": False}).status_code == 529
    fake_slack.wait_for(3)
    pairs = list(zip(fake_slack.paths, fake_slack.received, strict=True))
    assert sorted(path for path, _ in pairs) == ["/global", "/team-s", "/team-s"]
    global_turn = next(body for path, body in pairs if path == "/global")
    assert global_turn["channel"] == "#platform"
    assert global_turn["text"].startswith(":bust_in_silhouette: User: Global turn\n")
    error = next(body for path, body in pairs if path == "/team-s" and body["text"].startswith("Error"))
    assert error["text"] == "Error: overloaded_error (HTTP 529): Overloaded"
    assert "request " in error["attachments"][0]["footer"]
    everything = str(fake_slack.received)
    assert "sk-ant-api-secret-account-key" not in everything and "pt_s" not in everything
    samples = scrape(proxy.url)
    assert value(samples, "prompttrain_slack_messages_total", kind="turn", result="sent") == 2
    assert value(samples, "prompttrain_slack_messages_total", kind="error", result="sent") == 1
    assert len(fake_slack.received) == 3


def test_a_hanging_slack_slows_no_request_and_overflow_is_counted(
    start_proxy: ProxyFactory,
    upstream: FakeUpstream,
    credentials_dir: Path,
    sqlite_url: str,
    fake_slack: FakeSlack,  # noqa: F811
) -> None:
    setup_trains(credentials_dir, fake_slack.url)
    proxy = start_proxy(
        sqlite_url,
        slack_timeout_seconds=30,
        slack_queue_size=2,
        slack_max_per_minute=6000,
    )
    upstream.script({"content": [{"type": "text", "text": "ok"}], "repeat": -1})
    fake_slack.hang()

    durations = []
    for n in range(20):
        started = time.monotonic()
        assert post(proxy.url, "team-s", "pt_s", turn_body(f"question {n}")).status_code == 200
        durations.append(time.monotonic() - started)

    # Two workers hang on Slack, two notifications wait in the queue, the other sixteen are dropped and counted.
    def dropped() -> float:
        return value(scrape(proxy.url), "prompttrain_slack_messages_total", kind="turn", result="dropped")

    wait_until(lambda: dropped() == 16, timeout=15)
    samples = scrape(proxy.url)
    assert value(samples, "prompttrain_slack_queue_depth") == 2
    assert value(samples, "prompttrain_slack_messages_total", result="sent") == 0
    # Slack holds each post for up to 30 s; had any request waited for it, it would show here.
    assert max(durations) < 2.0, durations
    fake_slack.release()
    fake_slack.wait_for(4)
    wait_until(lambda: value(scrape(proxy.url), "prompttrain_slack_messages_total", result="sent") == 4)


def test_notifications_over_the_webhooks_rate_are_dropped_and_counted(
    start_proxy: ProxyFactory,
    upstream: FakeUpstream,
    credentials_dir: Path,
    sqlite_url: str,
    fake_slack: FakeSlack,  # noqa: F811
) -> None:
    setup_trains(credentials_dir, fake_slack.url)
    proxy = start_proxy(sqlite_url, slack_max_per_minute=2)
    upstream.script({"error": {"status": 500}, "repeat": 3})
    for _ in range(3):
        assert post(proxy.url, "team-s", "pt_s", {**turn_body("x"), "stream": False}).status_code == 500

    def counted() -> bool:
        samples = scrape(proxy.url)
        sent = value(samples, "prompttrain_slack_messages_total", kind="error", result="sent")
        limited = value(samples, "prompttrain_slack_messages_total", kind="error", result="rate_limited")
        return sent == 2 and limited == 1

    wait_until(counted)
    assert [body["text"] for body in fake_slack.received] == ["Error: api_error (HTTP 500): Internal server error"] * 2
