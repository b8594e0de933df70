"""The recording process: the proxy's background writer, in a process of its own.

Started by the proxy (`storage/recorder.py`) with one end of a socket pair; run as
`python -m prompttrain.storage.recorder_process FD`. Parsing, hashing, linking, pricing and the database writes of
every exchange happen here, on another core than the request path and without competing for its GIL. The proxy
keeps each exchange it sent until this process reports it DONE, so a crash here loses nothing: the proxy starts
a new recorder and sends them again (inserts are idempotent).

Signals are the proxy's business: SIGINT/SIGTERM are ignored here, and the proxy says STOP when its own drain is
over. If the proxy disappears (the socket ends), queued records are written, or spooled, and the process exits.
Each recorder spools into a locked directory of its own; the spools of recorders that have ended (a killed
proxy's, after it finished) are adopted and replayed (`storage/spool.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import uuid
from typing import IO, Any

from prompttrain import metrics
from prompttrain.conversation.pricing import load_pricing, use_pricing
from prompttrain.notifications.observer import SlackObserver, TrainSlack
from prompttrain.notifications.sender import Notice
from prompttrain.proxy import exchange_metrics
from prompttrain.settings import Settings
from prompttrain.storage import recorder_wire as wire
from prompttrain.storage.engine import create_engine
from prompttrain.storage.records import ExchangeRecord
from prompttrain.storage.spool import Spool, claim
from prompttrain.storage.writer import Observer, RequestWriter
from prompttrain.telemetry import TelemetrySender

log = logging.getLogger(__name__)

READ_BUFFER_BYTES = 4 << 20
ADOPT_SECONDS = 5.0  # how often to look for spools left by recorders that have ended
GC_YOUNG_THRESHOLD = 50_000  # allocations between young-generation collections (the default is 700)


class RecordingService:
    def __init__(self, settings: Settings, out: asyncio.StreamWriter) -> None:
        self.settings = settings
        self.out = out
        self.trains: TrainSlack = {}
        self.engine = create_engine(settings.database_url)
        endpoint = settings.telemetry_endpoint
        self.telemetry = TelemetrySender(str(endpoint)) if endpoint else None
        # Notifications go to the proxy, whose one Slack sender keeps each webhook's queue and rate whatever the
        # number of recording processes.
        observers: list[Observer] = [exchange_metrics.UsageMeter(), SlackObserver(self, settings, self._trains)]
        if self.telemetry is not None:
            observers.append(self.telemetry)
        self.spool_root = settings.data_dir / "spool"

        self._spool_lock: IO[bytes] | None = None
        self.writer: RequestWriter | None = None
        self.observers = observers
        self._tasks: set[asyncio.Task[None]] = set()

    def _trains(self) -> TrainSlack:
        return self.trains

    async def start(self) -> None:
        settings = self.settings
        directory, self._spool_lock = await asyncio.to_thread(claim, self.spool_root)
        spool = Spool(directory, settings.spool_max_bytes)
        await asyncio.to_thread(spool.adopt, self.spool_root)
        self.writer = RequestWriter(
            self.engine,
            spool,
            batch_size=settings.writer_batch_size,
            flush_seconds=settings.writer_flush_seconds,
            metadata_queue_size=settings.writer_queue_size,
            payload_memory_bytes=settings.writer_payload_memory_bytes,
            store_payloads=settings.store_payloads,
            observers=self.observers,
            on_done=self._done,
            convert_in_thread=False,
        )
        self.writer.start()
        self._spawn(self._adopt_forever(spool))
        if self.telemetry is not None:
            self.telemetry.start()

    def _send(self, kind: str, payload: Any) -> None:
        if not self.out.is_closing():
            self.out.writelines(wire.encode(kind, payload))

    def offer(self, notice: Notice) -> None:
        self._send(wire.NOTICE, notice)

    def _done(self, request_ids: list[uuid.UUID]) -> None:
        self._send(wire.DONE, request_ids)

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Handle the proxy's frames until STOP or the end of the stream; then stop."""
        writer = self.writer
        assert writer is not None
        stop_timeout = self.settings.writer_shutdown_seconds
        while (frame := await wire.read_frame(reader)) is not None:
            kind, payload = frame
            if kind == wire.RECORD:
                record: ExchangeRecord = payload
                if record.payload_shed:
                    metrics.PAYLOADS_SHED.inc()  # the proxy shed the body before sending: counted here
                writer.submit(record)
            elif kind == wire.TRAINS:
                self.trains = payload
            elif kind == wire.FLUSH:
                token, timeout = payload
                self._spawn(self._answer_flush(token, timeout))
            elif kind == wire.METRICS:
                self._send(wire.METRICS, (payload, owned_families()))
            elif kind == wire.STOP:
                stop_timeout = float(payload)
                break
        else:
            log.warning("the proxy is gone: storing what is queued, then exiting")
        await self.stop(stop_timeout)

    async def _adopt_forever(self, spool: Spool) -> None:
        while True:
            await asyncio.sleep(ADOPT_SECONDS)
            try:
                adopted = await asyncio.to_thread(spool.adopt, self.spool_root)
            except OSError:
                log.exception("could not adopt spools left by earlier recorders")
                continue
            if adopted and self.writer is not None:
                self.writer.replay_spool()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_flush(self, token: int, timeout: float) -> None:
        assert self.writer is not None
        stored = await self.writer.flush(timeout)
        self._send(wire.FLUSHED, (token, stored))

    async def stop(self, timeout: float) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.writer is not None:
            await self.writer.stop(timeout)
        if self.telemetry is not None:
            await self.telemetry.stop()
        await self.engine.dispose()
        self._send(wire.STOPPED, None)
        with contextlib.suppress(ConnectionError):
            await self.out.drain()
        self.out.close()
        if self._spool_lock is not None:
            self._spool_lock.close()


def owned_families() -> list[Any]:
    return [family for metric in metrics.RECORDER_METRICS for family in metric.collect()]


async def serve(fd: int) -> None:
    # A large read buffer: a 200 KB body arrives in one read instead of several paused and resumed ones.
    reader, out = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd), limit=READ_BUFFER_BYTES)
    hello = await wire.read_frame(reader)
    if hello is None or hello[0] != wire.HELLO:
        log.error("the recording process expected its settings first; exiting")
        return
    settings: Settings = hello[1]
    from prompttrain.cli import configure_logging

    configure_logging(settings.log_level)
    if settings.writer_nice:
        os.nice(settings.writer_nice)  # lowering one's own priority needs no privilege
    exchange_metrics.configure(settings.metrics_model_label)
    use_pricing(await asyncio.to_thread(load_pricing, settings.pricing_file))
    service = RecordingService(settings, out)
    await service.start()
    out.writelines(wire.encode(wire.READY, None))
    await service.serve(reader)


def main(argv: list[str]) -> None:
    # Parsing a 200 KB body allocates thousands of objects that live until the record is stored: with the default
    # threshold (700) the collector ran several young-generation passes per record over them, a quarter of the
    # conversion time. Reference cycles are rare here; they are still collected, less often.
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    from prompttrain.cli import run_event_loop

    run_event_loop(serve(int(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
