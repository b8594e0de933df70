"""Conversation linking decisions (conversation/linking.py) over an in-memory history."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from prompttrain.conversation.linking import (
    COMPACT_MARKER,
    Link,
    LinkFacts,
    ParentRow,
    TaskCall,
    TaskMatch,
    compact_summary_of,
    extract_summary,
    facts_of,
    link,
    summary_matches,
)

T0 = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)


@dataclass
class Stored:
    request_id: uuid.UUID
    timestamp: datetime
    facts: LinkFacts
    link: Link
    session_id: str | None
    compact_summary: str | None = None
    completed: bool = True


@dataclass
class MemoryHistory:
    rows: list[Stored] = field(default_factory=list)
    tasks: list[tuple[str, uuid.UUID, uuid.UUID, int, datetime]] = field(default_factory=list)

    def _parent(self, row: Stored) -> ParentRow:
        return ParentRow(
            row.request_id,
            row.link.conversation_id,
            row.link.branch_id,
            row.facts.current_hash,
            row.link.is_subtask,
            row.link.parent_task_request_id,
        )

    async def find_parent(
        self, message_hash: str, system_hash: str | None, before: datetime, session_id: str | None
    ) -> ParentRow | None:
        found = [r for r in self.rows if r.completed and r.facts.current_hash == message_hash and r.timestamp < before]
        found.sort(
            key=lambda r: (r.facts.system_hash != system_hash, r.session_id != session_id, -r.timestamp.timestamp())
        )
        return self._parent(found[0]) if found else None

    async def has_children(
        self, conversation_id: uuid.UUID, parent_hash: str, before: datetime, exclude: uuid.UUID
    ) -> bool:
        return any(
            r.completed
            and r.link.conversation_id == conversation_id
            and r.link.parent_message_hash == parent_hash
            and r.timestamp < before
            and r.request_id != exclude
            for r in self.rows
        )

    async def find_task(self, prompt_digest: str, since: datetime, before: datetime) -> TaskMatch | None:
        found = [t for t in self.tasks if t[0] == prompt_digest and since <= t[4] < before]
        return TaskMatch(found[-1][1], found[-1][2], found[-1][3]) if found else None

    async def find_compacted(self, probe: str, legacy: str, since: datetime, before: datetime) -> ParentRow | None:
        for row in sorted(self.rows, key=lambda r: r.timestamp, reverse=True):
            if (
                row.compact_summary
                and since <= row.timestamp < before
                and summary_matches(row.compact_summary, probe, legacy)
            ):
                return self._parent(row)
        return None

    async def send(
        self,
        body: dict[str, Any],
        response: dict[str, Any] | None = None,
        *,
        at: datetime,
        session: str | None = "s1",
        completed: bool = True,
    ) -> Link:
        facts = facts_of(body, response)
        assert facts is not None
        request_id = uuid.uuid4()
        result = await link(facts, self, request_id=request_id, timestamp=at, session_id=session)
        self.rows.append(Stored(request_id, at, facts, result, session, compact_summary_of(facts, response), completed))
        ordinal = sum(1 for t in self.tasks if t[2] == result.conversation_id)
        for call in facts.task_calls:
            ordinal += 1
            self.tasks.append((call.prompt_digest, request_id, result.conversation_id, ordinal, at))
        return result


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def body(
    *messages: dict[str, Any], system: str = "You are Claude Code, Anthropic's official CLI for Claude."
) -> dict[str, Any]:
    return {"model": "m", "system": system, "messages": list(messages)}


def agent_call(tool_id: str, prompt: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_id, "name": "Agent", "input": {"description": "d", "prompt": prompt}}


async def test_a_conversation_grows_on_main() -> None:
    history = MemoryHistory()
    first = await history.send(body(user("hi")), at=T0)
    second = await history.send(body(user("hi"), assistant("hello"), user("more")), at=T0 + timedelta(seconds=5))
    third = await history.send(
        body(user("hi"), assistant("hello"), user("more"), assistant("sure"), user("again")),
        at=T0 + timedelta(seconds=9),
    )
    assert first.branch_id == second.branch_id == third.branch_id == "main"
    assert first.conversation_id == second.conversation_id == third.conversation_id
    assert second.parent_request_id == history.rows[0].request_id
    assert third.parent_request_id == history.rows[1].request_id
    assert third.parent_message_hash == history.rows[1].facts.current_hash


async def test_a_second_child_of_the_same_parent_opens_a_branch() -> None:
    history = MemoryHistory()
    await history.send(body(user("hi")), at=T0)
    main = await history.send(body(user("hi"), assistant("a"), user("left")), at=T0 + timedelta(seconds=1))
    other = await history.send(body(user("hi"), assistant("a"), user("right")), at=T0 + timedelta(seconds=2))
    assert main.branch_id == "main"
    assert other.branch_id == "branch_20261126100002000"
    assert other.conversation_id == main.conversation_id


async def test_a_failed_request_is_neither_parent_nor_sibling() -> None:
    history = MemoryHistory()
    await history.send(body(user("hi")), at=T0)
    turn = body(user("hi"), assistant("a"), user("next"))
    await history.send(turn, at=T0 + timedelta(seconds=1), completed=False)  # a 429
    retry = await history.send(turn, at=T0 + timedelta(seconds=2))
    assert retry.branch_id == "main"


async def test_sub_agents_are_numbered_in_call_order_and_keep_their_flag() -> None:
    history = MemoryHistory()
    await history.send(
        body(user("do it")), {"content": [agent_call("t1", "Find the bug"), agent_call("t2", "Write tests")]}, at=T0
    )
    second = await history.send(body(user("Write tests")), at=T0 + timedelta(seconds=1))
    first = await history.send(body(user("Find the bug")), at=T0 + timedelta(seconds=2))
    main_id = history.rows[0].link.conversation_id
    assert (first.branch_id, second.branch_id) == ("subtask_1", "subtask_2")
    assert first.conversation_id == second.conversation_id == main_id
    assert first.is_subtask and first.parent_task_request_id == history.rows[0].request_id
    later = await history.send(
        body(user("Find the bug"), assistant("looking"), user("tool output")), at=T0 + timedelta(seconds=3)
    )
    assert (later.branch_id, later.is_subtask, later.parent_task_request_id) == (
        "subtask_1",
        True,
        history.rows[0].request_id,
    )
    # The main thread after the sub-agents is not a sub-agent.
    main_turn = await history.send(
        body(user("do it"), {"role": "assistant", "content": [agent_call("t1", "Find the bug")]}, user("done")),
        at=T0 + timedelta(seconds=4),
    )
    assert main_turn.branch_id == "main" and not main_turn.is_subtask


async def test_conversations_prefer_the_same_system_prompt_then_the_same_session() -> None:
    history = MemoryHistory()
    await history.send(body(user("hi"), system="A"), at=T0, session="one")
    await history.send(body(user("hi"), system="B"), at=T0 + timedelta(seconds=1), session="two")
    turn = body(user("hi"), assistant("x"), user("y"), system="A")
    linked = await history.send(turn, at=T0 + timedelta(seconds=2), session="two")
    assert linked.conversation_id == history.rows[0].link.conversation_id


async def test_grandparent_fallback() -> None:
    history = MemoryHistory()
    await history.send(body(user("a")), at=T0)
    jump = await history.send(
        body(user("a"), assistant("b"), user("c"), assistant("d"), user("e")), at=T0 + timedelta(seconds=1)
    )
    assert jump.conversation_id == history.rows[0].link.conversation_id
    assert jump.parent_message_hash == history.rows[1].facts.parent_hash


SUMMARY = "Primary request: refactor the parser and keep every test green. " * 5


async def test_a_compaction_continues_the_conversation_on_a_compact_branch() -> None:
    history = MemoryHistory()
    await history.send(body(user("start")), at=T0)
    summarizing = body(
        user("start"), assistant("ok"), user("Your task is to create a detailed summary of the conversation")
    )
    await history.send(
        summarizing,
        {"content": [{"type": "text", "text": f"<analysis>x</analysis>\n<summary>{SUMMARY}</summary>"}]},
        at=T0 + timedelta(seconds=1),
    )
    continuation = f"{COMPACT_MARKER}. Summary:\n{SUMMARY}\nPlease continue the conversation from where we left it off."
    compacted = await history.send(body(user(continuation)), at=T0 + timedelta(hours=1, seconds=2))
    assert compacted.conversation_id == history.rows[0].link.conversation_id
    assert compacted.branch_id == "compact_110002"
    assert compacted.parent_request_id == history.rows[1].request_id
    follow = await history.send(
        body(user(continuation), assistant("resuming"), user("go")), at=T0 + timedelta(hours=1, seconds=5)
    )
    assert follow.branch_id == "compact_110002"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"{COMPACT_MARKER}. The conversation is summarized below:\nS1 text.\nPlease continue the conversation",
            "S1 text",
        ),
        (f"{COMPACT_MARKER}.\nSummary: S2...\nIf you need specific details from before compaction, read", "S2"),
        ("no marker here. Summary: x", None),
    ],
)
def test_summary_extraction(text: str, expected: str | None) -> None:
    assert extract_summary(text) == expected


def test_legacy_summary_form_matches() -> None:
    assert summary_matches("<analysis>\nthe plan</analysis>\n\n<summary>done", "zzz", "<analysis>\nthe plan")


def test_facts_travel_as_json_whole_and_come_back_equal() -> None:
    facts = LinkFacts(
        current_hash="c",
        parent_hash="p",
        grandparent_hash=None,
        system_hash="s",
        message_count=3,
        conversation_length=3,
        is_summarization=True,
        subtask_prompt_digest="d",
        compact_probe="probe",
        compact_legacy="legacy",
        task_calls=(TaskCall("toolu_1", "digest-1"), TaskCall("toolu_2", "digest-2")),
    )
    assert facts.to_json() == dataclasses.asdict(facts)
    assert LinkFacts.from_json(orjson.loads(orjson.dumps(facts.to_json()))) == facts
