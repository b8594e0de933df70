"""Conversation linking through real proxy processes: turns, branches, sub-agents, replicas, relink, cost."""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

from prompttrain.settings import normalise_database_url
from prompttrain.storage.conversation_queries import conversation_costs
from prompttrain.storage.engine import create_engine
from tests.conftest import ProxyFactory
from tests.helpers import PROMPTTRAIN, FakeUpstream, execute, wait_for_rows, write_json

SYSTEM = [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."}]
COLUMNS = (
    "request_id, timestamp, conversation_id, branch_id, parent_request_id, is_subtask, parent_task_request_id,"
    " current_message_hash, parent_message_hash, tool_result_names, cost_usd, input_tokens"
)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def turn(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "claude-sonnet-5", "max_tokens": 100, "system": SYSTEM, "messages": list(messages), "stream": True}


def send(proxy_url: str, body: dict[str, Any], session: str = "session-1") -> str:
    response = httpx.post(
        f"{proxy_url}/v1/messages",
        json=body,
        headers={"x-api-key": "sk-ant-own", "x-claude-code-session-id": session},
        timeout=30,
    )
    assert response.status_code == 200
    return response.headers["x-prompttrain-request-id"]


def rows_by_id(database_url: str, count: int) -> dict[str, dict[str, Any]]:
    rows = wait_for_rows(database_url, f"SELECT {COLUMNS} FROM api_requests ORDER BY timestamp", count)  # noqa: S608
    return {str(uuid.UUID(str(row["request_id"]))): row for row in rows}


def same(a: Any, b: Any) -> bool:
    return a is not None and b is not None and uuid.UUID(str(a)) == uuid.UUID(str(b))


def test_turns_tools_and_sub_agents_link_into_one_conversation(
    start_proxy: ProxyFactory, upstream: FakeUpstream, database_url: str
) -> None:
    proxy = start_proxy(database_url)
    task = {"type": "tool_use", "name": "Agent", "input": {"description": "scan", "prompt": "Scan the repo for TODOs"}}
    bash = {"type": "tool_use", "name": "Bash", "input": {"command": "ls", "description": "list"}}
    upstream.script(
        {"match": {"last_user_text_contains": "start"}, "content": [{"type": "text", "text": "On it."}, bash]},
        {"match": {"has_tool_result": True}, "content": [task]},
        {"match": {"last_user_text_contains": "Scan the repo"}, "content": [{"type": "text", "text": "3 TODOs"}]},
        {"match": {"last_user_text_contains": "agent said"}, "content": [{"type": "text", "text": "Done."}]},
    )
    first = send(proxy.url, turn(user("start")))
    assistant_1 = {"role": "assistant", "content": [{"type": "text", "text": "On it."}, {**bash, "id": "toolu_fake_1"}]}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_fake_1", "content": "a b"}]}
    second = send(proxy.url, turn(user("start"), assistant_1, result))
    sub = send(proxy.url, turn(user("Scan the repo for TODOs")))
    assistant_2 = {"role": "assistant", "content": [{**task, "id": "toolu_fake_2"}]}
    agent_result = {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_fake_2", "content": "x"},
            {"type": "text", "text": "agent said"},
        ],
    }
    third = send(proxy.url, turn(user("start"), assistant_1, result, assistant_2, agent_result))

    rows = rows_by_id(database_url, 4)
    conversation = rows[first]["conversation_id"]
    assert all(same(row["conversation_id"], conversation) for row in rows.values())
    assert [rows[i]["branch_id"] for i in (first, second, third)] == ["main", "main", "main"]
    assert same(rows[second]["parent_request_id"], first) and same(rows[third]["parent_request_id"], second)
    assert rows[sub]["branch_id"] == "subtask_1" and rows[sub]["is_subtask"]
    assert same(rows[sub]["parent_task_request_id"], second) and same(rows[sub]["parent_request_id"], second)
    names = rows[second]["tool_result_names"]
    assert (orjson.loads(names) if isinstance(names, str) else names) == ["Bash"]

    async def costs() -> Any:
        engine = create_engine(normalise_database_url(database_url), pool_size=1)
        try:
            async with engine.connect() as connection:
                return await conversation_costs(connection, uuid.UUID(str(conversation)))
        finally:
            await engine.dispose()

    attributed = asyncio.run(costs())
    assert attributed.total.requests == 4
    assert {share.name for share in attributed.per_tool} == {"Bash", "Agent"}
    assert [share.name for share in attributed.per_subagent] == ["subtask_1"]
    bash_share = next(share for share in attributed.per_tool if share.name == "Bash")
    assert bash_share.requests == 1 and bash_share.input_tokens == rows[second]["input_tokens"]


