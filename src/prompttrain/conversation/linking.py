"""Conversation linking: which conversation and branch a request belongs to, and which request is its parent.

The algorithm is the reference's (§4.3 to §4.6): a request's parent is the latest earlier request whose current message
hash equals this request's parent hash (same system prompt first, then any), then the grandparent, then a
compaction's summary; a sub-agent's first request is found through the Agent/Task tool call that spawned it.
What we do differently, and why:

- Conversations never cross trains (the reference searches every project): two teams' identical first turns must
  not merge. Within a train, a candidate from the same Claude Code session is preferred.
- Only completed requests are parents or siblings: a 429 followed by Claude Code's retry of the same body must not
  open a branch.
- Sub-agent branches are numbered by the order of the Agent/Task calls in the conversation (recorded with the
  calling request), so parallel sub-agents get `subtask_1`, `subtask_2`, … without the reference's gaps.
- Later turns inside a sub-agent inherit the sub-agent flag from their parent request, not from "any row of the
  conversation" (which would flag main-thread turns after a sub-agent too).
- Branch timestamps are UTC (the reference uses server-local time for `compact_HHMMSS`).

`facts_of` is pure CPU work on one request (run by the writer, in the recording process); `link` asks a `History` (the
database, in the writer's transaction) the questions above.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, Protocol

from prompttrain.conversation.hashing import (
    SEEN_BEFORE,
    Addresses,
    conversation_messages,
    hash_system,
    message_hashes,
    strip_reminders,
    system_text,
)

log = logging.getLogger(__name__)

SUBAGENT_TOOLS = frozenset({"Agent", "Task"})
SUBTASK_WINDOW = timedelta(hours=24)
COMPACT_WINDOW = timedelta(days=7)
COMPACT_MARKER = "This session is being continued from a previous conversation that ran out of context"
SUMMARY_STARTS = ("The conversation is summarized below:", "Summary:")
SUMMARY_ENDS = (
    "Please continue the conversation",
    "If you need specific details from before compaction",
    "Continue the conversation from where it left off",
)
SUMMARIZER_SYSTEM = "You are a helpful AI assistant tasked with summarizing conversations"
# Claude Code's compaction prompt ("Your task is to create a detailed summary of the conversation so far ...").
SUMMARY_INSTRUCTION = "summary of the conversation"
PROBE_LENGTH = 2000
MIN_SUMMARY_LENGTH = 100
MAX_STORED_SUMMARY = 65536


@dataclass(frozen=True)
class TaskCall:
    tool_use_id: str
    prompt_digest: str


@dataclass(frozen=True)
class LinkFacts:
    """What linking needs from one request, computed once (and JSON-serialisable: it travels through the spool)."""

    current_hash: str | None
    parent_hash: str | None
    grandparent_hash: str | None
    system_hash: str | None
    message_count: int
    conversation_length: int
    is_summarization: bool = False
    subtask_prompt_digest: str | None = None
    compact_probe: str | None = None
    compact_legacy: str | None = None
    task_calls: tuple[TaskCall, ...] = ()

    def to_json(self) -> dict[str, Any]:
        # What `asdict` gives, without its recursive deep copy (a tenth of a small record's conversion).
        data = {name: getattr(self, name) for name in FACT_FIELDS}
        data["task_calls"] = tuple(
            {"tool_use_id": c.tool_use_id, "prompt_digest": c.prompt_digest} for c in self.task_calls
        )
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LinkFacts:
        calls = tuple(TaskCall(**call) for call in data.get("task_calls", ()))
        return cls(**{**data, "task_calls": calls})


FACT_FIELDS = tuple(field.name for field in fields(LinkFacts) if field.name != "task_calls")


@dataclass(frozen=True)
class ParentRow:
    request_id: uuid.UUID
    conversation_id: uuid.UUID | None
    branch_id: str | None
    current_message_hash: str | None
    is_subtask: bool
    parent_task_request_id: uuid.UUID | None


@dataclass(frozen=True)
class TaskMatch:
    request_id: uuid.UUID
    conversation_id: uuid.UUID | None
    ordinal: int


@dataclass
class Link:
    conversation_id: uuid.UUID
    branch_id: str = "main"
    parent_request_id: uuid.UUID | None = None
    parent_message_hash: str | None = None
    is_subtask: bool = False
    parent_task_request_id: uuid.UUID | None = None

    def as_columns(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id,
            "branch_id": self.branch_id,
            "parent_request_id": self.parent_request_id,
            "parent_message_hash": self.parent_message_hash,
            "is_subtask": self.is_subtask,
            "parent_task_request_id": self.parent_task_request_id,
        }


class History(Protocol):
    """Questions linking asks about earlier requests of the same train (all `timestamp < before`, completed)."""

    async def find_parent(
        self, message_hash: str, system_hash: str | None, before: datetime, session_id: str | None
    ) -> ParentRow | None:
        """The newest request whose current hash is `message_hash`, preferring the same system prompt, then the
        same session."""
        ...

    async def has_children(
        self, conversation_id: uuid.UUID, parent_hash: str, before: datetime, exclude: uuid.UUID
    ) -> bool: ...

    async def find_task(self, prompt_digest: str, since: datetime, before: datetime) -> TaskMatch | None: ...

    async def find_compacted(self, probe: str, legacy: str, since: datetime, before: datetime) -> ParentRow | None: ...


def digest_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return strip_reminders(content)
    if isinstance(content, list):
        texts = [
            strip_reminders(str(item.get("text", "")))
            for item in content
            if isinstance(item, dict) and item.get("type") == "text"
        ]
        return "\n".join(text for text in texts if text.strip())
    return ""


def extract_summary(text: str) -> str | None:
    """The summary inside a continuation message (reference §4.6), or None if it has none."""
    at = text.find(COMPACT_MARKER)
    if at < 0:
        return None
    rest = text[at + len(COMPACT_MARKER) :]
    for start in SUMMARY_STARTS:
        found = rest.find(start)
        if found >= 0:
            rest = rest[found + len(start) :]
            break
    else:
        return None
    summary = rest.strip()
    ends = [summary.find(end) for end in SUMMARY_ENDS if end in summary]
    if ends:
        summary = summary[: min(ends)]
    return summary.strip().rstrip(".").strip() or None


def legacy_summary(summary: str) -> str:
    lowered = summary.lower()
    if lowered.startswith("analysis:"):
        lowered = "<analysis>" + lowered[len("analysis:") :]
    return lowered.replace("\n\nsummary:", "\n</analysis>\n\n<summary>", 1)


def first_text(message: dict[str, Any] | None) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text":
                return str(block.get("text", ""))
    return ""


def without_summary_instruction(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Claude Code's compaction request is the conversation with a summary instruction appended as the last text
    block of the last user message; without that block it is the conversation itself, whose last turn is its
    parent (otherwise it would look like a sibling of that turn and open a branch)."""
    if not messages or messages[-1].get("role") != "user":
        return None
    content = messages[-1].get("content")
    if not isinstance(content, list) or len(content) < 2:
        return None
    last = content[-1]
    if not (isinstance(last, dict) and last.get("type") == "text" and SUMMARY_INSTRUCTION in str(last.get("text"))):
        return None
    return [*messages[:-1], {**messages[-1], "content": content[:-1]}]


