"""Parse a captured Server-Sent-Events body and rebuild the Messages API response it carried.

The proxy forwards the upstream bytes untouched and keeps a copy of the chunks with their arrival times; this
module turns that copy into the stored response (text, thinking, redacted thinking, tool_use and server tool
blocks included, unlike the reference which drops thinking, see its §1.7), the usage, an in-band `event: error`
and the time to the first content token.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

JsonObject = dict[str, Any]
TOOL_BLOCK_TYPES = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
CONTENT_EVENT = "content_block_delta"


@dataclass
class StreamSummary:
    message: JsonObject | None = None
    error: JsonObject | None = None
    event_count: int = 0
    first_token_at: float | None = None
    complete: bool = False
    event_types: list[str] = field(default_factory=list)


def iter_events(buffer: bytes) -> Iterator[tuple[str | None, bytes, int]]:
    """Yield (event name, data, end offset) for each complete event in buffer (events end with a blank line)."""
    position = 0
    normalised = buffer.replace(b"\r\n", b"\n")
    while True:
        end = normalised.find(b"\n\n", position)
        if end < 0:
            return
        raw = normalised[position:end]
        position = end + 2
        name: str | None = None
        data_lines: list[bytes] = []
        for line in raw.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode("utf-8", "replace")
            elif line.startswith(b"data:"):
                value = line[5:]
                data_lines.append(value[1:] if value.startswith(b" ") else value)
        if name is None and not data_lines:
            continue
        yield name, b"\n".join(data_lines), position


def summarise_stream(chunks: Iterable[tuple[float, bytes]]) -> StreamSummary:
    """Rebuild the message from timed chunks; `first_token_at` is the arrival time of the first content delta."""
    summary = StreamSummary()
    builder = MessageBuilder()
    pending = b""
    for arrived_at, chunk in chunks:
        pending += chunk
        consumed = 0
        for name, data, end in iter_events(pending):
            consumed = end
            event = _decode(data)
            if event is None:
                continue
            kind = str(event.get("type") or name or "")
            summary.event_count += 1
            summary.event_types.append(kind)
            if kind == CONTENT_EVENT and summary.first_token_at is None:
                summary.first_token_at = arrived_at
            if kind == "error":
                error = event.get("error")
                summary.error = error if isinstance(error, dict) else {"type": "error", "message": str(error)}
            elif kind == "message_stop":
                summary.complete = True
            builder.apply(kind, event)
        if consumed:
            pending = pending[consumed:].lstrip(b"\r\n") if consumed < len(pending) else b""
    summary.message = builder.result()
    return summary


def _decode(data: bytes) -> JsonObject | None:
    if not data or data == b"[DONE]":
        return None
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class MessageBuilder:
    """Applies stream events, in order, to rebuild the final `message` object."""

    def __init__(self) -> None:
        self.message: JsonObject | None = None
        self.blocks: dict[int, JsonObject] = {}
        self.partial_json: dict[int, list[str]] = {}

    def apply(self, kind: str, event: JsonObject) -> None:
        if kind == "message_start" and isinstance(event.get("message"), dict):
            self.message = copy.deepcopy(event["message"])
            self.message["content"] = []
        elif kind == "content_block_start" and isinstance(event.get("content_block"), dict):
            index = int(event.get("index", len(self.blocks)))
            block = copy.deepcopy(event["content_block"])
            if block.get("type") in TOOL_BLOCK_TYPES:
                self.partial_json[index] = []
            self.blocks[index] = block
        elif kind == "content_block_delta":
            self._apply_delta(int(event.get("index", 0)), event.get("delta"))
        elif kind == "content_block_stop":
            self._finish_block(int(event.get("index", 0)))
        elif kind == "message_delta":
            self._apply_message_delta(event)

    def _apply_delta(self, index: int, delta: Any) -> None:
        if not isinstance(delta, dict):
            return
        block = self.blocks.setdefault(index, {"type": "text", "text": ""})
        delta_type = delta.get("type")
        if delta_type == "text_delta":
            block["text"] = str(block.get("text", "")) + str(delta.get("text", ""))
        elif delta_type == "thinking_delta":
            block["thinking"] = str(block.get("thinking", "")) + str(delta.get("thinking", ""))
        elif delta_type == "signature_delta":
            block["signature"] = str(block.get("signature", "")) + str(delta.get("signature", ""))
        elif delta_type == "input_json_delta":
            self.partial_json.setdefault(index, []).append(str(delta.get("partial_json", "")))
        elif delta_type == "citations_delta" and "citation" in delta:
            block.setdefault("citations", []).append(delta["citation"])

    def _finish_block(self, index: int) -> None:
        pieces = self.partial_json.pop(index, None)
        if pieces is None or index not in self.blocks:
            return
        text = "".join(pieces)
        if not text:
            return  # the start event's input (normally {}) stands
        try:
            self.blocks[index]["input"] = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.blocks[index]["input"] = text

    def _apply_message_delta(self, event: JsonObject) -> None:
        if self.message is None:
            self.message = {"content": []}
        delta = event.get("delta")
        if isinstance(delta, dict):
            for key in ("stop_reason", "stop_sequence", "container"):
                if key in delta:
                    self.message[key] = delta[key]
        usage = event.get("usage")
        if isinstance(usage, dict):
            merged = dict(self.message.get("usage") or {})
            merged.update({key: value for key, value in usage.items() if value is not None})
            self.message["usage"] = merged

    def result(self) -> JsonObject | None:
        if self.message is None and not self.blocks:
            return None
        for index in list(self.partial_json):
            self._finish_block(index)
        message = self.message if self.message is not None else {"content": []}
        message["content"] = [self.blocks[index] for index in sorted(self.blocks)]
        return message
