"""How fast the background writer links and stores Claude Code requests, and what the request path pays for it.

Method
------
The target (GitHub issue "Conversation tracking"): linking adds no latency to the request path, and the writer links
at least 500 requests/s of 200 KB bodies on this machine.

1. A workload of ``--requests`` (2,000) Claude Code requests is built in memory, before anything is timed: whole
   conversations of 20 requests (so 100 conversations), ``--sessions`` (25) of them in progress at any time, each
   request drawn from one of those at random. The ``system`` blocks and ``tools`` are Claude Code 2.1.197's own,
   taken from the captured session in ``tests/fixtures/claude_code/`` (main thread: ~110 KB; sub-agent: ~59 KB);
   messages are real text and code from the standard library (``storage_growth.Corpus``). A conversation has 13
   main-thread turns (text + Read/Bash ``tool_use``, then the ``tool_result``), one ``Agent`` call at turn 6 whose
   sub-agent makes 3 requests (``subtask_1``), a resend from turn 5 after turn 9 (a ``branch_*``), a compaction
   request shaped like Claude Code's (the conversation without its last answer, the instruction appended to the
   last user message) and two turns after it (``compact_*``). Sizes are tuned so that the mean body is
   ``--body-kb`` (200). Every response is a real SSE stream (the fake upstream's own builder) of the assistant
   message the next request carries back.
2. Each request becomes an ``ExchangeRecord`` as ``proxy/app.py`` fills it (raw ``request_body``, the parsed body
   as ``parsed_body``, SSE ``chunks``, headers, times), with strictly increasing start times.
3. (a) Throughput: a ``RequestWriter`` (the proxy's batch size and flush interval; a payload budget large enough
   that nothing is shed, checked) writes to a temporary PostgreSQL database created on ``--admin-url`` and migrated
   with ``prompttrain.storage.migrate.migrate``. All records are submitted at once; the clock runs from the first
   ``submit`` until the writer has committed every ``api_requests`` row (its ``records_written`` metric), and on
   until every ``request_payloads`` row is in. The split comes from wrapping the writer's own functions: the
   converter (``_convert``, hashing + content addressing, in a worker thread; wall and thread-CPU time), the
   metadata lane (``_apply_entries``: link + insert + commit), inside it ``link_row`` (the linking queries), and
   the payload lane (``_insert_payloads``). The lanes overlap, so their busy times add up to more than the elapsed
   time. Then the rows are checked: one conversation per generated conversation, and the expected number of rows
   on ``main``, ``subtask_1``, ``branch_*`` and ``compact_*``. The same run is repeated on a SQLite file.
4. (b) The request path: ``RecordingProcesses.submit`` is the only recording call a request makes. A second
   workload (new conversations) is submitted to running recording processes (PostgreSQL) at ``--rate`` (500)
   requests/s with the proxy's default payload budget; each ``submit`` call is timed (µs), and the backlog (records
   not yet confirmed). For comparison, the per-record conversion time (what linking would cost if it ran on the
   request path) is printed next to it.
5. Each stage alone, on a fresh PostgreSQL database: ``build_rows`` record by record (what the converter does), then
   the metadata lane's batches (``_apply_entries``), then the payload lane's (``_insert_payloads``), one after the
   other: the rate each stage could sustain without the others competing for the CPU and the GIL.

0. The proxy's own set-up, measured first and used for PASS/MISS: the records are submitted at once to a
   ``RecordingProcesses`` (``storage/recorder.py``, ``WRITER_PROCESSES``, 2 by default), which pickles each one
   (without its parsed body) to the recording process its Claude Code session maps to
   (``storage/recorder_process.py``): that process parses the body again, then converts,
   links and writes exactly as in (a). The clock runs until every ``api_requests`` row is committed (the table is
   polled every 20 ms) and on until the recorder has confirmed every record (payloads included). Runs (a) and (b)
   below drive a ``RequestWriter`` in this process instead, to split the time between its stages.

PASS/MISS is printed for >= 500 requests/s on PostgreSQL; the exit status is 0 either way. ``--json FILE`` writes
every number. Noise: on a 2-core machine the converter thread, the event loop and PostgreSQL share the CPUs, and
anything else running (a test suite) shows up in the numbers; the load average is printed.

Usage: ``.venv/bin/python bench/linking_throughput.py [--requests 2000] [--body-kb 200] [--no-sqlite]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from prometheus_client import REGISTRY

from prompttrain.settings import Settings, normalise_database_url
from prompttrain.storage import linking_store
from prompttrain.storage import writer as writer_module
from prompttrain.storage.engine import create_engine
from prompttrain.storage.migrate import migrate
from prompttrain.storage.recorder import RecordingProcesses
from prompttrain.storage.records import ExchangeRecord, build_rows, new_request_id
from prompttrain.storage.spool import Spool
from prompttrain.storage.writer import RequestWriter
from prompttrain.upstream_fake.replies import build_message, build_sse_events, compute_usage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from storage_growth import Corpus, TempDatabase, compact

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "claude_code" / "session_subagent_continue_resume_compact.json"
DEFAULT_ADMIN_URL = "postgresql://postgres:postgres@127.0.0.1:5432/postgres"
TARGET_PER_SECOND = 500.0
MODEL = "claude-sonnet-4-5-20250929"
MAIN_TURNS = 13
AGENT_TURN = 6  # the turn whose answer calls Agent
BRANCH_FROM = 5  # a resend from this turn's request …
BRANCH_AFTER = 9  # … sent after this turn
TURN_RESULT_BYTES = 3_000  # the tool_result of a main-thread turn
COMPACT_INSTRUCTION = (
    "CRITICAL: Respond with TEXT ONLY. Do NOT call any tools.\n\nYour task is to create a detailed summary of the "
    "conversation so far, paying close attention to the user's explicit requests and your previous actions."
)
CONTINUATION = (
    "This session is being continued from a previous conversation that ran out of context. The summary below covers "
    "the earlier portion of the conversation.\n\nSummary:\n{summary}\n\nIf you need specific details from before "
    "compaction (like exact code snippets, error messages, or content you generated), read the full transcript at: "
    "/home/user/.claude/projects/-home-user-project/{session}.jsonl\nContinue the conversation from where it left off "
    "without asking the user any further questions."
)
LOCAL_COMMAND = [
    "<local-command-caveat>Caveat: The messages below were generated by the user while running local commands. DO "
    "NOT respond to these messages or otherwise consider them in your response unless the user explicitly asks you "
    "to.</local-command-caveat>\n",
    "<command-name>/compact</command-name>\n            <command-message>compact</command-message>\n"
    "            <command-args></command-args>\n",
    "<local-command-stdout>Compacted (ctrl+o to see full summary)</local-command-stdout>\n",
    "Continue from where you left off.",
]
# The compaction request follows the last main turn (its appended instruction is ignored when hashing its parent).
EXPECTED_BRANCHES = {"main": MAIN_TURNS + 1, "subtask_1": 3, "branch_*": 1, "compact_*": 2}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# The workload
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    conversation: int
    kind: str  # main, subtask, branch, compaction, compacted
    session_id: str
    body: dict[str, Any]
    raw: bytes
    response: list[dict[str, Any]]  # the assistant content the fake upstream would stream back


@dataclass(frozen=True)
class ClaudeCode:
    """What every Claude Code 2.1.197 request carries: the system blocks and tools of the main thread and of a
    sub-agent (from the captured session), and the request headers worth recording."""

    main_system: list[dict[str, Any]]
    main_tools: list[dict[str, Any]]
    agent_system: list[dict[str, Any]]
    agent_tools: list[dict[str, Any]]
    headers: dict[str, str]

    @classmethod
    def load(cls) -> ClaudeCode:
        document = json.loads(FIXTURE.read_text())
        shared = document["shared"]

        def restore(items: list[Any]) -> list[Any]:
            return [shared[item["$shared"]] if isinstance(item, dict) and "$shared" in item else item for item in items]

        exchanges = {exchange["name"]: exchange for exchange in document["exchanges"]}
        main, agent = exchanges["turn1"], exchanges["agent1"]
        headers = {
            **main["headers"],
            "content-type": "application/json",
            "accept": "application/json",
            "x-stainless-lang": "js",
            "x-stainless-os": "Linux",
        }
        return cls(
            restore(main["body"]["system"]),
            restore(main["body"]["tools"]),
            restore(agent["body"]["system"]),
            restore(agent["body"]["tools"]),
            headers,
        )


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def user(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def assistant(content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def tool_result(tool_use_id: str, content: Any) -> dict[str, Any]:
    return user({"type": "tool_result", "tool_use_id": tool_use_id, "content": content})


@dataclass
class Builder:
    """Builds the requests of one conversation, as Claude Code would send them."""

    claude: ClaudeCode
    corpus: Corpus
    rng: random.Random
    number: int
    context_bytes: int  # the first message's pasted context: sizes the main thread's bodies
    agent_result_bytes: int  # each of the sub-agent's two tool results: sizes its bodies
    session_id: str = field(init=False)
    device: str = field(init=False)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.session_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.device = f"{self.rng.getrandbits(256):064x}"

    def tool_id(self) -> str:
        return f"toolu_01{self.rng.getrandbits(96):024x}"

    def billing(self, system: list[dict[str, Any]], first: dict[str, Any]) -> list[dict[str, Any]]:
        # Claude Code's billing header ends in three hex digits that follow the thread's first message: in the captured
        # session every request of the main thread (--continue and --resume too) carries the same ones, the
        # sub-agent and the conversation after the compaction others. Derived here from that first message.
        header = system[0]["text"].rsplit(";", 2)
        version, rest = header[0].rsplit(".", 1)[0], ";".join(header[1:])
        suffix = hashlib.sha256(compact(first)).hexdigest()[:3]
        return [text(f"{version}.{suffix};{rest}"), *system[1:]]

    def send(self, kind: str, messages: list[dict[str, Any]], response: list[dict[str, Any]], agent: bool) -> None:
        *earlier, last = messages
        *blocks, final = last["content"]
        marked = {**last, "content": [*blocks, {**final, "cache_control": {"type": "ephemeral"}}]}
        metadata = {"device_id": self.device, "account_uuid": "", "session_id": self.session_id}
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [*earlier, marked],
            "system": self.billing(self.claude.agent_system if agent else self.claude.main_system, messages[0]),
            "tools": self.claude.agent_tools if agent else self.claude.main_tools,
            "metadata": {"user_id": json.dumps(metadata, separators=(",", ":"))},
            "max_tokens": 32000,
            "thinking": {"type": "disabled"} if agent else {"budget_tokens": 31999, "type": "enabled"},
            "stream": True,
        }
        self.requests.append(Request(self.number, kind, self.session_id, body, compact(body), response))

    def work_turn(self, result_bytes: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """An answer with a Read or Bash call, and the user message with its result."""
        call = self.tool_id()
        path = self.rng.choice(self.corpus.files)[0]
        name = self.rng.choice(("Read", "Read", "Bash"))
        arguments = {"file_path": f"/home/user/project/{path}"} if name == "Read" else {"command": f"python {path}"}
        answer = [
            text(self.corpus.prose(self.rng, 400)),
            {"type": "tool_use", "id": call, "name": name, "input": arguments},
        ]
        return answer, tool_result(call, self.corpus.code(self.rng, result_bytes))

    def conversation(self) -> list[Request]:
        reminders = [text(f"<system-reminder>\n{self.corpus.prose(self.rng, 700)}\n</system-reminder>") for _ in "ab"]
        opening = f"Conversation {self.number}: {self.corpus.prose(self.rng, 200)}\n\n"
        messages = [user(*reminders, text(opening + self.corpus.code(self.rng, self.context_bytes)))]
        fork: list[dict[str, Any]] = []
        last_answer: list[dict[str, Any]] = []
        for turn in range(1, MAIN_TURNS + 1):
            if turn == BRANCH_FROM:
                fork = list(messages)
            if turn == AGENT_TURN:
                call, prompt = self.tool_id(), f"Investigate {self.corpus.prose(self.rng, 300)} [{self.session_id}]"
                agent_call = {"description": "Investigate", "prompt": prompt, "subagent_type": "general-purpose"}
                answer = [
                    text(self.corpus.prose(self.rng, 200)),
                    {"type": "tool_use", "id": call, "name": "Agent", "input": agent_call},
                ]
                self.send("main", list(messages), answer, agent=False)
                report = self.sub_agent(prompt)
                usage = "agentId: a6f52a951061f8bd8\n<usage>subagent_tokens: 15807\ntool_uses: 2</usage>"
                messages += [assistant(answer), tool_result(call, [text(report), text(usage)])]
                continue
            if turn == MAIN_TURNS:
                last_answer = [text(self.corpus.prose(self.rng, 600))]
                self.send("main", list(messages), last_answer, agent=False)
                break
            answer, result = self.work_turn(TURN_RESULT_BYTES)
            self.send("main", list(messages), answer, agent=False)
            messages += [assistant(answer), result]
            if turn == BRANCH_AFTER:
                retry = [
                    *fork,
                    assistant([text(self.corpus.prose(self.rng, 300))]),
                    user(text("No, do it another way.")),
                ]
                self.send("branch", retry, [text(self.corpus.prose(self.rng, 300))], agent=False)
        # Compaction: the conversation without its last answer, the instruction appended to the last user message.
        intent = f"Conversation {self.number}. {self.corpus.prose(self.rng, 3000)}"  # summaries differ
        summary = f"1. Primary Request and Intent:\n   {intent}\n\n2. Current Work:\n   done"
        reply = [
            text(f"<analysis>\n{self.corpus.prose(self.rng, 800)}\n</analysis>\n\n<summary>\n{summary}\n</summary>")
        ]
        *earlier, last = messages
        self.send(
            "compaction",
            [*earlier, {**last, "content": [*last["content"], text(COMPACT_INSTRUCTION)]}],
            reply,
            agent=False,
        )
        continuation = CONTINUATION.format(summary=summary, session=self.session_id)
        after = [
            user(reminders[0], text(continuation)),
            assistant(last_answer),
            user(*(text(line) for line in LOCAL_COMMAND)),
            assistant([text("No response requested.")]),
            user(text(self.corpus.prose(self.rng, 200))),
        ]
        for _ in range(2):
            answer = [text(self.corpus.prose(self.rng, 400))]
            self.send("compacted", list(after), answer, agent=False)
            after += [assistant(answer), user(text(self.corpus.prose(self.rng, 200)))]
        return self.requests

    def sub_agent(self, prompt: str) -> str:
        messages = [
            user(text(f"<system-reminder>\n{self.corpus.prose(self.rng, 700)}\n</system-reminder>"), text(prompt))
        ]
        for _ in range(2):
            answer, result = self.work_turn(self.agent_result_bytes)
            self.send("subtask", list(messages), answer, agent=True)
            messages += [assistant(answer), result]
        report = self.corpus.prose(self.rng, 800)
        self.send("subtask", list(messages), [text(report)], agent=True)
        return report


def build_workload(
    claude: ClaudeCode, corpus: Corpus, requests: int, body_bytes: int, sessions: int, seed: int
) -> list[Request]:
    """Whole conversations, at least `requests` requests, mean body ~`body_bytes`.

    `sessions` conversations run at once: each request comes from one of them at random, and a finished
    conversation's place is taken by the next one (so conversations start and end at different times).
    """
    rng = random.Random(seed)
    main_base = len(compact(claude.main_system)) + len(compact(claude.main_tools)) + 1_500
    agent_base = len(compact(claude.agent_system)) + len(compact(claude.agent_tools)) + 2_000
    turn_bytes = TURN_RESULT_BYTES + 900
    # Main turn t carries the context plus t - 1 turns: mean over the turns = context + 6 turns.
    context = max(1_000, body_bytes - main_base - (MAIN_TURNS - 1) * turn_bytes // 2)
    # The sub-agent's requests carry 0, 1 and 2 results: mean = 1 result.
    agent_result = max(1_000, body_bytes - agent_base)
    # The two turns after a compaction are small (the summary replaces the history): make up for them.
    probe = Builder(claude, corpus, random.Random(seed), -1, context, agent_result).conversation()
    deficit = (body_bytes - statistics.fmean(len(request.raw) for request in probe)) * len(probe)
    others = sum(1 for request in probe if request.kind != "compacted")
    context += int(deficit / others)
    agent_result += int(deficit / others)
    conversations: list[list[Request]] = []
    total = 0
    while total < requests:
        builder = Builder(claude, corpus, random.Random(rng.getrandbits(64)), len(conversations), context, agent_result)
        conversation = builder.conversation()
        conversations.append(conversation)
        total += len(conversation)
    waiting = [iter(conversation) for conversation in conversations]
    waiting.reverse()
    active = [waiting.pop() for _ in range(min(sessions, len(waiting)))]
    ordered: list[Request] = []
    while active:
        index = rng.randrange(len(active))
        request = next(active[index], None)
        if request is not None:
            ordered.append(request)
        elif waiting:
            active[index] = waiting.pop()
        else:
            active.pop(index)
    return ordered


def records(workload: Sequence[Request], claude: ClaudeCode, start: datetime) -> list[ExchangeRecord]:
    """What the proxy's request path hands to `submit`, one per request (times strictly increasing)."""
    out = []
    now = time.perf_counter()
    for index, request in enumerate(workload):
        message = build_message(
            message_id=f"msg_{uuid.uuid4().hex[:24]}",
            model=MODEL,
            content=request.response,
            stop_reason="tool_use" if any(block["type"] == "tool_use" for block in request.response) else "end_turn",
            usage=compute_usage(None, len(request.raw), request.response),
        )
        events = build_sse_events(message)
        out.append(
            ExchangeRecord(
                request_id=new_request_id(),
                started_at=start + timedelta(milliseconds=index),
                started=now,
                method="POST",
                path="/v1/messages?beta=true",
                train_id="default",
                account_id="passthrough",
                request_headers={**claude.headers, "x-claude-code-session-id": request.session_id},
                request_body=request.raw,
                model=MODEL,
                stream=True,
                session_id=request.session_id,
                status_code=200,
                response_headers={"content-type": "text/event-stream; charset=utf-8", "request-id": f"req_{index}"},
                content_type="text/event-stream; charset=utf-8",
                chunks=[(now + 0.2 + position * 0.001, event) for position, event in enumerate(events)],
                upstream_sent=now + 0.001,
                upstream_headers=now + 0.15,
                finished=now + 0.3,
                overhead_ms=0.4,
                parsed_body=request.body,
            )
        )
    return out


