"""Content-addressed request bodies: split, reference, rebuild byte for byte."""

from __future__ import annotations

import orjson

from prompttrain.storage.content import (
    CHUNK_DIGESTS,
    DIGEST_SIZE,
    digest_of,
    digests,
    expand_chunks,
    join_body,
    referenced,
    split_body,
)


def body(turns: int, **extra: object) -> bytes:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} é"} for i in range(turns)]
    return orjson.dumps({"model": "m", "system": [{"type": "text", "text": "s"}], "messages": messages, **extra})


def test_split_and_join_round_trip_with_chunks() -> None:
    raw = body(150, tools=[{"name": "Bash"}], stream=True)
    split = split_body(raw)
    assert split is not None
    assert len(digests(split.message_chunks)) == 150 // CHUNK_DIGESTS
    assert len(digests(split.message_refs)) == 150 % CHUNK_DIGESTS
    assert (
        join_body(
            split.template, split.system_refs, split.tools_refs, split.message_refs, split.blobs, split.message_chunks
        )
        == raw
    )
    assert set(split.blobs) >= referenced(split.system_refs, split.tools_refs, split.message_refs, split.message_chunks)
    assert len(expand_chunks(split.message_chunks, split.blobs)) == 150 // CHUNK_DIGESTS * CHUNK_DIGESTS * DIGEST_SIZE


def test_the_next_turn_reuses_every_earlier_blob_and_chunk() -> None:
    first = split_body(body(8 * CHUNK_DIGESTS + 2))
    second = split_body(body(8 * CHUNK_DIGESTS + 4), known=set(first.blobs) if first else set())
    assert first is not None and second is not None
    assert second.message_chunks == first.message_chunks
    assert len(second.blobs) == 1 + 1  # two new messages (the system block is known)
    assert digest_of({"role": "user", "content": f"message {8 * CHUNK_DIGESTS + 2} é"}) in second.blobs


def test_identical_content_with_other_key_order_has_one_digest() -> None:
    assert digest_of({"a": 1, "b": [1, {"c": 2, "d": 3}]}) == digest_of({"b": [1, {"d": 3, "c": 2}], "a": 1})


def test_bodies_that_would_not_round_trip_are_refused() -> None:
    assert split_body(b'{"model": "m", "messages": []}') is None  # spaces
    assert split_body(b'{"model":"m","messages":[],"temperature":1.0e0}') is None
    assert split_body(b"not json") is None
    assert split_body(b'{"model":"m"}') is None  # no messages list
    assert split_body(b'{"model":"m","system":"plain","messages":[]}') is not None
