"""The proxy's side of recording: hand each exchange to the recording process, never wait for it.

`submit` (on the request path) pickles the record and writes it to the recorder's socket; the event loop's
transport buffers whatever the socket cannot take at once, so it never blocks. The record is kept until the
recorder reports it DONE (stored, or spooled); if the recorder dies, a new one is started and every kept record is
sent again. Kept records are budgeted by WRITER_PAYLOAD_MEMORY_BYTES: past it, the proxy sheds the request body
before sending (the metadata row, with tokens and cost, is always sent; it is marked `payload_shed` and, without
its body, cannot be linked into a conversation).

The recorder owns the writer's, usage, Slack and telemetry metrics; `/metrics` asks it for them at each scrape
(`exposition`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import sys
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from prompttrain import metrics
from prompttrain.credentials import SlackSettings
from prompttrain.notifications.observer import NoticeSink
from prompttrain.settings import Settings
from prompttrain.storage import recorder_wire as wire
from prompttrain.storage.records import ExchangeRecord

log = logging.getLogger(__name__)

RESTART_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
METRICS_TIMEOUT_SECONDS = 2.0
START_TIMEOUT_SECONDS = 60.0
SEND_CHUNK_BYTES = 1 << 20
TRANSPORT_HIGH_WATER_BYTES = 4 << 20
STOP_MARGIN_SECONDS = 10.0
SESSIONS_REMEMBERED = 100_000  # which recording process each recent Claude Code session went to

_RECORDER_FAMILIES = frozenset(family.name for metric in metrics.RECORDER_METRICS for family in metric.describe())


class Recorder:
    def __init__(self, settings: Settings, notices: NoticeSink | None = None) -> None:
        self.settings = settings
        self.notices = notices
        self.budget = settings.writer_payload_memory_bytes
        self._trains: dict[str, SlackSettings | None] = {}  # sent to every new recording process
        self._kept: OrderedDict[uuid.UUID, tuple[list[bytes], int]] = OrderedDict()
        self._kept_bytes = 0
        # Frames not yet handed to the socket, in order. A sender task hands them over while the socket keeps up,
        # so the transport's own buffer stays small (large transport buffers cost CPU on every partial write).
        self._unsent: deque[list[bytes]] = deque()
        self._unsent_ready = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._out: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._tokens = itertools.count(1)
        self._families: list[Metric] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    # -- the request path ---------------------------------------------------------------------------------------

    def submit(self, record: ExchangeRecord) -> None:
        try:
            if record.request_body and self._kept_bytes + record.size > self.budget:
                record.request_body = None
                record.payload_shed = True
            frame = wire.encode(wire.RECORD, record)
            size = wire.frame_size(frame)
            self._kept[record.request_id] = (frame, size)
            self._kept_bytes += size
            self._write(frame)
        except Exception:  # recording must never fail a response
            log.exception("could not hand request %s to the recorder", record.request_id)

    def _write(self, frame: list[bytes]) -> None:
        """Queue a frame for the sender (after everything queued before it: nothing overtakes a record)."""
        self._unsent.append(frame)
        self._unsent_ready.set()

    async def _send_forever(self) -> None:
        while True:
            await self._unsent_ready.wait()
            self._unsent_ready.clear()
            out = self._out
            if out is None:
                continue  # a new recorder is being started: `_spawn` queues everything again
            try:
                while self._unsent and self._out is out:
                    # Under load, one system call carries many records.
                    parts: list[bytes] = []
                    size = 0
                    while self._unsent and size < SEND_CHUNK_BYTES:
                        frame = self._unsent.popleft()
                        parts.extend(frame)
                        size += wire.frame_size(frame)
                    out.writelines(parts)
                    await out.drain()
            except (ConnectionError, RuntimeError) as error:
                log.warning("the recording process stopped reading (%s)", error)

    # -- lifecycle ----------------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Exchanges submitted and not yet stored (or spooled) by the recorder."""
        return len(self._kept)

    @property
    def kept_bytes(self) -> int:
        return self._kept_bytes

    async def start(self) -> None:
        """Start the recording process and wait until it is ready (a broken one fails the proxy's start-up)."""
        await self._spawn()
        assert self._reader is not None
        try:
            frame = await asyncio.wait_for(wire.read_frame(self._reader), START_TIMEOUT_SECONDS)
        except TimeoutError:
            frame = None
        if frame is None or frame[0] != wire.READY:
            if self._process is not None and self._process.returncode is None:
                self._process.kill()
            raise RuntimeError("the recording process did not start; its log is above")
        self._supervisor = asyncio.create_task(self._supervise(), name="recorder-supervisor")

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "prompttrain.storage.recorder_process",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._reader, self._out = await asyncio.open_unix_connection(sock=ours)
        self._out.transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER_BYTES)
        # Everything not yet stored, in order (after a restart, records the previous recorder had not confirmed).
        self._unsent.clear()
        self._unsent.append(wire.encode(wire.HELLO, self.settings))
        self._unsent.append(wire.encode(wire.TRAINS, self._trains))
        self._unsent.extend(frame for frame, _ in self._kept.values())
        self._unsent_ready.set()
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_forever(), name="recorder-sender")

    async def _supervise(self) -> None:
        for attempt in itertools.count():
            assert self._reader is not None
            await self._read_replies(self._reader)
            self._out = None
            for future in self._replies.values():
                if not future.done():
                    future.set_result(None)
            self._replies.clear()
            process = self._process
            code = None
            if process is not None:
                with contextlib.suppress(TimeoutError):
                    code = await asyncio.wait_for(process.wait(), timeout=STOP_MARGIN_SECONDS)
            if self._stopping:
                self._stopped.set()
                return
            metrics.RECORDER_RESTARTS.inc()
            delay = RESTART_DELAYS[min(attempt, len(RESTART_DELAYS) - 1)]
            log.error(
                "the recording process exited (code %s); starting another in %.1fs and sending it the %d "
                "requests not yet stored",
                code,
                delay,
                len(self._kept),
            )
            await asyncio.sleep(delay)
            try:
                await self._spawn()
            except OSError:
                log.exception("could not start the recording process")

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        while (frame := await wire.read_frame(reader)) is not None:
            kind, payload = frame
            if kind == wire.DONE:
                self._forget(payload)
            elif kind in (wire.FLUSHED, wire.METRICS):
                token, answer = payload
                future = self._replies.pop(token, None)
                if future is not None and not future.done():
                    future.set_result(answer)
            elif kind == wire.NOTICE:
                if self.notices is not None:
                    self.notices.offer(payload)
            elif kind == wire.STOPPED:
                self._stopped.set()

    def _forget(self, request_ids: Iterable[uuid.UUID]) -> None:
        for request_id in request_ids:
            kept = self._kept.pop(request_id, None)
            if kept is not None:
                self._kept_bytes -= kept[1]

    async def _ask(self, kind: str, argument: Any, timeout: float) -> Any:
        """Send a request frame and wait for its answer; None if the recorder is gone or too slow."""
        out = self._out
        if out is None or out.is_closing():
            return None
        token = next(self._tokens)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[token] = future
        self._write(wire.encode(kind, (token, argument) if kind == wire.FLUSH else token))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            self._replies.pop(token, None)

    async def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted is stored (or, while the database is down, spooled)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            stored = await self._ask(wire.FLUSH, remaining, remaining + 1.0)
            if stored is not None:
                return bool(stored)
            await asyncio.sleep(0.05)  # the recorder is restarting
        return False

    def update_trains(self, trains: Mapping[str, SlackSettings | None]) -> None:
        self._trains = dict(trains)
        self._write(wire.encode(wire.TRAINS, self._trains))

    async def stop(self, timeout: float = 30.0) -> None:
        """The recorder writes what it holds within `timeout` (then spools it) and exits."""
        self._stopping = True
        self._write(wire.encode(wire.STOP, timeout))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), timeout + STOP_MARGIN_SECONDS)
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), STOP_MARGIN_SECONDS)
            if process.returncode is None:
                log.error("the recording process did not exit: killing it")
                process.kill()
                await process.wait()
        for task in (self._supervisor, self._sender):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._kept:
            log.error("%d requests were not stored before shutdown", len(self._kept))

    # -- metrics ------------------------------------------------------------------------------------------------

    async def metric_families(self) -> list[Metric]:
        """The recorder's metrics now (or as last reported, if it does not answer in time)."""
        families = await self._ask(wire.METRICS, None, METRICS_TIMEOUT_SECONDS)
        if families is not None:
            self._families = families
        return self._families


