"""Alembic environment: runs the revisions on the async engine handed over by `prompttrain.storage.migrate`."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from prompttrain.storage.engine import create_engine
from prompttrain.storage.tables import metadata

config = context.config


def run_on_connection(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", pool_size=1)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_on_connection)
            await connection.commit()
    finally:
        await engine.dispose()


existing = config.attributes.get("connection")
if isinstance(existing, Connection):
    run_on_connection(existing)
else:
    asyncio.run(run_async())