def facts_of(body: Any, response: dict[str, Any] | None, addresses: Addresses | None = None) -> LinkFacts | None:
    """Hashes and markers of a Messages request (and its response); None if it is not a conversation turn.

    `addresses` (the content digests the storage computed for the same body) lets unchanged messages and system
    prompts skip normalisation; the result is the same with or without them."""
    if not isinstance(body, dict):
        return None
    hashes = message_hashes(body.get("messages"), addresses)
    if hashes.current is None:
        return None
    conversation = conversation_messages(body.get("messages"))
    system = system_text(body.get("system")) or ""
    last_user = next((m for m in reversed(conversation) if m.get("role") == "user"), None)
    summary_request = SUMMARIZER_SYSTEM in system or (
        last_user is not None and SUMMARY_INSTRUCTION in message_text(last_user).lower()
    )
    parent_hash, grandparent_hash = hashes.parent, hashes.grandparent
    trimmed = without_summary_instruction(conversation) if summary_request else None
    if trimmed is not None:
        unprompted = message_hashes(trimmed)
        parent_hash, grandparent_hash = unprompted.current, unprompted.parent
    subtask_digest = compact_probe = compact_legacy = None
    first = conversation[0]
    if len(conversation) == 1 and first.get("role") == "user":
        prompt = message_text(first).strip()
        if prompt:
            subtask_digest = digest_text(prompt)
    summary = extract_summary(message_text(first))
    if summary is not None and len(summary) >= MIN_SUMMARY_LENGTH:
        compact_probe = summary.lower()[:PROBE_LENGTH]
        compact_legacy = legacy_summary(summary)[:PROBE_LENGTH]
    return LinkFacts(
        current_hash=hashes.current,
        parent_hash=parent_hash,
        grandparent_hash=grandparent_hash,
        system_hash=(
            SEEN_BEFORE.system_hash(addresses.system, body.get("system"))
            if addresses is not None and addresses.system is not None
            else hash_system(body.get("system"))
        ),
        message_count=hashes.message_count,
        conversation_length=hashes.conversation_length,
        is_summarization=summary_request,
        subtask_prompt_digest=subtask_digest,
        compact_probe=compact_probe,
        compact_legacy=compact_legacy,
        task_calls=task_calls_of(response),
    )


