"""Linking's memory of normalised messages and system prompts gives exactly the hashes computing them again gives."""

from __future__ import annotations

import copy
from typing import Any

import orjson

from prompttrain.conversation import hashing
from prompttrain.conversation.hashing import SeenBefore
from prompttrain.conversation.linking import facts_of
from prompttrain.storage.content import split_body
from prompttrain.storage.records import addresses_of
from tests.helpers import claude_code_exchanges


def session_bodies() -> list[dict[str, Any]]:
    """Claude Code 2.1.197's own requests: sub-agent, --continue, --resume and /compact."""
    return [exchange["body"] for exchange in claude_code_exchanges()]


def facts_with_addresses(body: dict[str, Any]) -> Any:
    raw = orjson.dumps(body)
    parsed = orjson.loads(raw)
    split = split_body(raw, parsed)
    assert split is not None
    return facts_of(parsed, None, addresses_of(parsed, split))


def test_every_request_of_a_real_session_hashes_the_same_with_and_without_the_memory(monkeypatch: Any) -> None:
    monkeypatch.setattr(hashing, "SEEN_BEFORE", fresh := SeenBefore())
    monkeypatch.setattr("prompttrain.conversation.linking.SEEN_BEFORE", fresh)
    bodies = session_bodies()
    for _ in range(2):  # the second pass finds every message and system prompt in memory
        for body in bodies:
            assert facts_with_addresses(copy.deepcopy(body)) == facts_of(copy.deepcopy(body), None)
    assert fresh._lines and fresh._systems


def test_a_system_prompt_differing_only_in_its_billing_line_hits_memory_and_any_other_change_does_not(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(hashing, "SEEN_BEFORE", fresh := SeenBefore())
    monkeypatch.setattr("prompttrain.conversation.linking.SEEN_BEFORE", fresh)
    body = next(body for body in session_bodies() if isinstance(body.get("system"), list) and len(body["system"]) > 1)
    first = facts_with_addresses(copy.deepcopy(body))
    rebilled = copy.deepcopy(body)
    rebilled["system"][0] = {"type": "text", "text": "x-anthropic-billing-header: cc_version=9.9.9; cch=00000;"}
    assert facts_with_addresses(rebilled).system_hash == first.system_hash == facts_of(rebilled, None).system_hash
    assert len(fresh._systems) == 1
    changed = copy.deepcopy(body)
    # Claude Code's prompt hashes as its opening marker alone: change the opening.
    changed["system"][1] = {**changed["system"][1], "text": "You are a reviewer of pull requests.\nBe brief."}
    assert facts_with_addresses(changed).system_hash == facts_of(changed, None).system_hash != first.system_hash
    assert len(fresh._systems) == 2


def test_memory_is_bounded_in_bytes() -> None:
    seen = SeenBefore(max_bytes=10_000)
    for n in range(100):
        seen.remember_line(n.to_bytes(32, "big"), b"x" * 500)
    assert seen._bytes <= 10_000 and len(seen._lines) < 100
    assert seen.line((99).to_bytes(32, "big")) == b"x" * 500 and seen.line((0).to_bytes(32, "big")) is None