# --------------------------------------------------------------------------------------------------------
# Measuring the writer
# --------------------------------------------------------------------------------------------------------


@dataclass
class Busy:
    """Time spent inside one wrapped function (summed over calls, which may overlap with other lanes)."""

    calls: int = 0
    seconds: float = 0.0
    thread_cpu: float = 0.0


class Probes:
    """Wraps the writer's converter, metadata lane, linking and payload lane to time them."""

    def __init__(self) -> None:
        self.convert = Busy()
        self.apply = Busy()
        self.link = Busy()
        self.payloads = Busy()
        self._restore: list[Callable[[], None]] = []

    def install(self) -> None:
        convert = writer_module._convert

        def timed_convert(*args: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return convert(*args)
            finally:
                self.convert.calls += 1
                self.convert.seconds += time.perf_counter() - wall
                self.convert.thread_cpu += time.thread_time() - cpu

        self._patch(writer_module, "_convert", timed_convert)
        self._patch(linking_store, "link_row", self._timed(linking_store.link_row, self.link))
        self._patch(RequestWriter, "_apply_entries", self._timed(RequestWriter._apply_entries, self.apply))
        self._patch(RequestWriter, "_insert_payloads", self._timed(RequestWriter._insert_payloads, self.payloads))

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        original = getattr(owner, name)
        setattr(owner, name, replacement)
        self._restore.append(lambda: setattr(owner, name, original))

    @staticmethod
    def _timed(function: Callable[..., Awaitable[Any]], busy: Busy) -> Callable[..., Awaitable[Any]]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                busy.calls += 1
                busy.seconds += time.perf_counter() - start

        return timed

    def uninstall(self) -> None:
        while self._restore:
            self._restore.pop()()


def written(lane: str) -> float:
    return REGISTRY.get_sample_value("prompttrain_records_written_total", {"lane": lane}) or 0.0


def shed() -> float:
    return REGISTRY.get_sample_value("prompttrain_payloads_shed_total") or 0.0


async def wait_written(lane: str, target: float, timeout: float) -> float | None:
    """Seconds (perf_counter) when the lane's written count reached `target`; None on timeout.

    Polled every 20 ms: reading the registry collects every metric (process metrics from /proc included), which at a
    faster pace showed up in the profile.
    """
    deadline = time.perf_counter() + timeout
    while written(lane) < target:
        if time.perf_counter() > deadline:
            return None
        await asyncio.sleep(0.02)
    return time.perf_counter()


def new_writer(engine: Any, directory: Path, payload_budget: int) -> RequestWriter:
    # The proxy's defaults (settings.py): batches of 200, a 50 ms flush interval.
    return RequestWriter(
        engine,
        Spool(directory / "spool", 1 << 30),
        batch_size=200,
        flush_seconds=0.05,
        payload_memory_bytes=payload_budget,
    )


async def throughput(
    database_url: str, workload: Sequence[Request], claude: ClaudeCode, timeout: float
) -> dict[str, Any]:
    """(a): submit every record at once; time until all rows (then all payloads) are committed."""
    url = normalise_database_url(database_url)
    await migrate(url)
    engine = create_engine(url)
    probes = Probes()
    with tempfile.TemporaryDirectory(prefix="linking-bench-") as directory:
        budget = sum(len(request.raw) for request in workload) * 2 + (64 << 20)
        writer = new_writer(engine, Path(directory), budget)
        writer.start()
        await asyncio.sleep(1.0)  # the partition check runs at start: not part of the measurement
        batch = records(workload, claude, datetime.now(UTC) - timedelta(milliseconds=len(workload) + 1000))
        rows0, payloads0, shed0 = written("metadata"), written("payload"), shed()
        probes.install()
        cpu0 = time.process_time()
        submit_ns = []
        start = time.perf_counter()
        for record in batch:
            before = time.perf_counter_ns()
            writer.submit(record)
            submit_ns.append(time.perf_counter_ns() - before)
        rows_done = await wait_written("metadata", rows0 + len(batch), timeout)
        payloads_done = await wait_written("payload", payloads0 + len(batch), timeout)
        cpu = time.process_time() - cpu0
        probes.uninstall()
        await writer.stop(30)
        try:
            checks = await check_links(engine, workload, batch)
        finally:
            await engine.dispose()
    return {
        **rows_rate(len(batch), start, rows_done),
        "payloads_seconds": None if payloads_done is None else payloads_done - start,
        "payloads_shed": shed() - shed0,
        "process_cpu_seconds": cpu,
        "submit_us": summary_us(submit_ns),
        "converter": vars(probes.convert),
        "metadata_lane": vars(probes.apply),
        "linking": vars(probes.link),
        "payload_lane": vars(probes.payloads),
        "checks": checks,
    }


def recorder_settings(database_url: str, directory: Path, payload_budget: int) -> Settings:
    """The proxy's defaults, but this database, a temporary data directory and the given payload budget."""
    return Settings(
        database_url=database_url,
        data_dir=directory,
        writer_payload_memory_bytes=payload_budget,
        log_level="warning",
    )


async def count_rows(engine: Any) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(sa.text("SELECT count(*) FROM api_requests"))).scalar_one())


