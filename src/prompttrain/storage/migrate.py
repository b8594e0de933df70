"""`prompttrain migrate`: wait for the database, take a lock so replicas never migrate at once, upgrade to head."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

from prompttrain.storage.engine import create_engine, redacted_url
from prompttrain.storage.partitions import ensure_partitions

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# An arbitrary constant shared by every replica: pg_advisory_lock(key) serialises concurrent `migrate` runs.
ADVISORY_LOCK_KEY = 0x7072_6F6D_7074


class DatabaseUnavailableError(Exception):
    """The database did not answer within the wait timeout."""


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def _upgrade(connection: Connection, database_url: str, revision: str = "head") -> None:
    config = alembic_config(database_url)
    config.attributes["connection"] = connection
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
    try:
        command.upgrade(config, revision)
    finally:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})


async def migrate(database_url: str, *, wait_seconds: float = 60.0, revision: str = "head") -> None:
    """Upgrade the schema to the newest revision (or `revision`); raise DatabaseUnavailableError if the DB never
    answers."""
    engine = create_engine(database_url, pool_size=1)
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            try:
                async with engine.connect() as connection:
                    await connection.run_sync(_upgrade, database_url, revision)
                    await connection.commit()
                break
            except (OSError, sa.exc.OperationalError, sa.exc.InterfaceError) as error:
                if time.monotonic() >= deadline:
                    raise DatabaseUnavailableError(
                        f"database {redacted_url(database_url)} not reachable after {wait_seconds:.0f}s: "
                        f"{type(error).__name__}"
                    ) from None
                log.info("waiting for the database %s", redacted_url(database_url))
                await asyncio.sleep(1.0)
        await ensure_partitions(engine)
    finally:
        await engine.dispose()
    log.info("database schema is up to date")
