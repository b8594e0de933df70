"""Pure builders for the fake upstream's replies: Anthropic's JSON message, SSE event stream and errors.

This module owns the *wire format* of the fake Anthropic Messages API and the interpretation of reply
scripts (validation, matching against a request, usage accounting).  It performs no I/O and keeps no
state: counters (tool-use ids) are passed in as callables, the clock as an argument, so everything here
is deterministic and unit-testable.  ``app.py`` decides *when* bytes are written; this module decides
*which* bytes.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import orjson

__all__ = [
    "DEFAULT_TEXT",
    "DROP_MID_STREAM_AFTER_EVENTS",
    "ReplyScriptError",
    "build_content",
    "build_message",
    "build_sse_events",
    "compute_usage",
    "default_error_message",
    "default_error_type",
    "default_stop_reason",
    "encode_sse",
    "error_body",
    "has_tool_result",
    "last_user_text",
    "rate_limit_headers",
    "reply_matches",
    "split_chunks",
    "stream_error_event",
    "system_text",
    "validate_headers",
    "validate_reply",
]

DEFAULT_TEXT: Final = "Hello from the fake upstream."

# A mid-stream drop happens after message_start, ping, the first content_block_start and its first
# delta: the client has then seen a started message with partial content, the interesting failure case.
DROP_MID_STREAM_AFTER_EVENTS: Final = 4

_FIVE_HOURS: Final = 5 * 3600
_SEVEN_DAYS: Final = 7 * 24 * 3600

_REPLY_KEYS: Final = frozenset(
    {
        "match",
        "message_id",
        "content",
        "stop_reason",
        "usage",
        "headers",
        "delay_ms",
        "error",
        "stream_error_after_events",
        "drop",
        "repeat",
    }
)
_MATCH_STR_KEYS: Final = frozenset({"model_contains", "last_user_text_contains", "system_contains"})
_MATCH_BOOL_KEYS: Final = frozenset({"has_tool_result", "stream"})
_USAGE_KEYS: Final = frozenset(
    {"input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"}
)
_STOP_REASONS: Final = frozenset({"end_turn", "tool_use", "max_tokens", "stop_sequence", "pause_turn", "refusal"})
_DROP_MODES: Final = frozenset({"before_response", "mid_stream"})

_ERROR_TYPES_BY_STATUS: Final[Mapping[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "Invalid request"),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "This request would exceed your account's rate limit. Please try again later."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timeout"),
    529: ("overloaded_error", "Overloaded"),
}


class ReplyScriptError(ValueError):
    """A reply script (or control-API payload) is malformed; the message says which field and why."""


# --------------------------------------------------------------------------------------------------------
# Script validation
# --------------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    # bool is an int subclass; a script saying `"delay_ms": true` is a mistake, not 1 ms.
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_block(index: int, block: object) -> dict[str, Any]:
    where = f"content[{index}]"
    if not isinstance(block, Mapping):
        raise ReplyScriptError(f"{where}: must be an object")
    kind = block.get("type")
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise ReplyScriptError(f"{where}.text: must be a string")
    elif kind == "thinking":
        if not isinstance(block.get("thinking"), str):
            raise ReplyScriptError(f"{where}.thinking: must be a string")
        if "signature" in block and not isinstance(block["signature"], str):
            raise ReplyScriptError(f"{where}.signature: must be a string")
    elif kind == "tool_use":
        if not isinstance(block.get("name"), str):
            raise ReplyScriptError(f"{where}.name: must be a string")
        if "input" in block and not isinstance(block["input"], Mapping):
            raise ReplyScriptError(f"{where}.input: must be an object")
        if "id" in block and not isinstance(block["id"], str):
            raise ReplyScriptError(f"{where}.id: must be a string")
    else:
        raise ReplyScriptError(f"{where}.type: must be 'text', 'thinking' or 'tool_use', got {kind!r}")
    return dict(block)


def validate_reply(reply: object) -> dict[str, Any]:
    """Check a reply script and return a private copy of it (callers may mutate ``repeat``).

    Unknown keys are rejected so that a typo in a test's script fails loudly instead of being ignored.
    """
    if not isinstance(reply, Mapping):
        raise ReplyScriptError("reply: must be an object")
    unknown = set(reply) - _REPLY_KEYS
    if unknown:
        raise ReplyScriptError(f"reply: unknown field(s) {sorted(unknown)}")
    out: dict[str, Any] = dict(reply)

    match = reply.get("match")
    if match is not None:
        if not isinstance(match, Mapping):
            raise ReplyScriptError("match: must be an object")
        for key, value in match.items():
            if key in _MATCH_STR_KEYS:
                if not isinstance(value, str):
                    raise ReplyScriptError(f"match.{key}: must be a string")
            elif key in _MATCH_BOOL_KEYS:
                if not isinstance(value, bool):
                    raise ReplyScriptError(f"match.{key}: must be a boolean")
            else:
                raise ReplyScriptError(f"match: unknown condition {key!r}")
        out["match"] = dict(match)

    content = reply.get("content")
    if content is not None:
        if not isinstance(content, Sequence) or isinstance(content, str | bytes):
            raise ReplyScriptError("content: must be a list of blocks")
        out["content"] = [_validate_block(i, block) for i, block in enumerate(content)]

    stop_reason = reply.get("stop_reason")
    if stop_reason is not None and stop_reason not in _STOP_REASONS:
        raise ReplyScriptError(f"stop_reason: must be one of {sorted(_STOP_REASONS)}")

    usage = reply.get("usage")
    if usage is not None:
        if not isinstance(usage, Mapping):
            raise ReplyScriptError("usage: must be an object")
        for key, value in usage.items():
            if key not in _USAGE_KEYS:
                raise ReplyScriptError(f"usage: unknown field {key!r}")
            if not _is_int(value) or value < 0:
                raise ReplyScriptError(f"usage.{key}: must be a non-negative integer")
        out["usage"] = dict(usage)

    headers = reply.get("headers")
    if headers is not None:
        out["headers"] = _validate_headers(headers, "headers")

    for key in ("delay_ms", "stream_error_after_events"):
        value = reply.get(key)
        if value is not None and (not _is_int(value) or value < 0):
            raise ReplyScriptError(f"{key}: must be a non-negative integer")

    error = reply.get("error")
    if error is not None:
        if not isinstance(error, Mapping):
            raise ReplyScriptError("error: must be an object")
        status = error.get("status")
        if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
            raise ReplyScriptError("error.status: must be an integer HTTP error status (400-599)")
        for key in ("type", "message"):
            if key in error and not isinstance(error[key], str):
                raise ReplyScriptError(f"error.{key}: must be a string")
        retry_after = error.get("retry_after")
        if retry_after is not None and (
            not isinstance(retry_after, int | float) or isinstance(retry_after, bool) or retry_after < 0
        ):
            raise ReplyScriptError("error.retry_after: must be a non-negative number of seconds")
        out["error"] = dict(error)

    drop = reply.get("drop")
    if drop is not None:
        if drop not in _DROP_MODES:
            raise ReplyScriptError(f"drop: must be one of {sorted(_DROP_MODES)}")
        # The combinations have no single obvious meaning, so refuse them rather than guess.
        if error is not None or reply.get("stream_error_after_events") is not None:
            raise ReplyScriptError("drop: cannot be combined with error or stream_error_after_events")

    repeat = reply.get("repeat", 1)
    if not _is_int(repeat) or (repeat < 1 and repeat != -1):
        raise ReplyScriptError("repeat: must be a positive integer, or -1 for forever")
    out["repeat"] = repeat
    return out


def _validate_headers(headers: object, where: str) -> dict[str, str | None]:
    """Normalise header overrides: lower-case names, str values; ``None`` means 'omit this header'."""
    if not isinstance(headers, Mapping):
        raise ReplyScriptError(f"{where}: must be an object")
    out: dict[str, str | None] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise ReplyScriptError(f"{where}: header names must be non-empty strings")
        if value is None:
            out[name.lower()] = None
        elif isinstance(value, str):
            out[name.lower()] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name.lower()] = str(value)
        else:
            raise ReplyScriptError(f"{where}.{name}: must be a string, a number or null")
    return out


def validate_headers(headers: object) -> dict[str, str | None]:
    """Public form of the header-override validation, used for the global default-header overrides."""
    return _validate_headers(headers, "headers")


# --------------------------------------------------------------------------------------------------------
# Request inspection and matching
# --------------------------------------------------------------------------------------------------------


def _last_user_message(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return message
    return None


def _block_texts(blocks: Iterable[Any]) -> Iterable[str]:
    for block in blocks:
        if not isinstance(block, Mapping):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            yield block["text"]
        elif kind == "tool_result":
            inner = block.get("content")
            if isinstance(inner, str):
                yield inner
            elif isinstance(inner, list):
                yield from _block_texts(inner)


def last_user_text(body: Mapping[str, Any]) -> str:
    """Text of the last ``user`` message: string content, text blocks and tool_result text, newline-joined."""
    message = _last_user_message(body)
    if message is None:
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_block_texts(content))
    return ""


def has_tool_result(body: Mapping[str, Any]) -> bool:
    """True when the last ``user`` message carries a tool_result block."""
    message = _last_user_message(body)
    if message is None:
        return False
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(block, Mapping) and block.get("type") == "tool_result" for block in content
    )


def system_text(body: Mapping[str, Any]) -> str:
    """The system prompt as plain text (``system`` may be a string or a list of text blocks)."""
    system = body.get("system")
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n".join(_block_texts(system))
    return ""


def reply_matches(reply: Mapping[str, Any], body: Mapping[str, Any], stream: bool) -> bool:
    """Whether every ``match`` condition of a (validated) reply script holds for this request."""
    match = reply.get("match")
    if not match:
        return True
    model_contains = match.get("model_contains")
    if model_contains is not None and model_contains not in str(body.get("model", "")):
        return False
    text_contains = match.get("last_user_text_contains")
    if text_contains is not None and text_contains not in last_user_text(body):
        return False
    system_contains = match.get("system_contains")
    if system_contains is not None and system_contains not in system_text(body):
        return False
    want_tool_result = match.get("has_tool_result")
    if want_tool_result is not None and want_tool_result != has_tool_result(body):
        return False
    want_stream = match.get("stream")
    return want_stream is None or want_stream == stream


# --------------------------------------------------------------------------------------------------------
# Message building
# --------------------------------------------------------------------------------------------------------


def _fake_signature(thinking: str) -> str:
    # Real signatures are opaque base64 blobs; derive one from the text so replays are byte-identical.
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode("ascii")


def build_content(
    script_content: Sequence[Mapping[str, Any]] | None, next_tool_use_id: Callable[[], str]
) -> list[dict[str, Any]]:
    """Turn a script's content blocks into Anthropic response blocks (ids and signatures filled in)."""
    if script_content is None:
        return [{"type": "text", "text": DEFAULT_TEXT}]
    blocks: list[dict[str, Any]] = []
    for block in script_content:
        kind = block["type"]
        if kind == "text":
            blocks.append({"type": "text", "text": block["text"]})
        elif kind == "thinking":
            thinking = block["thinking"]
            signature = block.get("signature") or _fake_signature(thinking)
            blocks.append({"type": "thinking", "thinking": thinking, "signature": signature})
        else:
            blocks.append(
                {
                    "type": "tool_use",
                    "id": block.get("id") or next_tool_use_id(),
                    "name": block["name"],
                    "input": dict(block.get("input") or {}),
                }
            )
    return blocks


