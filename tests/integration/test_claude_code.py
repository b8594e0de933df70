"""The real Claude Code CLI driven through a proxy process to the fake upstream, recorded in SQLite and PostgreSQL.

The CLI (pinned in tests/claude_code/package.json) is a native binary; `make test` installs it with
`npm ci --prefix tests/claude_code`. What it sends, as observed with 2.1.197:

* `HEAD /` once (a connectivity check; the proxy answers it and records nothing);
* `POST /v1/messages?beta=true`, streaming, for every conversation turn: `system` is a list of text blocks
  (a billing-header block, the agent preamble, the long prompt, then `--append-system-prompt`), ~25 `tools`,
  `metadata.user_id` is a JSON string holding the session id, headers `X-Claude-Code-Session-Id`,
  `anthropic-beta: claude-code-20250219,...`, `x-app: cli`, `user-agent: claude-cli/<version> (external, sdk-cli)`;
* without CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC, also a title request to `/v1/messages` (same model, no tools,
  the prompt quoted inside `<session>` tags), which a `last_user_text_contains` match would wrongly catch.

Scripted replies therefore match on a marker appended to the system prompt, which only the conversation carries.
Telemetry (`/api/event_logging/v2/batch`) goes to api.anthropic.com, not to ANTHROPIC_BASE_URL, and is disabled.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ProxyFactory
from tests.helpers import IN_CI, REPO, FakeUpstream, Service, wait_for_rows

pytestmark = pytest.mark.claude_code

CLAUDE_CODE_DIR = REPO / "tests" / "claude_code"
CLAUDE_BIN = CLAUDE_CODE_DIR / "node_modules" / ".bin" / "claude"
PINNED_VERSION = json.loads((CLAUDE_CODE_DIR / "package.json").read_text())["dependencies"]["@anthropic-ai/claude-code"]
MODEL = "claude-sonnet-4-5-20250929"
API_KEY = "sk-ant-api03-dummy-claude-code-test-key"
CLI_TIMEOUT_SECONDS = 60

FIRST_USAGE = {
    "input_tokens": 1234,
    "output_tokens": 56,
    "cache_read_input_tokens": 7890,
    "cache_creation_input_tokens": 321,
}
SECOND_USAGE = {
    "input_tokens": 1300,
    "output_tokens": 12,
    "cache_read_input_tokens": 8000,
    "cache_creation_input_tokens": 0,
}


@pytest.fixture(scope="session")
def claude_cli() -> Path:
    """The installed Claude Code binary; missing is a failure in CI and a skip elsewhere."""
    problem = None
    if not CLAUDE_BIN.exists():
        problem = f"Claude Code CLI not installed at {CLAUDE_BIN.relative_to(REPO)}"
    else:
        # Without its postinstall step the package leaves a placeholder that cannot answer --version.
        try:
            version = subprocess.run(
                [str(CLAUDE_BIN), "--version"], capture_output=True, text=True, timeout=30, env=_base_env(Path("/"))
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            problem = f"{CLAUDE_BIN.relative_to(REPO)} does not run ({error})"
        else:
            if version.returncode != 0 or PINNED_VERSION not in version.stdout:
                problem = f"{CLAUDE_BIN.relative_to(REPO)} --version gave {version.stdout!r} {version.stderr!r}"
    if problem is not None:
        message = f"{problem}; run `make test`, which installs it (npm ci --prefix tests/claude_code)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return CLAUDE_BIN


def _base_env(home: Path) -> dict[str, str]:
    """A clean environment: nothing of the developer's own Claude Code / Anthropic settings leaks in."""
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }


def run_claude(cli: Path, proxy: Service, directory: Path, prompt: str, *args: str) -> subprocess.CompletedProcess[str]:
    home, work, temporary = directory / "home", directory / "work", directory / "tmp"
    for path in (home, work, temporary):
        path.mkdir(parents=True, exist_ok=True)
    env = _base_env(home) | {
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "TMPDIR": str(temporary),
        "CLAUDE_CODE_TMPDIR": str(temporary),
        "ANTHROPIC_BASE_URL": proxy.url,
        "ANTHROPIC_API_KEY": API_KEY,
    }
    return subprocess.run(
        [str(cli), "-p", prompt, "--output-format", "json", "--model", MODEL, *args],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
        stdin=subprocess.DEVNULL,
    )