async def recorder_throughput(
    database_url: str, workload: Sequence[Request], claude: ClaudeCode, timeout: float
) -> dict[str, Any]:
    """(0): the proxy's set-up: submit every record at once to the recording process; time until all is stored."""
    url = normalise_database_url(database_url)
    await migrate(url)
    engine = create_engine(url)
    try:
        with tempfile.TemporaryDirectory(prefix="linking-bench-") as directory:
            budget = sum(len(request.raw) for request in workload) * 3 + (64 << 20)
            recorder = RecordingProcesses(recorder_settings(url, Path(directory), budget))
            await recorder.start()
            await asyncio.sleep(1.0)  # the partition check runs at start: not part of the measurement
            batch = records(workload, claude, datetime.now(UTC) - timedelta(milliseconds=len(workload) + 1000))
            rows0 = await count_rows(engine)
            submit_ns = []
            start = time.perf_counter()
            for record in batch:
                before = time.perf_counter_ns()
                recorder.submit(record)
                submit_ns.append(time.perf_counter_ns() - before)
            rows_done = payloads_done = None
            deadline = start + timeout
            while time.perf_counter() < deadline:
                if rows_done is None and await count_rows(engine) >= rows0 + len(batch):
                    rows_done = time.perf_counter()
                if recorder.pending == 0:
                    payloads_done = time.perf_counter()
                    if rows_done is None and await count_rows(engine) >= rows0 + len(batch):
                        rows_done = payloads_done
                    break
                await asyncio.sleep(0.02)
            await recorder.stop(30)
            checks = await check_links(engine, workload, batch)
    finally:
        await engine.dispose()
    return {
        **rows_rate(len(batch), start, rows_done),
        "confirmed_seconds": None if payloads_done is None else payloads_done - start,
        "submit_us": summary_us(submit_ns),
        "checks": checks,
    }


