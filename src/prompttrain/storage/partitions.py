"""Daily partitions of the request tables on PostgreSQL, and retention that drops or deletes old data.

Partitions are named `<table>_pYYYYMMDD` and cover one UTC day. `ensure_partitions` creates them ahead of time
(every replica calls it; an advisory lock makes concurrent calls harmless); rows of a day without a partition land
in the table's DEFAULT partition, which retention cleans with DELETE. On SQLite there are no partitions: retention
deletes rows.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from prompttrain.storage.tables import api_requests, content_blobs, request_payloads

log = logging.getLogger(__name__)

PARTITIONED_TABLES = ("api_requests", "request_payloads")
PARTITION_NAME = re.compile(r"^(?P<table>[a-z_]+)_p(?P<day>\d{8})$")
PARTITION_LOCK_KEY = 0x7072_6F6D_7075
# Every replica re-checks hourly, so one day ahead always exists in time; empty partitions cost pages.
DAYS_AHEAD = 1


def partition_name(table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


async def ensure_partitions(engine: AsyncEngine, today: date | None = None, days_ahead: int = DAYS_AHEAD) -> int:
    """Create the daily partitions from today to `days_ahead` days ahead; returns how many were created."""
    if engine.dialect.name != "postgresql":
        return 0
    today = today or datetime.now(UTC).date()
    created = 0
    async with engine.begin() as connection:
        await connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PARTITION_LOCK_KEY})
        existing = await _existing_partitions(connection)
        for table in PARTITIONED_TABLES:
            for offset in range(days_ahead + 1):
                day = today + timedelta(days=offset)
                name = partition_name(table, day)
                if name in existing:
                    continue
                try:
                    async with connection.begin_nested():
                        await connection.execute(
                            sa.text(
                                f"CREATE TABLE {name} PARTITION OF {table} "
                                f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') "
                                f"TO ('{(day + timedelta(days=1)).isoformat()} 00:00:00+00')"
                            )
                        )
                    created += 1
                except sa.exc.DBAPIError as error:
                    # Rows for that day already sit in the DEFAULT partition: keep them there.
                    log.warning("could not create partition %s: %s", name, str(error.orig).splitlines()[0])
    if created:
        log.info("created %d daily partitions", created)
    return created


async def _existing_partitions(connection: AsyncConnection) -> set[str]:
    rows = await connection.execute(
        sa.text(
            "SELECT child.relname FROM pg_inherits "
            "JOIN pg_class child ON child.oid = pg_inherits.inhrelid "
            "JOIN pg_class parent ON parent.oid = pg_inherits.inhparent "
            "WHERE parent.relname = ANY(:tables)"
        ),
        {"tables": list(PARTITIONED_TABLES)},
    )
    return {str(row[0]) for row in rows}


@dataclass
class RetentionReport:
    dropped_partitions: list[str] = field(default_factory=list)
    deleted_requests: int = 0
    deleted_payloads: int = 0
    deleted_blobs: int = 0


async def apply_retention(engine: AsyncEngine, metadata_cutoff: datetime, payload_cutoff: datetime) -> RetentionReport:
    """Remove request metadata older than `metadata_cutoff` and payloads (and unused blobs) older than `payload_cutoff`.

    PostgreSQL drops whole daily partitions that end at or before the cutoff (instant, no bloat) and deletes the
    rest from the DEFAULT partition; SQLite deletes rows.
    """
    report = RetentionReport()
    cutoffs = {"api_requests": metadata_cutoff, "request_payloads": payload_cutoff}
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PARTITION_LOCK_KEY})
            for name in sorted(await _existing_partitions(connection)):
                match = PARTITION_NAME.match(name)
                if match is None or match["table"] not in cutoffs:
                    continue
                day = datetime.strptime(match["day"], "%Y%m%d").replace(tzinfo=UTC)
                if day + timedelta(days=1) <= cutoffs[match["table"]]:
                    await connection.execute(sa.text(f"DROP TABLE {name}"))
                    report.dropped_partitions.append(name)
        requests = await connection.execute(sa.delete(api_requests).where(api_requests.c.timestamp < metadata_cutoff))
        payloads = await connection.execute(
            sa.delete(request_payloads).where(request_payloads.c.timestamp < payload_cutoff)
        )
        blobs = await connection.execute(
            sa.delete(content_blobs).where(content_blobs.c.last_seen < payload_cutoff.date())
        )
        report.deleted_requests = max(requests.rowcount or 0, 0)
        report.deleted_payloads = max(payloads.rowcount or 0, 0)
        report.deleted_blobs = max(blobs.rowcount or 0, 0)
    return report
