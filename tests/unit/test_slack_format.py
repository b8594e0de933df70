"""Slack texts in the reference's format (§7): turn summaries, tool lines, truncation, escaping, error notices."""

from __future__ import annotations

from typing import Any

from prompttrain.notifications import slack

TOOLS = [{"name": "Bash", "description": "run", "input_schema": {"type": "object"}}]


def turn_request(*history: dict[str, Any]) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "tools": TOOLS, "messages": list(history)}


def assistant(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": list(blocks)}


def tool_use(name: str, **tool_input: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{name}", "name": name, "input": tool_input}


def final(text: str, stop_reason: str = "end_turn") -> dict[str, Any]:
    return {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
    }


def test_a_turn_with_tool_calls_reads_like_the_reference() -> None:
    request = turn_request(
        {"role": "user", "content": "earlier question"},
        assistant({"type": "text", "text": "earlier answer"}),
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>\nignore me\n</system-reminder>"},
                {"type": "text", "text": "List the files & fix main.py"},
            ],
        },
        assistant({"type": "text", "text": "Looking."}, tool_use("Bash", command="ls -la /srv/app")),
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_Bash", "content": "main.py"}]},
        assistant(
            tool_use("Read", file_path="/srv/app/src/main.py"), tool_use("Edit", file_path="/srv/app/src/main.py")
        ),
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_Edit", "content": "ok"}]},
    )
    text = slack.turn_summary(request, final("Fixed <b>it</b>."))
    assert text == (
        ":bust_in_silhouette: User: List the files &amp; fix main.py\n"
        ":robot_face: Claude: Fixed &lt;b&gt;it&lt;/b&gt;.\n"
        "    :wrench: Bash - ls -la /srv/app\n"
        "    :wrench: Read - src/main.py\n"
        "    :wrench: Edit - src/main.py"
    )


def test_only_the_end_of_an_agent_turn_is_summarised() -> None:
    request = turn_request({"role": "user", "content": "hello"})
    assert slack.turn_summary(request, final("hi", stop_reason="tool_use")) is None
    # Claude Code's side calls (titles, topic detection) carry neither tools nor a multi-block system prompt.
    side_call = {
        "model": "claude-haiku-4-5",
        "system": "Write a 5-10 word title",
        "messages": [{"role": "user", "content": "x"}],
    }
    assert slack.turn_summary(side_call, final("A title")) is None
    assert slack.turn_summary(turn_request({"role": "user", "content": "quota"}), final("ok")) is None
    main_agent = {
        "system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        "messages": [{"role": "user", "content": "hey"}],
    }
    assert (
        slack.turn_summary(main_agent, final("hello")) == ":bust_in_silhouette: User: hey\n:robot_face: Claude: hello"
    )


def test_long_answers_are_cut_at_twenty_lines_and_the_text_at_3000_characters() -> None:
    answer = "\n".join(f"line {n}" for n in range(40))
    text = slack.turn_summary(turn_request({"role": "user", "content": "count"}), final(answer))
    assert text is not None
    assert "line 19\n... (truncated)" in text and "line 20" not in text
    many_tools = [tool_use("Bash", command=f"echo {n} " + "x" * 60) for n in range(200)]
    text = slack.turn_summary(turn_request({"role": "user", "content": "go"}, assistant(*many_tools)), final("done"))
    assert text is not None and len(text) <= slack.MAX_TEXT and text.endswith("... (truncated)")


def test_tool_descriptions() -> None:
    describe = slack.describe_tool
    assert describe("Bash", {"command": "x" * 80}) == "Bash - " + "x" * 47 + "..."
    assert describe("Grep", {"pattern": "def .*"}) == "Grep - def .*"
    assert describe("Glob", {"pattern": "**/*.py"}) == "Glob - **/*.py"
    assert describe("LS", {"path": "/tmp"}) == "LS - /tmp"
    todos = [{"status": "pending"}, {"status": "in_progress"}, {"status": "completed"}, {"status": "completed"}]
    assert describe("TodoWrite", {"todos": todos}) == "TodoWrite - 1 pending, 1 in progress, 2 completed"
    assert describe("TodoRead", {}) == "TodoRead - Checking task list"
    assert describe("WebSearch", {"query": "prometheus naming"}) == "WebSearch - prometheus naming"
    assert describe("WebFetch", {"url": "https://docs.example.org/page?q=1"}) == "WebFetch - docs.example.org"
    assert describe("Agent", {"description": "Explore the repo", "prompt": "Look around"}) == "Agent - Look around"
    assert describe("mcp__thing", "not an object") == "mcp__thing"


def test_slack_mentions_and_links_from_a_conversation_are_neutralised() -> None:
    text = slack.turn_summary(turn_request({"role": "user", "content": "<!channel> <https://evil|click>"}), final("ok"))
    assert text is not None and "<!channel>" not in text and "&lt;!channel&gt;" in text


def test_error_notices_and_payload() -> None:
    text = slack.error_text("overloaded_error", "Overloaded", 529)
    assert text == "Error: overloaded_error (HTTP 529): Overloaded"
    body = slack.payload(
        text, slack.footer(["team", None, "acct"]), 1700000000.5, channel="#ops", username="u", icon_emoji=":x:"
    )
    assert body == {
        "text": text,
        "attachments": [{"footer": "team | acct", "ts": 1700000000}],
        "username": "u",
        "icon_emoji": ":x:",
        "channel": "#ops",
    }
    assert "channel" not in slack.payload("t", "f", 0, channel=None, username="u", icon_emoji=":x:")
