"""The last request bodies of each session, so a resent conversation is parsed and hashed only where it changed.

Claude Code resends the whole conversation every turn: a 200 KB body usually differs from the session's previous
one only in its last few messages (the newest turn, and the `cache_control` marker that moves to it). The writer
used to parse every body whole and hash every message again (a third of a recording process's time). For each
session this keeps the raw bytes of its last bodies with where each message ends, and for a new body:

1. compares the bytes before `"messages":[` and each remembered message at the same offset (a few `memcmp`s);
2. parses only what follows the last equal message, up to the key that followed `messages` last time
   (`],"system":`), as a JSON list; these are the new messages;
3. compares the rest of the body (system prompt, tools, settings) with the remembered rest, and parses it only
   when it changed.

The result is exactly what parsing the whole body gives (`split_body` and `orjson.loads`): the equal parts are the
same bytes at the same place after the same prefix, so they are the same values, and every part parsed here must
serialise back to its own bytes, as `split_body` requires of the whole. Anything unexpected (a different shape, a
parse error, no equal message) falls back to the whole parse.

Used by one converter at a time (the writer's); bounded by the bytes of the bodies it keeps.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import orjson

from prompttrain.storage.content import DIGEST_SIZE, SplitBody, digest_of, digests, split_body, split_parsed
from prompttrain.storage.records import ExchangeRecord

MEMORY_BYTES = 24 << 20  # of raw JSON; with their parsed values about four times as much in memory
BODIES_PER_SESSION = 4  # the main thread and the sub-agents a session runs at once
MESSAGES_OPEN = b'"messages":['


@dataclass(frozen=True)
class Layout:
    """A body as remembered: its bytes, where its parts lie, and what parsing and splitting it gave."""

    raw: bytes
    head_keys: tuple[str, ...]  # the keys before `messages`
    messages_start: int  # just past `"messages":[`
    message_ends: tuple[int, ...]  # just past each message
    messages_end: int  # the `]` that closes `messages`; the rest of the body follows
    rest_starts: tuple[int, ...]  # in the rest, where each key after `messages` starts (its `,`), then the `}`
    body: dict[str, Any]
    split: SplitBody

    @property
    def rest(self) -> bytes:
        return self.raw[self.messages_end :]

    @property
    def rest_items(self) -> list[tuple[str, Any]]:
        return list(self.body.items())[len(self.head_keys) + 1 :]

    @property
    def next_key(self) -> bytes:
        """What follows the messages up to the next key's colon (`],"system":`), or `]}`."""
        rest = self.rest
        if len(self.rest_starts) == 1:
            return rest
        return rest[: rest.index(b":", self.rest_starts[0] + 1, self.rest_starts[1]) + 1]


def layout_of(raw: bytes, body: dict[str, Any], split: SplitBody) -> Layout | None:
    """Where the parts of a body that round-trips lie (None for a body whose shape this cannot follow)."""
    keys = tuple(body)
    head_keys = keys[: keys.index("messages")]
    head = orjson.dumps({key: body[key] for key in head_keys})[:-1]
    opening = head + (b"," if head_keys else b"") + MESSAGES_OPEN
    if not raw.startswith(opening):
        return None
    ends = _ends(len(opening), [orjson.dumps(message) for message in body["messages"]])
    messages_end = ends[-1] if ends else len(opening)
    rest_starts = _rest_starts(list(body.items())[len(head_keys) + 1 :])
    if len(raw) - messages_end != rest_starts[-1] + 1:
        return None
    return Layout(raw, head_keys, len(opening), tuple(ends), messages_end, rest_starts, body, split)


def _ends(start: int, texts: list[bytes]) -> list[int]:
    """Where each of `texts` ends when they are written from `start` with a comma between them."""
    ends = []
    position = start
    for text in texts:
        position += len(text)
        ends.append(position)
        position += 1
    return ends


def _rest_starts(items: list[tuple[str, Any]], start: int = 1) -> tuple[int, ...]:
    """Where each `,"key":value` starts when written from `start`, then where the closing `}` is."""
    starts = []
    position = start
    for key, value in items:
        starts.append(position)
        position += 2 + len(orjson.dumps(key)) + len(orjson.dumps(value))
    starts.append(position)
    return tuple(starts)


def extend(previous: Layout, raw: bytes, known: Container[bytes]) -> Layout | None:
    """The layout of `raw` worked out from an earlier body of the same session, or None if it cannot be."""
    old = previous.raw
    start = previous.messages_start
    if raw[:start] != old[:start]:
        return None
    matched = 0
    for end in previous.message_ends:
        if raw[start:end] != old[start:end]:
            break
        matched += 1
        start = end + 1
        if raw[end : end + 1] != b",":
            break
    if matched == 0:
        return None
    last_end = previous.message_ends[matched - 1]
    new = _read_new_messages(previous, raw, last_end)
    if new is None:
        return None
    new_messages, new_texts, messages_end = new
    rest = _read_rest(previous, raw[messages_end:])
    if rest is None:
        return None
    rest_items, kept_refs, rest_starts = rest

    body: dict[str, Any] = {key: previous.body[key] for key in previous.head_keys}
    body["messages"] = previous.body["messages"][:matched] + new_messages
    body.update(rest_items)
    ends = [*previous.message_ends[:matched], *_ends(last_end + 1, new_texts)]
    starts = [previous.messages_start, *(end + 1 for end in ends[:-1])]

    def message_text(index: int) -> str:
        return raw[starts[index] : ends[index]].decode("utf-8")

    message_refs = previous.split.message_digests[: matched * DIGEST_SIZE] + b"".join(
        digest_of(message) for message in new_messages
    )
    template = previous.split.template if rest_starts is previous.rest_starts else None
    split = split_parsed(body, known, message_refs, message_text, kept_refs, template)
    return Layout(raw, previous.head_keys, previous.messages_start, tuple(ends), messages_end, rest_starts, body, split)


