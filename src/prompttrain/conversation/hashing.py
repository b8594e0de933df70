"""Message and system-prompt hashes, with the normalisation the reference defines (its §4.1 and §4.2).

A request's `current_message_hash` covers its user/assistant messages; its `parent_message_hash` covers the same
list without the last exchange, so that a request's parent hash equals the previous turn's current hash. The
normalisation makes the hash stable across what Claude Code changes between turns without changing the
conversation: system reminders, `cache_control`, string vs single-text-block content, duplicated tool blocks.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

REMINDER = re.compile(r"\s*<system-reminder>[\s\S]*?</system-reminder>", re.IGNORECASE)
# A plain scan for the tag first: most texts have no reminder, and REMINDER's leading \s* makes re.sub try a match
# at every position (three quarters of the writer's CPU on 200 KB bodies before this check).
REMINDER_TAG = re.compile(r"<system-reminder>", re.IGNORECASE)
TRANSIENT = re.compile(r"<transient_context>[\s\S]*?</transient_context>", re.IGNORECASE)
BILLING_LINE = re.compile(r"^[ \t]*x-anthropic-billing-header:.*$", re.IGNORECASE | re.MULTILINE)
STATUS_BLOCK = re.compile(r"^Status:.*(?:\n(?!\n).*)*", re.MULTILINE)
RECENT_COMMITS_BLOCK = re.compile(r"^Recent commits:.*(?:\n(?!\n).*)*", re.MULTILINE)
BRANCH_LINES = re.compile(r"^(?:Current branch:|Main branch).*$", re.MULTILINE)
EXTRA_NEWLINES = re.compile(r"\n{3,}")
STABLE_MARKERS = (
    "You are an interactive CLI tool that helps users with software engineering tasks",
    "You are Claude Code, Anthropic's official CLI for Claude",
    "You are an agent for Claude Code, Anthropic's official CLI for Claude",
)

Message = dict[str, Any]


def strip_reminders(text: str) -> str:
    if REMINDER_TAG.search(text) is None:
        return text
    return REMINDER.sub("", text)


def js_json(value: Any) -> str:
    """`JSON.stringify` as Claude Code's own hashing saw it: compact, insertion order, integral floats as ints."""
    return orjson.dumps(_integral_floats(value)).decode("utf-8")


def _integral_floats(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_integral_floats(item) for item in value]
    if isinstance(value, dict):
        return {key: _integral_floats(item) for key, item in value.items()}
    return value


def _clean_text(text: str) -> str:
    return strip_reminders(text).strip().replace("\r\n", "\n")


def normalise_content(content: Any) -> str:
    if isinstance(content, str):
        text = _clean_text(content)
        return f"[0]text:{text}" if text else ""
    if not isinstance(content, list):
        return ""
    items = [
        item
        for item in content
        if not (isinstance(item, dict) and item.get("type") == "text" and not _clean_text(str(item.get("text", ""))))
    ]
    return "\n".join(f"[{index}]{_normalise_item(item)}" for index, item in enumerate(items))


def _normalise_item(item: Any) -> str:
    if not isinstance(item, dict):
        return "unknown:unknown"
    kind = item.get("type")
    if kind == "text":
        return f"text:{_clean_text(str(item.get('text', '')))}"
    if kind == "image":
        source = item.get("source")
        if isinstance(source, dict) and isinstance(source.get("data"), str):
            digest = hashlib.sha256(source["data"].encode("utf-8")).hexdigest()
            return f"image:{source.get('media_type')}:{digest}"
        return "image:no-source"
    if kind == "tool_use":
        serialised = js_json(item["input"]) if "input" in item else "undefined"
        return f"tool_use:{item.get('name')}:{item.get('id')}:{serialised}"
    if kind == "tool_result":
        result = item.get("content")
        if isinstance(result, str):
            text = strip_reminders(result)
        elif isinstance(result, list):
            text = js_json(result)
        else:
            text = ""
        return f"tool_result:{item.get('tool_use_id')}:{text}"
    return f"{kind}:unknown"


def conversation_messages(messages: Any) -> list[Message]:
    """The user and assistant messages (Claude Code also injects `role: system` messages, ignored here)."""
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict) and m.get("role") in ("user", "assistant")]


def deduplicate(messages: Sequence[Message]) -> list[Message]:
    """Drop messages that repeat a tool_use or tool_result already seen (a Claude Code resend quirk)."""
    seen_uses: set[Any] = set()
    seen_results: set[Any] = set()
    kept = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            kept.append(message)
            continue
        duplicate = False
        for item in content:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "tool_use":
                duplicate |= item.get("id") in seen_uses
                seen_uses.add(item.get("id"))
            elif item.get("type") == "tool_result":
                duplicate |= item.get("tool_use_id") in seen_results
                seen_results.add(item.get("tool_use_id"))
        if not duplicate:
            kept.append(message)
    return kept