def default_stop_reason(content: Sequence[Mapping[str, Any]]) -> str:
    return "tool_use" if any(block.get("type") == "tool_use" for block in content) else "end_turn"


def _output_token_estimate(content: Sequence[Mapping[str, Any]]) -> int:
    tokens = 0
    for block in content:
        kind = block.get("type")
        if kind == "text":
            tokens += len(block["text"].split())
        elif kind == "thinking":
            tokens += len(block["thinking"].split())
        elif kind == "tool_use":
            # Tool input JSON has no spaces to count; roughly four bytes per token instead.
            tokens += max(1, len(orjson.dumps(block["input"])) // 4)
    return max(1, tokens)


def compute_usage(
    script_usage: Mapping[str, int] | None, request_bytes: int, content: Sequence[Mapping[str, Any]]
) -> dict[str, int]:
    """Usage block: scripted values win, otherwise estimates from the request size and the output words."""
    script_usage = script_usage or {}
    return {
        "input_tokens": script_usage.get("input_tokens", max(1, request_bytes // 4)),
        "output_tokens": script_usage.get("output_tokens", _output_token_estimate(content)),
        "cache_creation_input_tokens": script_usage.get("cache_creation_input_tokens", 0),
        "cache_read_input_tokens": script_usage.get("cache_read_input_tokens", 0),
    }


def build_message(
    *,
    message_id: str,
    model: str,
    content: list[dict[str, Any]],
    stop_reason: str,
    usage: dict[str, int],
) -> dict[str, Any]:
    """The non-streaming ``/v1/messages`` response body."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }


# --------------------------------------------------------------------------------------------------------
# SSE
# --------------------------------------------------------------------------------------------------------


def encode_sse(event: str, data: Mapping[str, Any]) -> bytes:
    """One SSE event exactly as Anthropic frames it: ``event: <type>\\ndata: <json>\\n\\n``."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def split_chunks(text: str) -> list[str]:
    """Split text into delta pieces whose concatenation is exactly ``text``.

    Short strings become three pieces (enough for clients to exercise delta accumulation); long ones
    about 200 characters each, capped at 64 pieces so that huge benchmark replies stay cheap.
    """
    if len(text) <= 1:
        return [text]
    parts = min(64, max(3, len(text) // 200))
    size = math.ceil(len(text) / parts)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _block_events(index: int, block: Mapping[str, Any]) -> list[bytes]:
    kind = block["type"]
    events: list[bytes] = []
    if kind == "text":
        start: dict[str, Any] = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in split_chunks(block["text"])]
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": piece} for piece in split_chunks(block["thinking"])]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    else:
        start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        partial = orjson.dumps(block["input"]).decode()
        deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in split_chunks(partial)]
    events.append(
        encode_sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})
    )
    events.extend(
        encode_sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        for delta in deltas
    )
    events.append(encode_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def build_sse_events(message: Mapping[str, Any]) -> list[bytes]:
    """The full SSE event sequence for a message built by :func:`build_message`, one bytes item per event."""
    usage = message["usage"]
    start_message = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": usage["input_tokens"],
            "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
            "cache_read_input_tokens": usage["cache_read_input_tokens"],
            "output_tokens": 1,
        },
    }
    events = [
        encode_sse("message_start", {"type": "message_start", "message": start_message}),
        encode_sse("ping", {"type": "ping"}),
    ]
    for index, block in enumerate(message["content"]):
        events.extend(_block_events(index, block))
    events.append(
        encode_sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
    )
    events.append(encode_sse("message_stop", {"type": "message_stop"}))
    return events


