"""A local append-only spool for metadata records the database cannot take right now.

Records are appended as JSON lines to numbered segment files under `<DATA_DIR>/spool/` and fsync'd before
`append` returns, so a crash (even `kill -9`) right after loses nothing that was spooled. Replay reads the oldest
segment first; a segment is deleted only after all its records were written to the database, and writes are
idempotent, so a crash during replay only repeats inserts that the database ignores. The spool is capped in
bytes: past the cap, records are refused (and counted by the caller) with an error log, rather than filling the
disk. All methods block: call them from a worker thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

SEGMENT_BYTES = 16 * 1024 * 1024
SEGMENT_GLOB = "segment-*.jsonl"


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cap_reported = False

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob(SEGMENT_GLOB), key=lambda path: int(path.stem.split("-")[1]))

    def size(self) -> int:
        total = 0
        for path in self.segments():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def is_empty(self) -> bool:
        return not self.segments()

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Append and fsync; returns how many records were refused because the spool is full."""
        lines = [orjson.dumps(record, default=_encode) + b"\n" for record in records]
        if not lines:
            return 0
        size = self.size()
        accepted: list[bytes] = []
        for line in lines:
            if size + len(line) > self.max_bytes:
                break
            accepted.append(line)
            size += len(line)
        refused = len(lines) - len(accepted)
        if refused and not self._cap_reported:
            log.error(
                "spool %s reached its cap of %d bytes (SPOOL_MAX_BYTES): refusing %d records until it drains",
                self.directory,
                self.max_bytes,
                refused,
            )
            self._cap_reported = True
        if not accepted:
            return refused
        self._cap_reported = refused > 0 and self._cap_reported
        segments = self.segments()
        target = (
            segments[-1] if segments and segments[-1].stat().st_size < SEGMENT_BYTES else self._new_segment(segments)
        )
        descriptor = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, b"".join(accepted))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        return refused

    def _new_segment(self, segments: list[Path]) -> Path:
        number = int(segments[-1].stem.split("-")[1]) + 1 if segments else 1
        path = self.directory / f"segment-{number:08d}.jsonl"
        # The directory entry must survive a crash too.
        path.touch(mode=0o600)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return path

    def oldest(self) -> tuple[Path, list[dict[str, Any]]] | None:
        """The oldest segment and its records (a torn last line from a crash mid-write is skipped)."""
        for path in self.segments():
            records: list[dict[str, Any]] = []
            for line in path.read_bytes().splitlines():
                try:
                    records.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    log.warning("skipping a torn record in %s", path.name)
            return path, records
        return None

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._cap_reported = False


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(type(value).__name__)
