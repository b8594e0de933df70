"""Pure view models for the pages: Messages API payloads as conversations of typed blocks, and the layout of a
conversation's tree. No I/O and no HTML: templates render these (escaping everything they print).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from prompttrain.storage.dashboard_queries import ConversationRequest, branch_kind

IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
MAX_TEXT = 200_000  # characters of one block shown before it is cut (the raw JSON viewer has everything)


@dataclass(frozen=True)
class Block:
    kind: str  # text | thinking | redacted_thinking | tool_use | tool_result | image | document | other
    text: str = ""
    name: str = ""
    tool_id: str = ""
    data_url: str | None = None  # images sent inline, of an allowed raster type
    is_error: bool = False
    truncated: bool = False
    children: tuple[Block, ...] = ()


@dataclass(frozen=True)
class MessageView:
    index: int
    role: str
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Exchange:
    """A request body and its response, as a person reads them."""

    system: tuple[Block, ...]
    messages: tuple[MessageView, ...]
    total_messages: int
    tools: tuple[str, ...]
    response: MessageView | None
    parameters: dict[str, Any] = field(default_factory=dict)


def _pretty(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode("utf-8")
    except TypeError:
        return repr(value)


def _text(value: Any) -> tuple[str, bool]:
    text = value if isinstance(value, str) else _pretty(value)
    return (text[:MAX_TEXT], True) if len(text) > MAX_TEXT else (text, False)


def block_of(raw: Any) -> Block:
    if isinstance(raw, str):
        text, cut = _text(raw)
        return Block("text", text=text, truncated=cut)
    if not isinstance(raw, Mapping):
        return Block("other", text=_pretty(raw))
    kind = raw.get("type")
    if kind == "text":
        text, cut = _text(raw.get("text", ""))
        return Block("text", text=text, truncated=cut)
    if kind == "thinking":
        text, cut = _text(raw.get("thinking", ""))
        return Block("thinking", text=text, truncated=cut)
    if kind == "redacted_thinking":
        return Block("redacted_thinking", text="(redacted by Anthropic)")
    if kind in ("tool_use", "server_tool_use"):
        text, cut = _text(raw.get("input", {}))
        return Block(
            "tool_use", text=text, name=str(raw.get("name", "")), tool_id=str(raw.get("id", "")), truncated=cut
        )
    if kind == "tool_result" or (isinstance(kind, str) and kind.endswith("_tool_result")):
        content = raw.get("content")
        children: tuple[Block, ...]
        if isinstance(content, list):
            children = tuple(block_of(item) for item in content)
        elif content is None:
            children = ()
        else:
            children = (block_of(content),)
        return Block(
            "tool_result",
            tool_id=str(raw.get("tool_use_id", "")),
            is_error=bool(raw.get("is_error", False)),
            children=children,
        )
    if kind == "image":
        return _image(raw.get("source"))
    if kind == "document":
        source = raw.get("source")
        media = source.get("media_type") if isinstance(source, Mapping) else None
        return Block("document", text=str(raw.get("title") or media or "document"))
    return Block("other", text=_text(raw)[0], name=str(kind))


def _image(source: Any) -> Block:
    if isinstance(source, Mapping) and source.get("type") == "base64":
        media = str(source.get("media_type", ""))
        data = source.get("data")
        if (
            media in IMAGE_TYPES
            and isinstance(data, str)
            and data.replace("+", "").replace("/", "").rstrip("=").isalnum()
        ):
            return Block("image", data_url=f"data:{media};base64,{data}", text=media)
        return Block("image", text=f"image ({media or 'unknown type'}, not shown)")
    if isinstance(source, Mapping) and source.get("type") == "url":
        return Block("image", text=f"image at {source.get('url', '')} (not loaded)")
    return Block("image", text="image (not shown)")


def message_of(index: int, raw: Any) -> MessageView:
    if not isinstance(raw, Mapping):
        return MessageView(index, "unknown", (block_of(raw),))
    content = raw.get("content")
    blocks = tuple(block_of(item) for item in content) if isinstance(content, list) else (block_of(content or ""),)
    return MessageView(index, str(raw.get("role", "unknown")), blocks)


def exchange_of(request_body: Any, response_body: Any, *, last: int | None = 40) -> Exchange:
    """The request's system prompt, messages (the `last` ones; None for all), tools, and the response."""
    body = request_body if isinstance(request_body, Mapping) else {}
    system_raw = body.get("system")
    if isinstance(system_raw, list):
        system = tuple(block_of(item) for item in system_raw)
    elif system_raw:
        system = (block_of(system_raw),)
    else:
        system = ()
    found = body.get("messages")
    messages_raw: list[Any] = found if isinstance(found, list) else []
    start = 0 if last is None else max(0, len(messages_raw) - last)
    messages = tuple(message_of(index, messages_raw[index]) for index in range(start, len(messages_raw)))
    tools = tuple(str(tool.get("name", "?")) for tool in body.get("tools") or [] if isinstance(tool, Mapping))
    response = None
    if isinstance(response_body, Mapping) and isinstance(response_body.get("content"), list):
        response = message_of(len(messages_raw), {"role": "assistant", "content": response_body["content"]})
    parameters = {
        key: body[key]
        for key in ("model", "max_tokens", "temperature", "stream", "thinking", "tool_choice", "metadata")
        if key in body
    }
    return Exchange(system, messages, len(messages_raw), tools, response, parameters)