def stream_error_event() -> bytes:
    """The in-stream error Anthropic sends when it becomes overloaded after a 200 response has started."""
    return encode_sse("error", error_body("overloaded_error", "Overloaded"))


# --------------------------------------------------------------------------------------------------------
# Errors and headers
# --------------------------------------------------------------------------------------------------------


def default_error_type(status: int) -> str:
    known = _ERROR_TYPES_BY_STATUS.get(status)
    if known is not None:
        return known[0]
    return "api_error" if status >= 500 else "invalid_request_error"


def default_error_message(status: int) -> str:
    known = _ERROR_TYPES_BY_STATUS.get(status)
    return known[1] if known is not None else f"Error {status}"


def error_body(error_type: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    """Anthropic's error envelope; ``request_id`` is included as the real API does in error bodies."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type, "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def rate_limit_headers(now: float) -> dict[str, str]:
    """The unified rate-limit headers Anthropic sends to subscription (OAuth) accounts.

    Reset times are aligned to fixed 5-hour / 7-day boundaries so that every response within a window
    carries the same value, like the real windows do.
    """
    five_hour_reset = str((int(now) // _FIVE_HOURS + 1) * _FIVE_HOURS)
    seven_day_reset = str((int(now) // _SEVEN_DAYS + 1) * _SEVEN_DAYS)
    return {
        "anthropic-ratelimit-unified-status": "allowed",
        "anthropic-ratelimit-unified-5h-status": "allowed",
        "anthropic-ratelimit-unified-5h-utilization": "0.42",
        "anthropic-ratelimit-unified-5h-reset": five_hour_reset,
        "anthropic-ratelimit-unified-7d-status": "allowed",
        "anthropic-ratelimit-unified-7d-utilization": "0.18",
        "anthropic-ratelimit-unified-7d-reset": seven_day_reset,
        "anthropic-ratelimit-unified-representative-claim": "five_hour",
        "anthropic-ratelimit-unified-fallback-percentage": "0.5",
        "anthropic-ratelimit-unified-reset": five_hour_reset,
    }