class RecordingProcesses:
    """WRITER_PROCESSES recording processes; each Claude Code session's exchanges go to the same one.

    A session is given to the process with the fewest unconfirmed exchanges when its first request arrives, and
    stays there: a conversation's requests reach the database in order through one writer (as with one process),
    its messages meet that writer's memory of what it normalised before, and sessions spread over the processes.
    Requests without a session id go to the least busy process. Linking across processes is safe as it is across
    replicas (storage/linking_store.py). The payload budget is shared out between them.
    """

    def __init__(self, settings: Settings, notices: NoticeSink | None = None) -> None:
        count = settings.writer_processes
        budget = settings.writer_payload_memory_bytes // count
        share = settings.model_copy(update={"writer_payload_memory_bytes": budget})
        self.recorders = [Recorder(share, notices=notices) for _ in range(count)]
        self._sessions: OrderedDict[str, Recorder] = OrderedDict()

    def _for(self, record: ExchangeRecord) -> Recorder:
        if len(self.recorders) == 1:
            return self.recorders[0]
        session = record.session_id
        recorder = self._sessions.get(session) if session else None
        if recorder is None:
            recorder = min(self.recorders, key=lambda candidate: candidate.pending)
            if session:
                self._sessions[session] = recorder
                if len(self._sessions) > SESSIONS_REMEMBERED:
                    self._sessions.popitem(last=False)
        elif session:
            self._sessions.move_to_end(session)
        return recorder

    def submit(self, record: ExchangeRecord) -> None:
        self._for(record).submit(record)

    @property
    def pending(self) -> int:
        return sum(recorder.pending for recorder in self.recorders)

    async def start(self) -> None:
        await asyncio.gather(*(recorder.start() for recorder in self.recorders))
        metrics.RECORDER_KEPT_BYTES.set_function(lambda: float(sum(r.kept_bytes for r in self.recorders)))

    async def flush(self, timeout: float = 30.0) -> bool:
        return all(await asyncio.gather(*(recorder.flush(timeout) for recorder in self.recorders)))

    def update_trains(self, trains: Mapping[str, SlackSettings | None]) -> None:
        for recorder in self.recorders:
            recorder.update_trains(trains)

    async def stop(self, timeout: float = 30.0) -> None:
        await asyncio.gather(*(recorder.stop(timeout) for recorder in self.recorders))

    async def metric_families(self) -> list[Metric]:
        reports = await asyncio.gather(*(recorder.metric_families() for recorder in self.recorders))
        return merge_families(reports)


# Per-account readings of the latest response (a ratio, a time, a 0/1 status): the highest across processes. Every
# other recorder metric is a count or a size, summed.
_LATEST_READINGS = frozenset(
    family.name
    for metric in (metrics.WINDOW_UTILIZATION, metrics.WINDOW_RESET, metrics.WINDOW_STATUS)
    for family in metric.describe()
)


def merge_families(reports: Sequence[list[Metric]]) -> list[Metric]:
    """One set of metric families from several recording processes' (the same families, each process's values)."""
    if len(reports) == 1:
        return reports[0]
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in reports:
        for family in families:
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            combine = max if family.name in _LATEST_READINGS else sum
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = combine((samples[key], sample.value)) if key in samples else sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        for family in REGISTRY.collect():
            if family.name not in _RECORDER_FAMILIES:
                yield family
        yield from self.families


def exposition(recorder_families: list[Metric] | None) -> bytes:
    """This process's metrics in the text format, the recorder's in place of this process's unused copies."""
    if recorder_families is None:
        return generate_latest()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(recorder_families))
    return generate_latest(registry)