def task_calls_of(response: dict[str, Any] | None) -> tuple[TaskCall, ...]:
    content = response.get("content") if isinstance(response, dict) else None
    if not isinstance(content, list):
        return ()
    calls = []
    for block in content:
        if not isinstance(block, dict) or block.get("type") != "tool_use" or block.get("name") not in SUBAGENT_TOOLS:
            continue
        tool_input = block.get("input")
        prompt = tool_input.get("prompt") if isinstance(tool_input, dict) else None
        if isinstance(prompt, str) and prompt.strip():
            calls.append(TaskCall(str(block.get("id", "")), digest_text(strip_reminders(prompt).strip())))
    return tuple(calls)


def compact_summary_of(facts: LinkFacts, response: dict[str, Any] | None) -> str | None:
    """What a summarisation request's row keeps so that the continuation can find it (lower-cased, capped)."""
    if not facts.is_summarization:
        return None
    text = first_text(response).lower()
    # Claude Code's summaries are "<analysis>…</analysis><summary>…</summary>" (or "Analysis:"/"Summary:" sections).
    if len(text) < MIN_SUMMARY_LENGTH or not ("<summary>" in text or "summary:" in text):
        return None
    return text[:MAX_STORED_SUMMARY]


def summary_matches(stored: str, probe: str, legacy: str) -> bool:
    return probe in stored or stored.startswith(legacy)


async def link(
    facts: LinkFacts,
    history: History,
    *,
    request_id: uuid.UUID,
    timestamp: datetime,
    session_id: str | None,
    new_conversation: Callable[[], uuid.UUID] = uuid.uuid4,
) -> Link:
    """The conversation, branch and parents of one request."""
    if facts.conversation_length == 1:
        return await _link_first_message(facts, history, timestamp, new_conversation)
    if facts.parent_hash is None:
        return Link(new_conversation())
    # One lookup: a candidate with the same system prompt first (the reference's exact match), then any.
    parent = await history.find_parent(facts.parent_hash, facts.system_hash, timestamp, session_id)
    if parent is None and facts.grandparent_hash is not None:
        parent = await history.find_parent(facts.grandparent_hash, None, timestamp, session_id)
    if parent is None:
        compacted = await _compact_link(facts, history, timestamp)
        if compacted is not None:
            return compacted
    if parent is None or parent.conversation_id is None:
        return Link(new_conversation(), parent_message_hash=facts.parent_hash)
    branch = parent.branch_id or "main"
    if (
        not branch.startswith("compact_")
        and parent.current_message_hash is not None
        and await history.has_children(parent.conversation_id, parent.current_message_hash, timestamp, request_id)
    ):
        # Milliseconds: two branches of one conversation opened within the same second must not share an id.
        branch = f"branch_{timestamp:%Y%m%d%H%M%S}{timestamp.microsecond // 1000:03d}"
    return Link(
        parent.conversation_id,
        branch_id=branch,
        parent_request_id=parent.request_id,
        parent_message_hash=facts.parent_hash,
        is_subtask=parent.is_subtask,
        parent_task_request_id=parent.parent_task_request_id,
    )


async def _link_first_message(
    facts: LinkFacts, history: History, timestamp: datetime, new_conversation: Callable[[], uuid.UUID]
) -> Link:
    if facts.subtask_prompt_digest is not None:
        task = await history.find_task(facts.subtask_prompt_digest, timestamp - SUBTASK_WINDOW, timestamp)
        if task is not None and task.conversation_id is not None:
            return Link(
                task.conversation_id,
                branch_id=f"subtask_{task.ordinal}",
                parent_request_id=task.request_id,
                is_subtask=True,
                parent_task_request_id=task.request_id,
            )
    return await _compact_link(facts, history, timestamp) or Link(new_conversation())


async def _compact_link(facts: LinkFacts, history: History, timestamp: datetime) -> Link | None:
    """A continuation after a compaction joins the summarised conversation on a `compact_HHMMSS` branch."""
    if facts.compact_probe is None or facts.compact_legacy is None:
        return None
    compacted = await history.find_compacted(
        facts.compact_probe, facts.compact_legacy, timestamp - COMPACT_WINDOW, timestamp
    )
    if compacted is None or compacted.conversation_id is None:
        return None
    return Link(
        compacted.conversation_id,
        branch_id=f"compact_{timestamp:%H%M%S}",
        parent_request_id=compacted.request_id,
        parent_message_hash=compacted.current_message_hash,
    )
