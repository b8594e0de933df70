"""A body worked out from the session's previous one is exactly what parsing and splitting it whole gives."""

from __future__ import annotations

import copy
import random
import time
import uuid
from collections.abc import Container
from datetime import UTC, datetime
from typing import Any

import orjson

from prompttrain.storage.content import SplitBody, split_body
from prompttrain.storage.recent_bodies import RecentBodies
from prompttrain.storage.records import ExchangeRecord
from tests.helpers import claude_code_exchanges


def exchange(raw: bytes, session: str = "session-1") -> ExchangeRecord:
    return ExchangeRecord(
        request_id=uuid.uuid4(),
        started_at=datetime.now(UTC),
        started=time.perf_counter(),
        method="POST",
        path="/v1/messages",
        train_id="train-a",
        request_body=raw,
        session_id=session,
    )


def whole(raw: bytes, known: Container[bytes] = frozenset()) -> tuple[Any, SplitBody | None]:
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(parsed, dict):
        return None, None
    return parsed, split_body(raw, parsed, known)


def read(memory: RecentBodies, raw: bytes, session: str = "session-1", known: Container[bytes] = frozenset()) -> Any:
    record = exchange(raw, session)
    split = memory.read(record, known)
    assert (record.parsed_body, split) == whole(raw, known)
    return split


