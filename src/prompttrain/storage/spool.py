"""A local append-only spool for metadata records the database cannot take right now.

Records are appended as JSON lines to numbered segment files under `<DATA_DIR>/spool/` and fsync'd before
`append` returns, so a crash (even `kill -9`) right after loses nothing that was spooled. Replay reads the oldest
segment first; a segment is deleted only after all its records were written to the database, and writes are
idempotent, so a crash during replay only repeats inserts that the database ignores. The spool is capped in
bytes: past the cap, records are refused (and counted by the caller) with an error log, rather than filling the
disk. All methods block: call them from a worker thread.

Each recording process spools into a directory of its own under `<DATA_DIR>/spool/`, locked (flock) for as long
as it runs (`claim`), so replicas or a recorder outliving its proxy never write to one file together. A directory
whose lock is free belongs to a recorder that has ended: the next recorder to look (`adopt`) moves its segments
into its own spool and replays them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import orjson

log = logging.getLogger(__name__)

SEGMENT_BYTES = 16 * 1024 * 1024
SEGMENT_GLOB = "segment-*.jsonl"
LOCK_FILE = ".lock"


def claim(root: Path) -> tuple[Path, IO[bytes]]:
    """A new spool directory under `root`, locked by this process while the returned handle stays open."""
    directory = root / f"{os.getpid()}-{secrets.token_hex(4)}"
    directory.mkdir(parents=True, exist_ok=False)
    handle = (directory / LOCK_FILE).open("ab")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return directory, handle


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cap_reported = False
        self._lock = threading.Lock()  # adoption renames segments while the writer may append

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
        with self._lock:
            self._write(accepted)
        return refused

    def _write(self, accepted: list[bytes]) -> None:
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

    def _new_segment(self, segments: list[Path]) -> Path:
        number = int(segments[-1].stem.split("-")[1]) + 1 if segments else 1
        path = self.directory / f"segment-{number:08d}.jsonl"
        # The directory entry must survive a crash too.
        path.touch(mode=0o600)
        _fsync_directory(self.directory)
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

    def adopt(self, root: Path) -> int:
        """Move the segments of every spool under `root` whose recorder has ended into this one; how many."""
        moved = 0
        for directory in sorted(path for path in root.iterdir() if path.is_dir() and path != self.directory):
            try:
                handle = (directory / LOCK_FILE).open("ab")
            except OSError:
                continue
            with handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its recorder is still running
                orphans = Spool(directory, self.max_bytes).segments()
                with self._lock:
                    for segment in orphans:
                        mine = self.segments()
                        number = int(mine[-1].stem.split("-")[1]) + 1 if mine else 1
                        os.rename(segment, self.directory / f"segment-{number:08d}.jsonl")
                        moved += 1
                    _fsync_directory(self.directory)
                (directory / LOCK_FILE).unlink(missing_ok=True)
                try:
                    directory.rmdir()
                except OSError:
                    log.warning("could not remove the adopted spool directory %s", directory)
        if moved:
            log.info("adopted %d spool segments left by an earlier recorder", moved)
        return moved


def _fsync_directory(path: Path) -> None:
    """Make renames and new entries in `path` survive a crash."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(type(value).__name__)