class SeenBefore:
    """Normalised message lines and system hashes computed before, keyed by the storage's content digest of the
    value (`storage/content.py`, the SHA-256 of its canonical JSON): Claude Code resends the whole conversation
    every turn, so all but its newest messages were normalised on an earlier request. Equal digests mean equal
    values, so a hit is exactly what normalising again would give. Bounded in bytes, least recently used out."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, max_systems: int = 1024) -> None:
        self.max_bytes = max_bytes
        self.max_systems = max_systems
        self._lines: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._systems: OrderedDict[bytes, str | None] = OrderedDict()

    def line(self, digest: bytes) -> bytes | None:
        line = self._lines.get(digest)
        if line is not None:
            self._lines.move_to_end(digest)
        return line

    def remember_line(self, digest: bytes, line: bytes) -> None:
        if digest in self._lines or len(line) > self.max_bytes // 8:
            return
        self._lines[digest] = line
        self._bytes += len(line) + len(digest)
        while self._bytes > self.max_bytes:
            old_digest, old_line = self._lines.popitem(last=False)
            self._bytes -= len(old_line) + len(old_digest)

    def system_hash(self, refs: bytes, system: Any) -> str | None:
        key = _system_key(refs, system)
        if key in self._systems:
            self._systems.move_to_end(key)
            return self._systems[key]
        value = self._systems[key] = hash_system(system)
        if len(self._systems) > self.max_systems:
            self._systems.popitem(last=False)
        return value


def _system_key(refs: bytes, system: Any) -> bytes:
    """The system blocks' digests without those that hold nothing but the billing line, which Claude Code changes
    on every request and the system hash ignores (a block of one billing line leaves the same text whatever it
    says)."""
    if not isinstance(system, list) or len(refs) != len(system) * 32:
        return refs
    kept = (refs[index * 32 : index * 32 + 32] for index, block in enumerate(system) if not _billing_only(block))
    return b"".join(kept)


def _billing_only(block: Any) -> bool:
    text = block.get("text") if isinstance(block, dict) else None
    return isinstance(text, str) and len(text) < 1024 and "\n" not in text and BILLING_LINE.fullmatch(text) is not None


SEEN_BEFORE = SeenBefore()  # the writer's (one per process; the converter runs on one thread at a time)


@dataclass(frozen=True)
class Addresses:
    """The content digests of one request's messages (by object identity) and of its system blocks."""

    messages: Mapping[int, bytes]
    system: bytes | None


def hash_messages(messages: Sequence[Message]) -> str:
    digest = hashlib.sha256()
    for message in messages:
        digest.update(f"{message.get('role')}\n{normalise_content(message.get('content'))}\n".encode())
    return digest.hexdigest()


def system_text(system: Any) -> str | None:
    if system is None:
        return None
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n".join(str(item.get("text", "")) if isinstance(item, dict) else "" for item in system)
    return None


def stable_system_text(text: str) -> str:
    text = BILLING_LINE.sub("", text)
    trimmed = text.strip()
    for marker in STABLE_MARKERS:
        if trimmed.startswith(marker):
            return marker
    text = strip_reminders(TRANSIENT.sub("", text))
    cut = text.find("gitStatus:")
    if cut >= 0:
        text = text[:cut]
    text = STATUS_BLOCK.sub("", text)
    text = RECENT_COMMITS_BLOCK.sub("", text)
    text = BRANCH_LINES.sub("", text)
    return EXTRA_NEWLINES.sub("\n\n", text).strip()


def _line(message: Message, addresses: Addresses | None) -> bytes:
    address = addresses.messages.get(id(message)) if addresses is not None else None
    if address is not None and (known := SEEN_BEFORE.line(address)) is not None:
        return known
    line = f"{message.get('role')}\n{normalise_content(message.get('content'))}\n".encode()
    if address is not None:
        SEEN_BEFORE.remember_line(address, line)
    return line


def hash_system(system: Any) -> str | None:
    text = system_text(system)
    if text is None:
        return None
    stable = stable_system_text(text)
    return hashlib.sha256(stable.encode("utf-8")).hexdigest() if stable else None


@dataclass(frozen=True)
class MessageHashes:
    current: str | None  # None when the request has no user/assistant message
    parent: str | None  # the conversation without its last exchange; None for fewer than 3 messages
    grandparent: str | None  # without its last two exchanges; None for 4 messages or fewer
    message_count: int  # all messages, injected system ones included (as the reference counts them)
    conversation_length: int  # user/assistant messages


def message_hashes(messages: Any, addresses: Addresses | None = None) -> MessageHashes:
    conversation = conversation_messages(messages)
    count = len(messages) if isinstance(messages, list) else 0
    if not conversation:
        return MessageHashes(None, None, None, count, 0)
    deduplicated = deduplicate(conversation)
    # One pass: the running digest after n messages is the hash of the first n (parent: all but the last two,
    # grandparent: all but the last four), so each message is normalised once.
    digest = hashlib.sha256()
    prefixes: dict[int, str] = {}
    wanted = {len(deduplicated) - 4, len(deduplicated) - 2}
    for index, message in enumerate(deduplicated):
        if index in wanted:
            prefixes[index] = digest.copy().hexdigest()
        digest.update(_line(message, addresses))
    current = digest.hexdigest()
    if len(conversation) == 1:
        return MessageHashes(current, None, None, count, 1)
    parent = prefixes.get(len(deduplicated) - 2) if len(deduplicated) >= 3 else None
    grandparent = prefixes.get(len(deduplicated) - 4) if len(deduplicated) > 4 else None
    return MessageHashes(current, parent, grandparent, count, len(conversation))
