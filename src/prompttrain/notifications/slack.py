"""The text of Slack notifications, in the reference's format (§7). Pure functions over parsed JSON, no I/O.

A turn summary:

    :bust_in_silhouette: User: <the user's text>
    :robot_face: Claude: <the assistant's final text, first 20 lines / 3000 characters, "... (truncated)">
        :wrench: <Tool> - <what it did>            (one line per tool call of the turn)

with a footer `<train> | <model> | <account> | Tokens: <in>/<out> | $<cost>`. Unlike the reference the footer
names the account, never a prefix of its key. An error notice is `Error: <type>: <message>` with the same kind of
footer. Everything taken from a conversation is escaped for Slack (`&`, `<`, `>`), so text from a model or a
user cannot mention `<!channel>` or forge links.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

MAX_TEXT = 3000
MAX_USER_TEXT = 1000
MAX_ASSISTANT_LINES = 20
MAX_ERROR_MESSAGE = 500
TRUNCATED = "... (truncated)"
_REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>", re.DOTALL)
# The end of a turn: the model is not waiting for tool results.
TURN_END_REASONS = frozenset({"end_turn", "max_tokens", "stop_sequence", "refusal"})


def escape(text: str) -> str:
    """Slack's three control characters (https://api.slack.com/reference/surfaces/formatting#escaping)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [
        block["text"]
        for block in content
        if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)
    ]


def user_text(content: Any) -> str:
    """What the user typed: text blocks without Claude Code's injected `<system-reminder>` sections."""
    parts = [_REMINDER.sub("", text).strip() for text in _texts(content)]
    return "\n".join(part for part in parts if part)


def _tool_uses(content: Any) -> list[Mapping[str, Any]]:
    if not isinstance(content, list):
        return []
    return [block for block in content if isinstance(block, dict) and block.get("type") == "tool_use"]


def _path_tail(path: Any) -> str:
    if not isinstance(path, str):
        return ""
    return "/".join([part for part in path.split("/") if part][-2:])


def describe_tool(name: str, tool_input: Any) -> str:
    """One line for one tool call, as the reference words it."""
    given: Mapping[str, Any] = tool_input if isinstance(tool_input, Mapping) else {}

    def text(key: str) -> str:
        value = given.get(key)
        return value if isinstance(value, str) else ""

    if name in ("Read", "Write", "Edit", "MultiEdit", "NotebookEdit"):
        detail = _path_tail(given.get("file_path") or given.get("notebook_path"))
    elif name == "Bash":
        detail = _clip(text("command"), 50)
    elif name == "Grep":
        detail = _clip(text("pattern"), 30)
    elif name == "Glob":
        detail = text("pattern")
    elif name == "LS":
        detail = text("path")
    elif name == "TodoWrite":
        todos = given.get("todos")
        items = [todo for todo in todos if isinstance(todo, Mapping)] if isinstance(todos, list) else []
        counts = {
            status: sum(1 for todo in items if todo.get("status") == status)
            for status in ("pending", "in_progress", "completed")
        }
        detail = f"{counts['pending']} pending, {counts['in_progress']} in progress, {counts['completed']} completed"
    elif name == "TodoRead":
        detail = "Checking task list"
    elif name == "WebSearch":
        detail = _clip(text("query"), 40)
    elif name == "WebFetch":
        detail = urllib.parse.urlsplit(text("url")).hostname or ""
    else:
        detail = _clip(text("prompt") or text("description"), 40)
    return f"{name} - {detail}" if detail else name


def _assistant_text(message: Mapping[str, Any]) -> str:
    text = "\n".join(part.strip() for part in _texts(message.get("content")) if part.strip())
    lines = text.splitlines()
    clipped = "\n".join(lines[:MAX_ASSISTANT_LINES])
    if len(clipped) > MAX_TEXT:
        clipped = clipped[:MAX_TEXT]
    return clipped + ("\n" + TRUNCATED if clipped != text else "")


def turn_user_text(request: Mapping[str, Any]) -> tuple[str, list[Mapping[str, Any]]] | None:
    """The user's text that started this turn, and the tool calls the assistant made since (from the history)."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return None
    tools: list[Mapping[str, Any]] = []
    for message in reversed(messages):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "assistant":
            tools[:0] = _tool_uses(message.get("content"))
        elif message.get("role") == "user":
            text = user_text(message.get("content"))
            if text:
                return text, tools
    return None


def is_agent_request(request: Mapping[str, Any]) -> bool:
    """A conversation turn worth summarising, not one of the side calls Claude Code makes (titles, quota checks,
    topic detection) which carry no tools and at most one system block (the reference's classification, §1.6)."""
    tools = request.get("tools")
    system = request.get("system")
    system_count = len(system) if isinstance(system, list) else (1 if system else 0)
    return (isinstance(tools, list) and bool(tools)) or system_count >= 2


def turn_summary(request: Mapping[str, Any], message: Mapping[str, Any]) -> str | None:
    """The Slack text for a response that ends a turn, or None when this response is not one."""
    if message.get("type") not in (None, "message") or message.get("stop_reason") not in TURN_END_REASONS:
        return None
    if not is_agent_request(request):
        return None
    found = turn_user_text(request)
    if found is None:
        return None
    text, tools = found
    if text.strip().lower() == "quota":
        return None
    tools = [*tools, *_tool_uses(message.get("content"))]
    lines = [
        f":bust_in_silhouette: User: {escape(_clip_lines(text, MAX_USER_TEXT))}",
        f":robot_face: Claude: {escape(_assistant_text(message))}",
    ]
    lines.extend(
        f"    :wrench: {escape(describe_tool(str(tool.get('name') or 'tool'), tool.get('input')))}" for tool in tools
    )
    return cap("\n".join(lines))


def _clip_lines(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + TRUNCATED


def cap(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - len(TRUNCATED) - 1] + "\n" + TRUNCATED


def error_text(error_type: str | None, message: str | None, status: int | None) -> str:
    kind = error_type or "error"
    detail = _clip(message or "", MAX_ERROR_MESSAGE)
    status_text = f" (HTTP {status})" if status else ""
    return cap(escape(f"Error: {kind}{status_text}: {detail}" if detail else f"Error: {kind}{status_text}"))


def footer(parts: Sequence[str | None]) -> str:
    return escape(" | ".join(part for part in parts if part))


def payload(
    text: str, footer_text: str, timestamp: float, *, channel: str | None, username: str, icon_emoji: str
) -> dict[str, Any]:
    """The incoming-webhook body: `{text, attachments: [{footer, ts}]}` plus channel and identity when set."""
    body: dict[str, Any] = {
        "text": text,
        "attachments": [{"footer": footer_text, "ts": int(timestamp)}],
        "username": username,
        "icon_emoji": icon_emoji,
    }
    if channel:
        body["channel"] = channel
    return body