def _read_new_messages(previous: Layout, raw: bytes, last_end: int) -> tuple[list[Any], list[bytes], int] | None:
    """The messages after the last one equal to `previous`'s, their JSON, and where `messages` closes."""
    separator = raw[last_end : last_end + 1]
    if separator == b"]":
        return [], [], last_end
    if separator != b",":
        return None
    next_key = previous.next_key
    if next_key == b"]}":
        messages_end = len(raw) - 2 if raw.endswith(next_key) else -1
    else:
        # Cannot occur inside a string (its quote would be escaped); inside a new message's value, the cut would
        # leave that message unclosed and the parse below fails.
        messages_end = raw.find(next_key, last_end + 1)
    if messages_end < 0:
        return None
    middle = raw[last_end + 1 : messages_end]
    try:
        parsed = orjson.loads(b"[" + middle + b"]")
    except orjson.JSONDecodeError:
        return None
    texts = [orjson.dumps(message) for message in parsed] if isinstance(parsed, list) else []
    if not texts or b",".join(texts) != middle:
        return None
    return parsed, texts, messages_end


def _read_rest(
    previous: Layout, rest: bytes
) -> tuple[list[tuple[str, Any]], dict[str, bytes | None], tuple[int, ...]] | None:
    """The keys after `messages`, the references kept from `previous`, and where the keys start.

    The keys that end the body as they ended `previous` are taken from it; only those before them are parsed
    (typically the system prompt, whose first block Claude Code varies, but not the tools after it).
    """
    old = previous.rest
    old_items = previous.rest_items
    all_kept = {"system": previous.split.system_refs, "tools": previous.split.tools_refs}
    if rest == old:
        return old_items, all_kept, previous.rest_starts
    if not rest.startswith(b"]"):
        return None
    index = next((i for i, start in enumerate(previous.rest_starts) if rest.endswith(old[start:])), None)
    if index is None:
        return None
    start = previous.rest_starts[index]
    changed = rest[1 : len(rest) - len(old) + start]
    parsed: dict[str, Any] = {}
    if changed:
        if not changed.startswith(b","):
            return None
        text = b"{" + changed[1:] + b"}"
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(parsed, dict) or orjson.dumps(parsed) != text:
            return None
    kept_items = old_items[index:]
    keys = [*parsed, *(key for key, _ in kept_items)]
    if len(set(keys)) != len(keys) or "messages" in keys or any(key in previous.head_keys for key in keys):
        return None
    changed_starts = _rest_starts(list(parsed.items()))
    shift = changed_starts[-1] - start
    rest_starts = (*changed_starts[:-1], *(position + shift for position in previous.rest_starts[index:]))
    kept_keys = {key for key, _ in kept_items}
    kept_refs = {key: refs for key, refs in all_kept.items() if key in kept_keys}
    for key, refs in all_kept.items():
        if key in parsed:
            kept_refs[key] = _refs_reusing(parsed[key], previous.body.get(key), refs)
    return [*parsed.items(), *kept_items], kept_refs, rest_starts


def _refs_reusing(value: Any, old_value: Any, old_refs: bytes | None) -> bytes:
    """The digests of a changed `system`/`tools`, reusing those of the items equal to the earlier body's (Claude
    Code's billing block changes while the long prompt blocks after it do not)."""
    values = value if isinstance(value, list) else [value]
    old_values = old_value if isinstance(old_value, list) and isinstance(value, list) else []
    old_digests = digests(old_refs) if old_values else []
    return b"".join(
        old_digests[index] if index < len(old_values) and item == old_values[index] else digest_of(item)
        for index, item in enumerate(values)
    )


class RecentBodies:
    """Per session, the layouts of its last few bodies; least recently used sessions go first past `max_bytes`."""

    def __init__(self, max_bytes: int = MEMORY_BYTES) -> None:
        self.max_bytes = max_bytes
        self._sessions: OrderedDict[str, list[Layout]] = OrderedDict()
        self._bytes = 0
        self.reused = 0  # bodies worked out from an earlier one
        self.parsed = 0  # bodies parsed whole

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def read(self, record: ExchangeRecord, known: Container[bytes] = frozenset()) -> SplitBody | None:
        """Parse the record's request body (into `record.parsed_body`) and split it, as `split_body` would."""
        raw = record.request_body
        if not raw or not record.is_messages_request:
            body = record.request_json()
            return split_body(raw, body, known) if raw and body is not None else None
        key = record.session_id or record.train_id
        layouts = self._sessions.get(key, [])
        for index, previous in enumerate(layouts):
            layout = extend(previous, raw, known)
            if layout is not None:
                self.reused += 1
                self._replace(key, index, layout)
                record.parsed_body = layout.body
                return layout.split
        self.parsed += 1
        body = record.request_json()
        split = split_body(raw, body, known) if body is not None else None
        if split is not None and isinstance(body, dict):
            layout = layout_of(raw, body, split)
            if layout is not None:
                self._replace(key, None, layout)
        return split

    def _replace(self, key: str, index: int | None, layout: Layout) -> None:
        layouts = self._sessions.pop(key, [])
        if index is not None:
            self._bytes -= len(layouts.pop(index).raw)
        layouts.insert(0, layout)
        self._bytes += len(layout.raw)
        while len(layouts) > BODIES_PER_SESSION:
            self._bytes -= len(layouts.pop().raw)
        self._sessions[key] = layouts
        while self._bytes > self.max_bytes and self._sessions:
            _, dropped = self._sessions.popitem(last=False)
            self._bytes -= sum(len(item.raw) for item in dropped)