def rows_rate(requests: int, start: float, rows_done: float | None) -> dict[str, Any]:
    """How long until every row was committed, and the rate that makes (None: not before the timeout)."""
    elapsed = None if rows_done is None else rows_done - start
    return {
        "requests": requests,
        "rows_seconds": elapsed,
        "rows_per_second": None if elapsed is None else requests / elapsed,
    }


async def check_links(engine: Any, workload: Sequence[Request], batch: Sequence[ExchangeRecord]) -> dict[str, Any]:
    """Did linking come out right? One conversation per generated one, and the expected branches in each."""
    conversation_of = {record.request_id: request.conversation for record, request in zip(batch, workload, strict=True)}
    async with engine.connect() as connection:
        result = await connection.execute(sa.text("SELECT request_id, conversation_id, branch_id FROM api_requests"))
        rows = result.all()
    ids: dict[int, set[str]] = defaultdict(set)
    branches: dict[int, Counter[str]] = defaultdict(Counter)
    for row in rows:
        generated = conversation_of.get(uuid.UUID(str(row.request_id)))
        if generated is not None:
            ids[generated].add(str(row.conversation_id))
            branch = str(row.branch_id)
            branches[generated][next((p + "*" for p in ("branch_", "compact_") if branch.startswith(p)), branch)] += 1
    every = [identifier for found in ids.values() for identifier in found]
    return {
        "rows": sum(sum(counts.values()) for counts in branches.values()),
        "conversations": len(set(every)),
        "split": sum(1 for found in ids.values() if len(found) != 1),
        "merged": len(every) - len(set(every)),
        "unexpected_branches": sum(1 for counts in branches.values() if dict(counts) != EXPECTED_BRANCHES),
    }


