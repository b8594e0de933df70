"""Conversation linking of real Claude Code traffic: one session with a tool, a sub-agent, --continue, a resume
from an earlier point and a compaction, recorded through the proxy into SQLite and PostgreSQL.

What Claude Code 2.1.197 sends (observed against the fake upstream; `tests/fixtures/claude_code/session_*.json`
holds one such session):

* main-thread turns: `system` = [billing-header block, "You are Claude Code, …", the long prompt,
  `--append-system-prompt`], 24 tools, `thinking` enabled; each turn resends the whole conversation, the first user
  message carrying system reminders as separate text blocks;
* a sub-agent (Agent tool, `subagent_type: general-purpose`): the same model, its own `system` (billing header with
  `cc_is_subagent=true`, "You are Claude Code, …", then "You are an agent for Claude Code, …"; without the
  `--append-system-prompt` text), 21 tools, `thinking` disabled; its first request has a single user message whose
  text blocks are system reminders followed by exactly the Agent call's `prompt`. Its Bash results carry a system
  reminder inside the tool_result string. The main thread then gets the agent's answer as a tool_result holding two
  text blocks (the answer, then `agentId: …<usage>…</usage>`);
* `--continue`: the stored transcript plus the new user message (no new system reminders);
* `--resume <session> --resume-session-at <transcript uuid>`: the transcript cut after that assistant message plus
  the new user message, i.e. a resend from an earlier point, in the same session;
* `/compact` in print mode (`-p /compact --continue`): one request with the main system prompt and tools, the
  conversation *without its last assistant message*, and the compaction instruction appended as a second text block
  to the last user message. The following turn starts with a user message "This session is being continued from a
  previous conversation … Summary: <the summary> … If you need specific details from before compaction …", then the
  dropped assistant message, a user message with the `/compact` local-command blocks and "Continue from where you
  left off.", a synthetic assistant "No response requested.", and the new user message.

Linking recognises the appended instruction and hashes the compaction request's parent without it, so the
compaction request follows the turn it summarises (on that turn's branch, not as a sibling opening a new
`branch_*`), and the turn after it joins a `compact_HHMMSS` branch.

Set PROMPTTRAIN_CAPTURE_FIXTURES=1 to rewrite the fixture from a CLI run (on SQLite).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import ProxyFactory
from tests.helpers import CLAUDE_CODE_SESSION, FakeUpstream, Service, claude_code_exchanges, wait_for_rows
from tests.integration.test_claude_code import (  # noqa: F401 - claude_cli is a fixture
    API_KEY,
    MODEL,
    PINNED_VERSION,
    claude_cli,
    run_claude,
)

FIXTURE = CLAUDE_CODE_SESSION
CAPTURE_ENV = "PROMPTTRAIN_CAPTURE_FIXTURES"
COLUMNS = (
    "request_id, timestamp, upstream_request_id, session_id, conversation_id, branch_id, parent_request_id,"
    " parent_message_hash, current_message_hash, is_subtask, parent_task_request_id"
)
ALLOWED_TOOLS = ("--allowedTools", "Bash,Agent")
COMPACT_INSTRUCTION = "Your task is to create a detailed summary of the conversation so far"
CONTINUATION = "This session is being continued from a previous conversation that ran out of context"
# Kept from the captured requests' headers when writing the fixture (never credentials).
REPLAYED_HEADERS = ("anthropic-beta", "anthropic-version", "user-agent", "x-app", "x-claude-code-session-id")
# system blocks and tools longer than this are stored once in the fixture, under their digest.
SHARED_BLOCK_CHARS = 512

# The requests of the session, in the order Claude Code sends them.
NAMES = (
    "turn1",  # -p: the prompt; the model calls Bash
    "turn2",  # the Bash result; the model calls Agent
    "agent1",  # the sub-agent's first request; it calls Bash
    "agent2",  # the sub-agent's Bash result; it answers
    "turn3",  # the Agent result; the model answers
    "continued",  # -p --continue: a second question
    "resumed",  # -p --resume <session> --resume-session-at <turn3's answer>: a third question
    "compaction",  # -p /compact --continue: the summary request
    "compacted1",  # -p --continue after the compaction
    "compacted2",  # -p --continue again
)


@dataclass(frozen=True)
class Session:
    """The scripted replies of one session; `tag` makes every text and id unique to one run."""

    tag: str
    marker: str  # appended to the main thread's system prompt (not to the sub-agent's)

    def text(self, name: str) -> str:
        return f"[{self.tag}-{name}]"

    @property
    def agent_prompt(self) -> str:
        return f"Run `echo {self.tag}-agent-echo` with Bash and report what it printed. {self.text('agent')}"

    @property
    def summary(self) -> str:
        return (
            "<analysis>\nThe user had a command run, a helper agent run another, then asked three questions.\n"
            "</analysis>\n\n<summary>\n1. Primary Request and Intent:\n   Run the marker command with Bash, ask a "
            f"helper agent to run its own command, then answer follow-up questions {self.text('summary')}.\n\n"
            "2. Current Work:\n   The third question was answered.\n</summary>"
        )

    def reply(self, name: str, *content: dict[str, Any], **match: Any) -> dict[str, Any]:
        return {
            "match": match,
            "message_id": f"msg_{self.tag}_{name}",
            "content": list(content),
            "headers": {"request-id": f"req_{self.tag}_{name}"},
        }

    def first_run(self) -> list[dict[str, Any]]:
        main = {"system_contains": self.marker}
        bash = {"command": f"echo {self.tag}-main-echo", "description": "Print the test marker"}
        agent = {
            "description": "Run the helper command",
            "prompt": self.agent_prompt,
            "subagent_type": "general-purpose",
        }
        agent_bash = {"command": f"echo {self.tag}-agent-echo", "description": "Print the helper marker"}
        return [
            self.reply(
                "turn1",
                {"type": "text", "text": "I will run the command."},
                {"type": "tool_use", "id": f"toolu_{self.tag}_bash", "name": "Bash", "input": bash},
                **main,
                has_tool_result=False,
            ),
            self.reply(
                "turn2",
                {"type": "text", "text": "Now a helper agent."},
                {"type": "tool_use", "id": f"toolu_{self.tag}_agent", "name": "Agent", "input": agent},
                **main,
                last_user_text_contains=f"{self.tag}-main-echo",
            ),
            self.reply(
                "agent1",
                {"type": "tool_use", "id": f"toolu_{self.tag}_agent_bash", "name": "Bash", "input": agent_bash},
                last_user_text_contains=self.text("agent"),
                has_tool_result=False,
            ),
            self.reply(
                "agent2",
                {"type": "text", "text": f"It printed {self.tag}-agent-echo. {self.text('agent-done')}"},
                last_user_text_contains=f"{self.tag}-agent-echo",
                has_tool_result=True,
            ),
            self.reply(
                "turn3",
                {"type": "text", "text": f"The helper is done. {self.text('turn3')}"},
                **main,
                last_user_text_contains=self.text("agent-done"),
            ),
        ]

    def answer(self, name: str) -> dict[str, Any]:
        return self.reply(name, {"type": "text", "text": f"Answer {self.text(name)}"}, system_contains=self.marker)


# -- what every recording of the session must show -----------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    return a is not None and b is not None and uuid.UUID(str(a)) == uuid.UUID(str(b))


def rows_by_name(database_url: str, count: int) -> dict[str, dict[str, Any]]:
    """The recorded requests, named by the upstream request id their scripted reply carried."""
    rows = wait_for_rows(database_url, f"SELECT {COLUMNS} FROM api_requests ORDER BY timestamp", count)  # noqa: S608
    named = {}
    for row in rows:
        match = re.fullmatch(r"req_[0-9a-f]+_(\w+)", str(row["upstream_request_id"]))
        assert match is not None, row
        named[match.group(1)] = row
    return named


def assert_links(rows: dict[str, dict[str, Any]]) -> None:
    assert set(rows) == set(NAMES), sorted(rows)
    summary = {
        name: (row["branch_id"], _name_of(rows, row["parent_request_id"]), bool(row["is_subtask"]))
        for name, row in rows.items()
    }
    context = "\n".join(f"{name}: branch, parent, subtask = {value}" for name, value in summary.items())

    def parent(name: str) -> str | None:
        return _name_of(rows, rows[name]["parent_request_id"])

    # One conversation for the whole session, sub-agent, resume and compaction included.
    conversation = rows["turn1"]["conversation_id"]
    assert conversation is not None
    assert all(same(row["conversation_id"], conversation) for row in rows.values()), context

    # The main thread: every turn on main, its parent the previous turn (the parent hash is that turn's hash).
    assert rows["turn1"]["parent_request_id"] is None and rows["turn1"]["parent_message_hash"] is None, context
    for name, previous in (("turn2", "turn1"), ("turn3", "turn2"), ("continued", "turn3")):
        assert (rows[name]["branch_id"], parent(name)) == ("main", previous), context
        assert rows[name]["parent_message_hash"] == rows[previous]["current_message_hash"], context
    assert rows["turn1"]["branch_id"] == "main", context
    main_thread = ("turn1", "turn2", "turn3", "continued", "resumed", "compaction", "compacted1", "compacted2")
    assert not any(bool(rows[name]["is_subtask"]) for name in main_thread), context
    assert all(rows[name]["parent_task_request_id"] is None for name in main_thread), context

    # The sub-agent: its own branch, found through the Agent call in turn2's response; its second request follows
    # its first by hash and stays on the branch, still flagged.
    for name, previous in (("agent1", "turn2"), ("agent2", "agent1")):
        assert rows[name]["branch_id"] == "subtask_1", context
        assert bool(rows[name]["is_subtask"]), context
        assert same(rows[name]["parent_task_request_id"], rows["turn2"]["request_id"]), context
        assert parent(name) == previous, context
    assert rows["agent1"]["parent_message_hash"] is None, context
    assert rows["agent2"]["parent_message_hash"] == rows["agent1"]["current_message_hash"], context

    # --resume-session-at turn3: a second child of turn3, so a new branch.
    assert rows["resumed"]["branch_id"].startswith("branch_") and parent("resumed") == "turn3", context
    assert rows["resumed"]["parent_message_hash"] == rows["turn3"]["current_message_hash"], context

    # The compaction request drops the last answer and appends its instruction to the last user message: without
    # the instruction it is the resumed turn's conversation, so it follows that turn on its branch.
    assert parent("compaction") == "resumed", context
    assert rows["compaction"]["branch_id"] == rows["resumed"]["branch_id"], context

    # The turn after the compaction starts from the summary: found through the compaction's response, on a
    # compact branch of the same conversation; the next turn follows it by hash and stays on that branch.
    compact_branch = rows["compacted1"]["branch_id"]
    assert re.fullmatch(r"compact_\d{6}", compact_branch), context
    assert parent("compacted1") == "compaction", context
    assert rows["compacted1"]["parent_message_hash"] == rows["compaction"]["current_message_hash"], context
    assert (rows["compacted2"]["branch_id"], parent("compacted2")) == (compact_branch, "compacted1"), context
    assert rows["compacted2"]["parent_message_hash"] == rows["compacted1"]["current_message_hash"], context


def _name_of(rows: dict[str, dict[str, Any]], request_id: Any) -> str | None:
    if request_id is None:
        return None
    return next((name for name, row in rows.items() if same(row["request_id"], request_id)), f"?{request_id}")


# -- the real CLI ------------------------------------------------------------------------------------------------


@pytest.mark.claude_code
def test_a_claude_code_session_links_into_one_conversation(
    claude_cli: Path,  # noqa: F811 - the fixture imported above
    start_proxy: ProxyFactory,
    upstream: FakeUpstream,
    database_url: str,
    tmp_path: Path,
) -> None:
    tag = uuid.uuid4().hex[:10]
    session = Session(tag=tag, marker=f"prompttrain-conversation-{tag}")
    proxy = start_proxy(database_url)
    directory = tmp_path / "claude"
    commands: dict[str, str] = {}  # for the fixture: the command line and the reply of every request
    scripted: dict[str, dict[str, Any]] = {}

    def claude(names: tuple[str, ...], replies: list[dict[str, Any]], prompt: str, *args: str) -> dict[str, Any]:
        upstream.script(*replies)
        scripted.update(zip(names, replies, strict=True))
        arguments = (*ALLOWED_TOOLS, "--append-system-prompt", session.marker, *args)
        result = run_claude(claude_cli, proxy, directory, prompt, *arguments)
        context = _diagnostics(result.returncode, result.stdout, result.stderr, upstream, proxy)
        assert result.returncode == 0, context
        output: dict[str, Any] = json.loads(result.stdout)
        assert output["is_error"] is False, context
        for name in names:
            commands[name] = " ".join(
                ["claude -p", json.dumps(prompt), "--output-format json --model", MODEL, *arguments]
            )
        return output

    first = claude(NAMES[:5], session.first_run(), f"Run the marker command, then ask a helper. {session.text('ask1')}")
    assert first["result"] == f"The helper is done. {session.text('turn3')}"
    session_id = str(first["session_id"])
    second = claude(("continued",), [session.answer("continued")], f"A second question {session.text('ask2')}", "-c")
    assert second["result"] == f"Answer {session.text('continued')}"
    turn3_entry = transcript_uuid(directory, session_id, f"msg_{tag}_turn3")
    third = claude(
        ("resumed",),
        [session.answer("resumed")],
        f"A third question, from the earlier point {session.text('ask3')}",
        "--resume",
        session_id,
        "--resume-session-at",
        turn3_entry,
    )
    assert third["result"] == f"Answer {session.text('resumed')}"
    compaction = session.reply("compaction", {"type": "text", "text": session.summary}, system_contains=session.marker)
    compacted = claude(("compaction",), [compaction], "/compact", "--continue")
    assert compacted["num_turns"] == 0  # a local command: no model turn of its own
    fourth = claude(("compacted1",), [session.answer("compacted1")], f"A fourth question {session.text('ask4')}", "-c")
    assert fourth["result"] == f"Answer {session.text('compacted1')}"
    fifth = claude(("compacted2",), [session.answer("compacted2")], f"A fifth question {session.text('ask5')}", "-c")
    assert fifth["result"] == f"Answer {session.text('compacted2')}"
    assert {output["session_id"] for output in (second, third, compacted, fourth, fifth)} == {session_id}

    received = upstream.received()
    assert [(item["method"], item["path"]) for item in received] == [("POST", "/v1/messages")] * len(NAMES)
    rows = rows_by_name(database_url, len(NAMES))
    # Sequential requests: the fake received them in the order the proxy recorded them.
    ordered = sorted(rows, key=lambda name: rows[name]["timestamp"])
    assert tuple(ordered) == NAMES, ordered
    bodies = {name: item["body"] for name, item in zip(NAMES, received, strict=True)}
    assert_request_shapes(session, bodies)
    assert {row["session_id"] for row in rows.values()} == {session_id}
    assert_links(rows)

    if os.environ.get(CAPTURE_ENV) == "1" and database_url.startswith("sqlite"):
        write_fixture(received, scripted, commands, str(directory))


def transcript_uuid(directory: Path, session_id: str, message_id: str) -> str:
    """The transcript entry (`uuid`) of an API message, which `--resume-session-at` takes."""
    transcripts = list((directory / "home" / ".claude" / "projects").glob(f"*/{session_id}.jsonl"))
    assert len(transcripts) == 1, transcripts
    found = [
        entry["uuid"]
        for entry in map(json.loads, transcripts[0].read_text().splitlines())
        if entry.get("type") == "assistant" and (entry.get("message") or {}).get("id") == message_id
    ]
    assert found, f"{message_id} not in {transcripts[0]}"
    return str(found[-1])


def assert_request_shapes(session: Session, bodies: dict[str, dict[str, Any]]) -> None:
    """What Claude Code sent, as the module docstring describes it (the assumptions the links rest on)."""
    for name, body in bodies.items():
        assert body["model"] == MODEL and body["stream"] is True, name
        is_agent = name.startswith("agent")
        assert (session.marker in _system_text(body)) is not is_agent, name
        assert ("cc_is_subagent=true" in body["system"][0]["text"]) is is_agent, name
    agent = bodies["agent1"]
    assert "You are an agent for Claude Code" in _system_text(agent)
    assert agent["thinking"] == {"type": "disabled"}
    [message] = agent["messages"]
    texts = [block["text"] for block in message["content"]]
    assert texts[-1] == session.agent_prompt
    assert all(text.startswith("<system-reminder>") for text in texts[:-1])
    # --continue and --resume-session-at resend the conversation up to turn3's answer, then the new question.
    turn3 = bodies["turn3"]["messages"]
    for name in ("continued", "resumed"):
        messages = bodies[name]["messages"]
        assert _plain(messages[: len(turn3)]) == _plain(turn3), name
        assert [m["role"] for m in messages[len(turn3) :]] == ["assistant", "user"], name
    # The compaction: up to the resumed question, its answer dropped, the instruction appended to the question.
    compaction = bodies["compaction"]["messages"]
    assert _plain(compaction[:-1]) == _plain(bodies["resumed"]["messages"][:-1])
    last = compaction[-1]["content"]
    assert session.text("ask3") in last[0]["text"] and COMPACT_INSTRUCTION in last[-1]["text"]
    first = bodies["compacted1"]["messages"][0]["content"]
    assert CONTINUATION in first[-1]["text"] and session.text("summary") in first[-1]["text"]
    dropped = bodies["compacted1"]["messages"][1]
    assert dropped["role"] == "assistant" and dropped["content"][0]["text"] == f"Answer {session.text('resumed')}"


def _plain(messages: list[dict[str, Any]]) -> list[Any]:
    """Messages without `cache_control` (Claude Code moves it to the newest message every turn)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items() if key != "cache_control"}
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value

    return [strip(message) for message in messages]


