"""Which tools a request's turn is about: the names of the tools whose results the last user message carries.

Claude Code sends a tool's result in the user message that follows the assistant's tool_use; the request that
carries it (and the tokens and dollars it costs) is attributed to that tool.
"""

from __future__ import annotations

from typing import Any


def tool_result_names(body: Any) -> list[str]:
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return []
    names: dict[str, str] = {}
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if message.get("role") == "assistant" and isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") in ("tool_use", "server_tool_use"):
                    names[str(block.get("id"))] = str(block.get("name"))
    last = messages[-1] if messages else None
    content = last.get("content") if isinstance(last, dict) and last.get("role") == "user" else None
    if not isinstance(content, list):
        return []
    found = []
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            name = names.get(str(block.get("tool_use_id")))
            if name is not None and name not in found:
                found.append(name)
    return found