async def request_path(
    database_url: str, workload: Sequence[Request], claude: ClaudeCode, rate: float, timeout: float
) -> dict[str, Any]:
    """(b): submit at `rate`/s to the recording process; the cost of each submit call, and the backlog."""
    url = normalise_database_url(database_url)
    engine = create_engine(url)
    try:
        with tempfile.TemporaryDirectory(prefix="linking-bench-") as directory:
            # The proxy's default budget.
            recorder = RecordingProcesses(recorder_settings(url, Path(directory), 256 << 20))
            await recorder.start()
            await asyncio.sleep(1.0)
            batch = records(workload, claude, datetime.now(UTC) - timedelta(milliseconds=len(workload) + 1000))
            rows0 = await count_rows(engine)
            submit_ns, backlog, shed_count = [], [], 0
            start = time.perf_counter()
            for index, record in enumerate(batch):
                delay = start + index / rate - time.perf_counter()
                await asyncio.sleep(max(delay, 0))
                before = time.perf_counter_ns()
                recorder.submit(record)
                submit_ns.append(time.perf_counter_ns() - before)
                shed_count += record.payload_shed
                backlog.append(recorder.pending)
            offered = time.perf_counter() - start
            done = None
            while time.perf_counter() < start + offered + timeout:
                if await count_rows(engine) >= rows0 + len(batch):
                    done = time.perf_counter()
                    break
                await asyncio.sleep(0.02)
            await recorder.stop(30)
    finally:
        await engine.dispose()
    return {
        "requests": len(batch),
        "offered_per_second": len(batch) / offered,
        "drain_after_last_submit_seconds": None if done is None else done - start - offered,
        "max_backlog": max(backlog),
        "payloads_shed": shed_count,
        "submit_us": summary_us(submit_ns),
    }