def _system_text(body: dict[str, Any]) -> str:
    system = body.get("system")
    if isinstance(system, list):
        return "\n".join(str(block.get("text", "")) for block in system if isinstance(block, dict))
    return str(system or "")


def _diagnostics(returncode: int, stdout: str, stderr: str, upstream: FakeUpstream, proxy: Service) -> str:
    received = [
        (item["path"], item["body"].get("model"), len(item["body"].get("messages", [])))
        for item in upstream.received()
        if isinstance(item["body"], dict)
    ]
    return (
        f"claude exited {returncode}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}\n"
        f"upstream received (path, model, messages): {received}\nproxy log tail:\n{proxy.log()[-2000:]}"
    )


# -- the captured session, replayed (no CLI needed) --------------------------------------------------------------


def write_fixture(
    received: list[dict[str, Any]], replies: dict[str, dict[str, Any]], commands: dict[str, str], temporary: str
) -> None:
    """The captured requests with the replies that answered them; big system blocks and tools stored once."""
    shared: dict[str, Any] = {}

    def share(items: Any) -> Any:
        if not isinstance(items, list):
            return items
        kept = []
        for item in items:
            text = orjson.dumps(item)
            if len(text) <= SHARED_BLOCK_CHARS:
                kept.append(item)
                continue
            digest = hashlib.sha256(text).hexdigest()[:16]
            shared[digest] = item
            kept.append({"$shared": digest})
        return kept

    exchanges = []
    for name, item in zip(NAMES, received, strict=True):
        body = dict(item["body"])
        body["system"], body["tools"] = share(body.get("system")), share(body.get("tools"))
        reply = {key: value for key, value in replies[name].items() if key != "match"}
        headers = {key: item["headers"][key] for key in REPLAYED_HEADERS if key in item["headers"]}
        exchanges.append({"name": name, "command": commands[name], "headers": headers, "body": body, "reply": reply})
    document = {
        "_comment": (
            f"One Claude Code {PINNED_VERSION} session recorded by "
            "tests/integration/test_claude_code_conversations.py (PROMPTTRAIN_CAPTURE_FIXTURES=1): the request "
            "bodies as the fake upstream received them, in order, and the scripted replies. A system block or tool "
            'written as {"$shared": digest} is the entry of `shared` with that digest. The API key was a dummy and '
            "is not stored; the temporary directory is replaced with /tmp/claude-code-session."
        ),
        "claude_code_version": PINNED_VERSION,
        "exchanges": exchanges,
        "shared": shared,
    }
    text = json.dumps(document, indent=1, ensure_ascii=False).replace(temporary, "/tmp/claude-code-session")
    # Claude Code names a project's transcript directory after its path, every other character a dash.
    text = text.replace(re.sub("[^A-Za-z0-9]", "-", temporary), "-tmp-claude-code-session")
    assert API_KEY not in text and "sk-ant-" not in text
    FIXTURE.write_text(text + "\n")


def test_the_captured_claude_code_session_replays_into_the_same_links(
    start_proxy: ProxyFactory, upstream: FakeUpstream, database_url: str
) -> None:
    exchanges = claude_code_exchanges()
    assert tuple(exchange["name"] for exchange in exchanges) == NAMES
    proxy = start_proxy(database_url)
    # Sent one after the other, each reply queued in order: the n-th request gets the n-th reply.
    upstream.script(*(exchange["reply"] for exchange in exchanges))
    for exchange in exchanges:
        response = httpx.post(
            f"{proxy.url}/v1/messages?beta=true",
            content=orjson.dumps(exchange["body"]),
            headers={**exchange["headers"], "content-type": "application/json", "x-api-key": API_KEY},
            timeout=30,
        )
        assert response.status_code == 200, (exchange["name"], response.text[:500])
        assert "message_stop" in response.text
    assert_links(rows_by_name(database_url, len(exchanges)))