# -- conversation tree ------------------------------------------------------------------------------------------

ROW = 30
LANE = 22
MARGIN = 16


@dataclass(frozen=True)
class Lane:
    branch_id: str
    kind: str
    x: int


@dataclass(frozen=True)
class Node:
    request: ConversationRequest
    x: int
    y: int
    kind: str


@dataclass(frozen=True)
class Edge:
    path: str  # an SVG path, numbers only
    kind: str  # parent | implied | subagent


@dataclass(frozen=True)
class Graph:
    lanes: tuple[Lane, ...]
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    width: int
    height: int
    label_x: int


def layout(requests: Sequence[ConversationRequest]) -> Graph:
    """One row per request (in time order), one lane per branch (main first). Edges follow `parent_request_id`;
    without one, a request continues the previous request of its branch (drawn dotted); the first request of a
    sub-agent branch hangs off the request whose Agent/Task call started it (dashed)."""
    order: dict[str, Lane] = {}
    names = sorted({r.branch_id for r in requests}, key=lambda name: (name != "main", _first_seen(requests, name)))
    for position, name in enumerate(names):
        kind = branch_kind(name, any(r.is_subtask for r in requests if r.branch_id == name))
        order[name] = Lane(name, kind, MARGIN + position * LANE)
    nodes: list[Node] = []
    where: dict[uuid.UUID, Node] = {}
    last_in_branch: dict[str, Node] = {}
    edges: list[Edge] = []
    for row, request in enumerate(requests):
        lane = order[request.branch_id]
        node = Node(request, lane.x, MARGIN + row * ROW, lane.kind)
        parent = where.get(request.parent_request_id) if request.parent_request_id else None
        if parent is not None:
            edges.append(Edge(_path(parent, node), "parent"))
        elif request.branch_id in last_in_branch:
            edges.append(Edge(_path(last_in_branch[request.branch_id], node), "implied"))
        elif request.parent_task_request_id and request.parent_task_request_id in where:
            edges.append(Edge(_path(where[request.parent_task_request_id], node), "subagent"))
        nodes.append(node)
        where[request.request_id] = node
        last_in_branch[request.branch_id] = node
    label_x = MARGIN + max(len(order), 1) * LANE + 8
    return Graph(
        lanes=tuple(order.values()),
        nodes=tuple(nodes),
        edges=tuple(edges),
        width=label_x + 720,
        height=MARGIN * 2 + max(len(requests) - 1, 0) * ROW,
        label_x=label_x,
    )


def _first_seen(requests: Sequence[ConversationRequest], name: str) -> int:
    return next(index for index, request in enumerate(requests) if request.branch_id == name)


def _path(start: Node, end: Node) -> str:
    if start.x == end.x:
        return f"M{start.x},{start.y} L{end.x},{end.y}"
    bend = start.y + ROW // 2
    return (
        f"M{start.x},{start.y} C{start.x},{bend} {end.x},{bend} {end.x},{min(bend + ROW // 2, end.y)} L{end.x},{end.y}"
    )