def test_claude_code_runs_a_tool_through_the_proxy_and_every_turn_is_recorded(
    claude_cli: Path, start_proxy: ProxyFactory, upstream: FakeUpstream, database_url: str, tmp_path: Path
) -> None:
    marker = f"prompttrain-marker-{uuid.uuid4().hex[:12]}"
    conversation = f"prompttrain-conversation-{uuid.uuid4().hex[:12]}"
    final_text = f"The command printed {marker}."
    command = {"command": f"echo {marker}", "description": "Print the test marker"}
    # The upstream request ids name the two turns in api_requests (whatever side requests Claude Code adds).
    turn_ids = [f"req_prompttrain_turn{number}_{uuid.uuid4().hex[:12]}" for number in (1, 2)]
    upstream.script(
        {
            "match": {"system_contains": conversation, "has_tool_result": False},
            "content": [
                {"type": "text", "text": "I will run the command."},
                {"type": "tool_use", "id": "toolu_prompttrain_1", "name": "Bash", "input": command},
            ],
            "usage": FIRST_USAGE,
            "headers": {"request-id": turn_ids[0]},
        },
        {
            "match": {"system_contains": conversation, "has_tool_result": True},
            "content": [{"type": "text", "text": final_text}],
            "usage": SECOND_USAGE,
            "headers": {"request-id": turn_ids[1]},
        },
    )
    proxy = start_proxy(database_url)

    result = run_claude(
        claude_cli,
        proxy,
        tmp_path / "claude",
        "Run the marker command with Bash, then report what it printed.",
        "--allowedTools",
        "Bash",
        "--append-system-prompt",
        conversation,
    )

    received = upstream.received()
    context = _diagnostics(result, proxy, received)
    assert result.returncode == 0, context
    output = json.loads(result.stdout)
    assert (output["type"], output["is_error"], output["result"]) == ("result", False, final_text), context
    assert output["num_turns"] == 2, context
    session_id = output["session_id"]
    assert session_id

    # What reached the upstream: both turns, and the second carries the real output of the Bash tool.
    assert all(item["path"].startswith("/v1/") for item in received), context
    assert not any("event_logging" in item["path"] for item in received), context
    turns = [item for item in received if conversation in _system_text(item["body"])]
    assert len(turns) == 2, context
    for turn in turns:
        assert (turn["method"], turn["path"], turn["query"]) == ("POST", "/v1/messages", {"beta": "true"})
        assert turn["headers"]["x-api-key"] == API_KEY  # the passthrough train forwards the client's own key
        assert turn["headers"]["x-claude-code-session-id"] == session_id
        assert "claude-code-20250219" in turn["headers"]["anthropic-beta"].split(",")
        body = turn["body"]
        assert body["model"] == MODEL and body["stream"] is True
        assert isinstance(body["system"], list) and "Bash" in {tool["name"] for tool in body["tools"]}
        assert json.loads(body["metadata"]["user_id"])["session_id"] == session_id
    tool_results = [
        block
        for block in turns[1]["body"]["messages"][-1]["content"]
        if isinstance(block, dict) and block.get("type") == "tool_result"
    ]
    assert len(tool_results) == 1, context
    assert tool_results[0]["tool_use_id"] == "toolu_prompttrain_1"
    assert not tool_results[0].get("is_error")
    # Exactly the echoed output: a refusal would quote the command, not be equal to its output.
    assert _tool_result_text(tool_results[0]).strip() == marker, context

    # What the proxy recorded: every forwarded request, the two conversation turns with their usage.
    rows = wait_for_rows(database_url, "SELECT * FROM api_requests ORDER BY timestamp", len(received), timeout=15)
    assert len(rows) == len(received), context
    by_upstream_id = {row["upstream_request_id"]: row for row in rows}
    assert set(turn_ids) <= set(by_upstream_id), context
    for turn_id, usage, tools, stop_reason in (
        (turn_ids[0], FIRST_USAGE, 1, "tool_use"),
        (turn_ids[1], SECOND_USAGE, 0, "end_turn"),
    ):
        row = by_upstream_id[turn_id]
        assert (row["method"], row["path"], row["status_code"], row["outcome"]) == (
            "POST",
            "/v1/messages?beta=true",
            200,
            "completed",
        )
        assert (row["train_id"], row["account_id"]) == ("default", "passthrough")
        assert row["model"] == MODEL and row["stream"] in (True, 1)
        assert {key: row[key] for key in usage} == usage
        assert (row["tool_call_count"], row["stop_reason"]) == (tools, stop_reason)
        assert row["session_id"] == session_id
        assert row["first_token_ms"] is not None and row["duration_ms"] >= row["first_token_ms"]
        headers = _json(row["request_headers"])
        assert "x-api-key" not in headers and "authorization" not in headers
        assert headers["x-claude-code-session-id"] == session_id
        assert headers["user-agent"].startswith(f"claude-cli/{PINNED_VERSION} ")
        assert headers["x-app"] == "cli"
    assert by_upstream_id[turn_ids[0]]["timestamp"] < by_upstream_id[turn_ids[1]]["timestamp"]
    # Side requests (if any) belong to the same Claude Code session.
    assert {row["session_id"] for row in rows} == {session_id}
    assert API_KEY not in str(rows)


def _system_text(body: Any) -> str:
    system = body.get("system") if isinstance(body, dict) else None
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n".join(block.get("text", "") for block in system if isinstance(block, dict))
    return ""


def _tool_result_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _diagnostics(result: subprocess.CompletedProcess[str], proxy: Service, received: list[dict[str, Any]]) -> str:
    summary = [
        (
            item["method"],
            item["path"],
            item["query"],
            item["body"].get("model") if isinstance(item["body"], dict) else None,
        )
        for item in received
    ]
    return (
        f"claude exited {result.returncode}\nstdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}\n"
        f"upstream received: {summary}\nproxy log tail:\n{proxy.log()[-3000:]}"
    )


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value