def conversation(turns: int, *, billing: str = "cc_version=2.1.197.132") -> list[dict[str, Any]]:
    """Claude Code's shape: the conversation so far, the cache marker on the newest message, system, tools."""
    bodies = []
    messages: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": "Fix the bug, please."}]}]
    for turn in range(turns):
        marked = copy.deepcopy(messages)
        marked[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
        bodies.append(
            {
                "model": "claude-sonnet-4-5",
                "messages": marked,
                "system": [
                    {"type": "text", "text": f"x-anthropic-billing-header: {billing}; cc_entrypoint=cli;"},
                    {"type": "text", "text": "You are Claude Code. " * 200, "cache_control": {"type": "ephemeral"}},
                ],
                "tools": [{"name": f"Tool{n}", "input_schema": {"type": "object", "n": n}} for n in range(8)],
                "metadata": {"user_id": "user_abc"},
                "max_tokens": 32000,
                "stream": True,
            }
        )
        messages += [
            {"role": "assistant", "content": [{"type": "tool_use", "id": f"t{turn}", "name": "Bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{turn}", "content": "ok " * 50}]},
        ]
    return bodies


def test_the_captured_claude_code_session_reads_the_same_and_mostly_from_memory() -> None:
    memory = RecentBodies()
    exchanges = claude_code_exchanges()
    known: set[bytes] = set()
    for item in exchanges:
        split = read(memory, orjson.dumps(item["body"]), known=known)
        assert split is not None
        known.update(split.blobs)
    # Parsed whole: the first two requests of the main thread and of the sub-agent (the cache marker leaves the
    # only message of the first), and the first after the compaction (a new conversation from its summary).
    assert [memory.parsed, memory.reused] == [5, len(exchanges) - 5]


def test_a_growing_conversation_is_worked_out_from_the_previous_body() -> None:
    memory = RecentBodies()
    for body in conversation(12):
        read(memory, orjson.dumps(body))
    assert (memory.parsed, memory.reused) == (2, 10)  # the second moves the cache marker off the only message


def test_new_blobs_are_only_those_not_known() -> None:
    memory = RecentBodies()
    _, first, second = conversation(3)
    stored = read(memory, orjson.dumps(first))
    split = read(memory, orjson.dumps(second), known=set(stored.blobs))
    assert split is not None and memory.reused == 1
    assert len(split.blobs) == 3  # the message that lost the cache marker and the two new ones


def test_a_changed_billing_line_or_tool_list_or_setting_is_parsed_again_and_nothing_else() -> None:
    for change in ("billing", "tools", "setting", "new key", "dropped key"):
        memory = RecentBodies()
        _, first, second = conversation(3)
        read(memory, orjson.dumps(first))
        if change == "billing":
            second["system"][0]["text"] = "x-anthropic-billing-header: cc_version=2.1.197.f9d; cc_entrypoint=cli;"
        elif change == "tools":
            second["tools"] = second["tools"][:-1]
        elif change == "setting":
            second["max_tokens"] = 64000
        elif change == "new key":
            second["temperature"] = 1
        else:
            del second["metadata"]
        read(memory, orjson.dumps(second))
        assert memory.reused == 1, change


def test_a_resume_from_an_earlier_point_a_rewritten_message_and_another_thread_all_read_the_same() -> None:
    memory = RecentBodies()
    bodies = conversation(6)
    for body in bodies:
        read(memory, orjson.dumps(body))
    shorter = copy.deepcopy(bodies[2])  # --resume from an earlier point: fewer messages than last time
    read(memory, orjson.dumps(shorter))
    rewritten = copy.deepcopy(bodies[5])
    rewritten["messages"][3]["content"][0]["content"] = "changed"
    read(memory, orjson.dumps(rewritten))
    other = conversation(3, billing="cc_version=2.1.197.a56")  # a sub-agent of the same session
    other[0]["messages"][0]["content"][0]["text"] = "Search the code."
    read(memory, orjson.dumps(other[0]))
    read(memory, orjson.dumps(bodies[5]))  # the main thread again
    assert memory.reused >= 7


def test_bodies_that_do_not_round_trip_or_parse_read_the_same_as_parsing_them_whole() -> None:
    _, first, second = conversation(3)
    raw = orjson.dumps(second)
    cases = [
        raw[:-1],  # truncated
        raw.replace(b'"stream":true', b'"stream": true'),  # spacing orjson would not write
        raw.replace(b'"input":{}', b'"input":{"n":1.0}'),  # a number written differently
        raw.replace(b'"input":{}', b'"input":{"a":[1],"system":[2]}'),  # the next key's text inside a message
        raw.replace(b'"tools":', b'"messages":[],"tools":'),  # a duplicate key
        raw.replace(b'"max_tokens":32000', b'"model":"other"'),  # a duplicate of a key before messages
        raw.replace(b'"messages":[', b'"messages":[,'),
        b'{"model":"claude-sonnet-4-5","messages":[]}',
        orjson.dumps({"model": "m", "messages": first["messages"]}),  # messages as the last key
        orjson.dumps({"model": "m", "messages": second["messages"]}),
        b"[1,2]",
    ]
    for case in cases:
        memory = RecentBodies()
        read(memory, orjson.dumps(first))
        read(memory, case)


def test_random_edits_of_a_real_session_read_the_same_as_parsing_them_whole() -> None:
    rng = random.Random(7)
    bodies = [orjson.dumps(item["body"]) for item in claude_code_exchanges()]
    memory = RecentBodies()
    for _ in range(300):
        raw = bytearray(rng.choice(bodies))
        for _ in range(rng.randint(0, 3)):
            at = rng.randrange(len(raw))
            edit = rng.choice(("flip", "insert", "delete"))
            if edit == "flip":
                raw[at] = rng.choice(b'ab1,:]}{" ')
            elif edit == "insert":
                raw[at:at] = rng.choice((b",", b" ", b'"x"', b"]", b"}", b"0"))
            else:
                del raw[at : at + rng.randint(1, 40)]
        read(memory, bytes(raw), session=rng.choice(("a", "b")))
    assert memory.reused > 50


def test_memory_stays_within_its_bytes_dropping_the_least_recent_sessions() -> None:
    bodies = [orjson.dumps(body) for body in conversation(4)]
    memory = RecentBodies(max_bytes=3 * len(bodies[-1]))
    for session in range(10):
        for raw in bodies:
            read(memory, raw, session=f"s{session}")
            assert memory.held_bytes <= memory.max_bytes
    assert memory.reused == 20  # every session's third and fourth body


def test_requests_other_than_messages_are_parsed_as_before() -> None:
    memory = RecentBodies()
    record = exchange(b'{"model":"m","messages":[]}')
    record.path = "/v1/messages/count_tokens"
    assert memory.read(record) is None and record.parsed_body is None  # build_rows splits it as any body
    assert memory.parsed == memory.reused == 0