def test_a_resend_from_an_earlier_point_branches_and_trains_never_merge(
    start_proxy: ProxyFactory, upstream: FakeUpstream, database_url: str, credentials_dir: Path
) -> None:
    write_json(credentials_dir / "trains" / "other.json", {"auth": "passthrough"})
    proxy = start_proxy(database_url)
    hello = {"role": "assistant", "content": [{"type": "text", "text": "Hello from the fake upstream."}]}
    first = send(proxy.url, turn(user("hi")))
    left = send(proxy.url, turn(user("hi"), hello, user("left")))
    right = send(proxy.url, turn(user("hi"), hello, user("right")))
    other_team = httpx.post(
        f"{proxy.url}/v1/messages",
        json=turn(user("hi"), hello, user("left")),
        headers={"x-api-key": "k", "train-id": "other"},
    )
    assert other_team.status_code == 200
    rows = rows_by_id(database_url, 4)
    other = rows[other_team.headers["x-prompttrain-request-id"]]
    assert not same(other["conversation_id"], rows[first]["conversation_id"]) and other["parent_request_id"] is None
    assert rows[left]["branch_id"] == "main"
    assert rows[right]["branch_id"].startswith("branch_")
    assert same(rows[right]["parent_request_id"], first)


def test_two_replicas_recording_one_conversation_agree(
    start_proxy: ProxyFactory, upstream: FakeUpstream, postgres_url: str
) -> None:
    replicas = [start_proxy(postgres_url), start_proxy(postgres_url)]
    hello = {"role": "assistant", "content": [{"type": "text", "text": "Hello from the fake upstream."}]}
    root = send(replicas[0].url, turn(user("root")))
    wait_for_rows(postgres_url, "SELECT 1 FROM api_requests", 1)
    # Ten siblings of one parent at once, through both replicas: exactly one stays on main.
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        siblings = list(
            pool.map(lambda i: send(replicas[i % 2].url, turn(user("root"), hello, user(f"variant {i}"))), range(10))
        )
    rows = rows_by_id(postgres_url, 11)
    branches = [rows[s]["branch_id"] for s in siblings]
    assert branches.count("main") == 1
    assert all(same(rows[s]["parent_request_id"], root) for s in siblings)
    assert len({str(rows[s]["conversation_id"]) for s in siblings}) == 1


def test_relink_recomputes_stored_history(start_proxy: ProxyFactory, upstream: FakeUpstream, database_url: str) -> None:
    proxy = start_proxy(database_url)
    hello = {"role": "assistant", "content": [{"type": "text", "text": "Hello from the fake upstream."}]}
    first = send(proxy.url, turn(user("one")))
    second = send(proxy.url, turn(user("one"), hello, user("two")))
    before = rows_by_id(database_url, 2)
    execute(database_url, "UPDATE api_requests SET conversation_id = NULL, branch_id = NULL, parent_request_id = NULL")
    result = subprocess.run(
        [PROMPTTRAIN, "relink"], env={"DATABASE_URL": database_url}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "relinked 2 of 2 requests" in result.stderr
    after = rows_by_id(database_url, 2)
    assert same(after[second]["parent_request_id"], first)
    assert same(after[first]["conversation_id"], after[second]["conversation_id"])
    assert after[second]["branch_id"] == before[second]["branch_id"] == "main"