async def stages_alone(database_url: str, workload: Sequence[Request], claude: ClaudeCode) -> dict[str, Any]:
    """Each stage of the writer by itself, one after the other, on a fresh database: what bounds each one."""
    url = normalise_database_url(database_url)
    await migrate(url)
    engine = create_engine(url)
    probes = Probes()
    try:
        with tempfile.TemporaryDirectory(prefix="linking-bench-") as directory:
            writer = new_writer(engine, Path(directory), 1 << 40)  # never started: its lanes are called directly
            batch = records(workload, claude, datetime.now(UTC) - timedelta(milliseconds=len(workload) + 1000))
            built, convert_ms = [], []
            for record in batch:  # what the converter thread does, record by record
                began = time.perf_counter()
                built.append(build_rows(record))
                convert_ms.append((time.perf_counter() - began) * 1000)
            entries = [{"op": "insert", "row": rows.metadata} for rows in built]
            probes.install()
            began = time.perf_counter()
            for offset in range(0, len(entries), writer.batch_size):  # the metadata lane's batches
                await writer._apply_entries(entries[offset : offset + writer.batch_size])
            metadata_seconds = time.perf_counter() - began
            payloads = [rows.payload for rows in built if rows.payload is not None]
            began = time.perf_counter()
            while payloads:  # the payload lane's batches: 200 rows or 8 MB
                size, count = 0, 0
                while count < min(len(payloads), writer.batch_size) and size < writer_module.PAYLOAD_BATCH_BYTES:
                    size += payloads[count].size
                    count += 1
                await writer._insert_payloads(payloads[:count])
                payloads = payloads[count:]
            payload_seconds = time.perf_counter() - began
            probes.uninstall()
    finally:
        await engine.dispose()
    count = len(batch)
    return {
        "convert_ms": {
            "mean": statistics.fmean(convert_ms),
            "p50": percentile(convert_ms, 0.5),
            "p99": percentile(convert_ms, 0.99),
        },
        "metadata_per_second": count / metadata_seconds,
        "metadata_ms": metadata_seconds / count * 1000,
        "link_ms": probes.link.seconds / count * 1000,
        "payload_per_second": count / payload_seconds,
        "payload_ms": payload_seconds / count * 1000,
    }


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary_us(nanoseconds: Sequence[int]) -> dict[str, float]:
    micro = [value / 1000 for value in nanoseconds]
    return {
        "mean": statistics.fmean(micro),
        "p50": percentile(micro, 0.5),
        "p99": percentile(micro, 0.99),
        "max": max(micro),
    }


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def print_throughput(name: str, result: dict[str, Any]) -> None:
    count = result["requests"]
    rate = result["rows_per_second"]
    print(f"\n{name}: {count} requests submitted at once")
    if rate is None:
        print("  rows: not all committed before the timeout")
    else:
        print(f"  api_requests rows committed in {result['rows_seconds']:.2f} s = {rate:.0f} requests/s")
    if result["payloads_seconds"] is not None:
        payload_rate = count / result["payloads_seconds"]
        print(f"  request_payloads committed in {result['payloads_seconds']:.2f} s = {payload_rate:.0f} requests/s")
    print(f"  payloads shed: {result['payloads_shed']:.0f}; process CPU {result['process_cpu_seconds']:.2f} s")
    print("  busy time (lanes overlap; per request in ms):")
    for label, key in (
        ("converter thread (parse SSE, hashes, content addressing)", "converter"),
        ("metadata lane (link + insert + commit)", "metadata_lane"),
        ("  of which link_row (linking queries)", "linking"),
        ("payload lane (blobs + request_payloads)", "payload_lane"),
    ):
        busy = result[key]
        extra = f", thread CPU {busy['thread_cpu']:.2f} s" if key == "converter" else ""
        print(f"    {label:58} {busy['seconds']:6.2f} s  {busy['seconds'] / count * 1000:6.3f} ms{extra}")
    checks = result["checks"]
    ok = not (checks["split"] or checks["merged"] or checks["unexpected_branches"]) and checks["rows"] == count
    print(
        f"  links: {checks['rows']} rows in {checks['conversations']} conversations; {checks['split']} split, "
        f"{checks['merged']} merged, {checks['unexpected_branches']} with other branches than "
        f"{EXPECTED_BRANCHES} -> {'OK' if ok else 'WRONG'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--body-kb", type=int, default=200, help="mean request body size")
    parser.add_argument("--sessions", type=int, default=25, help="conversations in progress at any time")
    parser.add_argument("--rate", type=float, default=TARGET_PER_SECOND, help="offered load of the request-path run")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="a PostgreSQL server to create a database on")
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite run")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up waiting for rows after this")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)

    log("building the workload…")
    claude, corpus = ClaudeCode.load(), Corpus.load()
    workload = build_workload(claude, corpus, args.requests, args.body_kb * 1024, args.sessions, args.seed)
    paced = build_workload(claude, corpus, args.requests, args.body_kb * 1024, args.sessions, args.seed + 1)
    sizes = [len(request.raw) for request in workload]
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average": os.getloadavg()},
        "workload": {
            "requests": len(workload),
            "conversations": len({request.conversation for request in workload}),
            "mean_kb": statistics.fmean(sizes) / 1024,
            "min_kb": min(sizes) / 1024,
            "max_kb": max(sizes) / 1024,
            "kinds": {kind: sum(1 for r in workload if r.kind == kind) for kind in sorted({r.kind for r in workload})},
        },
    }
    for phase in ("throughput", "stages"):
        database = TempDatabase(args.admin_url, name=f"prompttrain_linkbench_{os.getpid()}_{uuid.uuid4().hex[:6]}")
        log(f"PostgreSQL ({phase}): temporary database {database.name}")
        database.create()
        try:
            if phase == "stages":
                report["stages"] = asyncio.run(stages_alone(database.url, workload, claude))
                continue
            database.checkpoint()
            log("the recording process…")
            report["recorder"] = asyncio.run(recorder_throughput(database.url, workload, claude, args.timeout))
            log("the writer in this process, stage by stage…")
            report["postgres"] = asyncio.run(throughput(database.url, workload, claude, args.timeout))
            log("request path: paced submission…")
            report["request_path"] = asyncio.run(request_path(database.url, paced, claude, args.rate, args.timeout))
        finally:
            database.drop()
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory(prefix="linking-bench-sqlite-") as directory:
            log("SQLite…")
            report["sqlite"] = asyncio.run(
                throughput(f"sqlite:///{directory}/bench.db", workload, claude, args.timeout)
            )

    shape = report["workload"]
    print(
        f"workload: {shape['requests']} requests in {shape['conversations']} conversations {shape['kinds']}; bodies "
        f"{shape['mean_kb']:.0f} KB mean ({shape['min_kb']:.0f}-{shape['max_kb']:.0f} KB); "
        f"{report['machine']['cpus']} CPUs, load average {report['machine']['load_average'][0]:.1f}"
    )
    recorded = report["recorder"]
    checks = recorded["checks"]
    links_ok = not (checks["split"] or checks["merged"] or checks["unexpected_branches"]) and (
        checks["rows"] == recorded["requests"]
    )
    print(
        f"\nPostgreSQL, the proxy's recording process: {recorded['requests']} requests submitted at once; rows "
        f"committed in {recorded['rows_seconds'] or float('nan'):.2f} s = {recorded['rows_per_second'] or 0:.0f} "
        f"requests/s; all confirmed (payloads too) in {recorded['confirmed_seconds'] or float('nan'):.2f} s; "
        f"submit {recorded['submit_us']['p50']:.1f} µs p50; links {'OK' if links_ok else 'WRONG'}"
    )
    print_throughput("PostgreSQL, the writer in this process", report["postgres"])
    if "sqlite" in report:
        print_throughput("SQLite", report["sqlite"])
    path = report["request_path"]
    submit = path["submit_us"]
    conversion = report["stages"]["convert_ms"]
    drain = path["drain_after_last_submit_seconds"] or float("nan")
    print(
        f"\nrequest path: {path['requests']} submits at {path['offered_per_second']:.0f}/s while the writer works: "
        f"submit {submit['p50']:.1f} µs p50, {submit['p99']:.1f} µs p99, {submit['max']:.0f} µs max; "
        f"max backlog {path['max_backlog']}, rows all in {drain:.2f} s after the last submit, "
        f"payloads shed {path['payloads_shed']:.0f}"
    )
    print(
        f"  for comparison, converting one record (SSE, hashes, linking facts, content addressing) takes "
        f"{conversion['p50']:.2f} ms p50 / {conversion['p99']:.2f} ms p99 — in the recording process, not here"
    )
    stages = report["stages"]
    print(
        f"\nPostgreSQL, each writer stage alone (one after the other, fresh database): converter "
        f"{conversion['mean']:.2f} ms/record (= {1000 / conversion['mean']:.0f}/s on one core); metadata lane "
        f"{stages['metadata_ms']:.2f} ms/row (= {stages['metadata_per_second']:.0f}/s), of which link_row "
        f"{stages['link_ms']:.2f} ms; payload lane {stages['payload_ms']:.2f} ms/row (= "
        f"{stages['payload_per_second']:.0f}/s)"
    )
    rate = report["recorder"]["rows_per_second"]
    verdict = "PASS" if rate is not None and rate >= TARGET_PER_SECOND and links_ok else "MISS"
    print(
        f"\n{verdict}: the recording process links {rate or 0:.0f} requests/s of ~{shape['mean_kb']:.0f} KB into "
        "PostgreSQL (target >= 500)"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
