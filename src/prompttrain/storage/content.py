"""Content-addressed request bodies: every message, the system prompt and the tool list are stored once.

Claude Code resends the whole conversation every turn (about 200 KB a request, up to megabytes), so storing each
body whole grows quadratically with a conversation. Instead a body is split into:

- blobs: each message, each block of `system` and each tool, keyed by the SHA-256 of their canonical JSON (sorted
  keys), stored once however many requests carry them (per block, because Claude Code's first system block, a
  billing header, changes between sessions while the long prompt blocks and tool definitions do not);
- a template: the body with those keys kept in place (what is unique to the request): `messages` and a list
  `system`/`tools` become `[]`, a string `system` becomes null;
- references: the blob digests, in order. A long message list is referenced through chunks: every full run of
  16 message digests is itself a blob (its digests in hex), so a request stores at most a few chunk digests plus a
  tail of under 16 message digests, instead of 32 bytes per message of the whole history (which grows
  quadratically over a conversation too).

`join_body` rebuilds the exact bytes: `split_body` returns None when the body would not come back byte for byte
(unusual spacing or number formatting), in which case the raw body is stored.
Pure functions: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

DIGEST_SIZE = 32
CHUNK_DIGESTS = 16
ADDRESSED_KEYS = ("system", "tools")


@dataclass(frozen=True)
class SplitBody:
    template: str
    system_refs: bytes | None  # concatenated 32-byte digests (one for a string system prompt)
    tools_refs: bytes | None
    message_chunks: bytes  # digests of chunk blobs, each listing CHUNK_DIGESTS message digests
    message_refs: bytes  # the messages after the last full chunk
    blobs: Mapping[bytes, str]  # digest -> the JSON of the value as sent (or a chunk's hex digests)
    message_digests: bytes = b""  # every message's digest, in order (chunked ones included; not stored)


def chunk_digest(digests: bytes) -> bytes:
    # A separate namespace: a chunk can never collide with the canonical JSON of a message.
    return hashlib.sha256(b"prompttrain-chunk:" + digests).digest()


def digest_of(value: Any) -> bytes:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).digest()


def split_body(raw: bytes, parsed: Any = None, known: Container[bytes] = frozenset()) -> SplitBody | None:
    """Split a Messages request body, or None if it is not a JSON object that round-trips exactly.

    `parsed` saves parsing `raw` again when the caller already did; blobs whose digest is in `known` (already
    stored) are referenced without serialising their content again.
    """
    if parsed is None:
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
    body = parsed
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return None
    # Every piece below is serialised by orjson from this same parse, so if orjson reproduces the whole body
    # byte for byte, `join_body` (which reassembles the same pieces) does too.
    if orjson.dumps(body) != raw:
        return None
    return split_parsed(body, known)


def split_parsed(
    body: dict[str, Any],
    known: Container[bytes] = frozenset(),
    message_refs: bytes | None = None,
    message_text: Callable[[int], str] | None = None,
    kept_refs: Mapping[str, bytes | None] | None = None,
    template: str | None = None,
) -> SplitBody:
    """Split a parsed body known to round-trip (what `split_body` checks), reusing what the caller already has.

    `message_refs` are the messages' digests when known, with `message_text(index)` giving a message's JSON as sent
    (asked only for digests not in `known`). `kept_refs` are the references of `system`/`tools` when known, and
    `template` the template when known (from an earlier body with the same values).
    """
    blobs: dict[bytes, str] = {}

    def address(value: Any) -> bytes:
        digest = digest_of(value)
        if digest not in known and digest not in blobs:
            blobs[digest] = orjson.dumps(value).decode("utf-8")
        return digest

    messages = body["messages"]
    if message_refs is None or message_text is None:
        message_refs = b"".join(address(item) for item in messages)
    else:
        for index in range(len(messages)):
            digest = message_refs[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
            if digest not in known and digest not in blobs:
                blobs[digest] = message_text(index)
    kept_refs = kept_refs or {}
    shape = dict(body)
    shape["messages"] = []
    refs: dict[str, bytes | None] = {}
    for key in ADDRESSED_KEYS:
        value = body.get(key)
        if key not in body:
            refs[key] = None
            continue
        values = value if isinstance(value, list) else [value]
        shape[key] = [] if isinstance(value, list) else None
        if key in kept_refs:
            refs[key] = kept_refs[key]
            for item, digest in zip(values, digests(kept_refs[key]), strict=False):
                if digest not in known and digest not in blobs:
                    blobs[digest] = orjson.dumps(item).decode("utf-8")
        else:
            refs[key] = b"".join(address(item) for item in values)
    if template is None:
        template = orjson.dumps(shape).decode("utf-8")
    return assemble(template, refs["system"], refs["tools"], message_refs, blobs, known)


def assemble(
    template: str,
    system_refs: bytes | None,
    tools_refs: bytes | None,
    message_refs: bytes,
    blobs: dict[bytes, str],
    known: Container[bytes] = frozenset(),
) -> SplitBody:
    """The split body of addressed pieces: the message digests are grouped into chunks (new chunks join `blobs`)."""
    full = len(message_refs) // (DIGEST_SIZE * CHUNK_DIGESTS) * DIGEST_SIZE * CHUNK_DIGESTS
    chunks = []
    for start in range(0, full, DIGEST_SIZE * CHUNK_DIGESTS):
        run = message_refs[start : start + DIGEST_SIZE * CHUNK_DIGESTS]
        digest = chunk_digest(run)
        if digest not in known and digest not in blobs:
            blobs[digest] = run.hex()
        chunks.append(digest)
    return SplitBody(
        template=template,
        system_refs=system_refs,
        tools_refs=tools_refs,
        message_chunks=b"".join(chunks),
        message_refs=message_refs[full:],
        blobs=blobs,
        message_digests=message_refs,
    )


def digests(refs: bytes | None) -> list[bytes]:
    refs = refs or b""
    return [refs[i : i + DIGEST_SIZE] for i in range(0, len(refs), DIGEST_SIZE)]


def expand_chunks(message_chunks: bytes | None, blobs: Mapping[bytes, str]) -> bytes:
    """The message digests listed by chunk blobs, in order (KeyError if a chunk blob is missing)."""
    return b"".join(bytes.fromhex(blobs[digest]) for digest in digests(message_chunks))


def join_body(
    template: str,
    system_refs: bytes | None,
    tools_refs: bytes | None,
    message_refs: bytes,
    blobs: Mapping[bytes, str],
    message_chunks: bytes | None = None,
) -> bytes:
    """Rebuild the body bytes from a template, its references and the blobs (KeyError if a blob is missing)."""
    body = orjson.loads(template)
    all_messages = expand_chunks(message_chunks, blobs) + (message_refs or b"")
    for key, refs in (("messages", all_messages), ("system", system_refs), ("tools", tools_refs)):
        if key not in body or refs is None:
            continue
        values = [orjson.loads(blobs[digest]) for digest in digests(refs)]
        body[key] = values if isinstance(body[key], list) else values[0]
    return orjson.dumps(body)


def referenced(
    system_refs: bytes | None, tools_refs: bytes | None, message_refs: bytes | None, message_chunks: bytes | None = None
) -> set[bytes]:
    """The digests a payload row names directly (chunk digests included, not the digests inside the chunks)."""
    return {*digests(message_refs), *digests(system_refs), *digests(tools_refs), *digests(message_chunks)}
