"""Schema migrations against a real PostgreSQL: LZ4 for the large columns, on existing and future partitions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from alembic import command

from prompttrain.settings import normalise_database_url
from prompttrain.storage.engine import create_engine
from prompttrain.storage.migrate import alembic_config, migrate
from prompttrain.storage.partitions import ensure_partitions
from tests.helpers import execute, query, run_async

LARGE_COLUMNS = {
    "content_blobs": ("content",),
    "request_payloads": ("request_template", "raw_request_body", "response_body"),
}


def compression(database_url: str) -> dict[tuple[str, str], str]:
    """(table or partition, column) -> attcompression ('l' LZ4, 'p' pglz, '' the server's default)."""
    rows = query(
        database_url,
        "SELECT c.relname AS name, a.attname AS column, a.attcompression::text AS method FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid "
        "WHERE c.relname LIKE 'content_blobs%' OR c.relname LIKE 'request_payloads%'",
    )
    wanted = {column for columns in LARGE_COLUMNS.values() for column in columns}
    return {(row["name"], row["column"]): row["method"] for row in rows if row["column"] in wanted}


def downgrade(database_url: str, revision: str) -> None:
    url = normalise_database_url(database_url)

    async def run() -> None:
        engine = create_engine(url, pool_size=1)
        try:
            async with engine.begin() as connection:

                def down(sync_connection: object) -> None:
                    config = alembic_config(url)
                    config.attributes["connection"] = sync_connection
                    command.downgrade(config, revision)

                await connection.run_sync(down)
        finally:
            await engine.dispose()

    run_async(run)


def test_large_columns_use_lz4_on_existing_and_later_partitions_and_downgrade_restores_pglz(postgres_url: str) -> None:
    url = normalise_database_url(postgres_url)
    run_async(lambda: migrate(url, revision="0002"))  # daily partitions exist before the change
    before = compression(postgres_url)
    assert len([name for name, _ in before if name.startswith("request_payloads_p")]) >= 3
    assert set(before.values()) == {""}

    run_async(lambda: migrate(url))

    async def later_partition() -> None:
        engine = create_engine(url, pool_size=1)
        try:
            await ensure_partitions(engine, today=(datetime.now(UTC) + timedelta(days=30)).date(), days_ahead=0)
        finally:
            await engine.dispose()

    run_async(later_partition)
    after = compression(postgres_url)
    assert set(after) == set(before) | {
        (f"request_payloads_p{(datetime.now(UTC) + timedelta(days=30)):%Y%m%d}", column)
        for column in LARGE_COLUMNS["request_payloads"]
    }
    assert set(after.values()) == {"l"}

    execute(
        postgres_url,
        "INSERT INTO content_blobs (digest, content, last_seen) VALUES (:digest, :content, CURRENT_DATE)",
        digest=b"\x01" * 32,
        content="a Claude Code tool result " * 400,
    )
    stored = query(postgres_url, "SELECT pg_column_compression(content) AS method FROM content_blobs")
    assert stored == [{"method": "lz4"}]

    downgrade(postgres_url, "0002")
    assert set(compression(postgres_url).values()) == {"p"}
    assert query(postgres_url, "SELECT pg_column_compression(content) AS method FROM content_blobs") == stored
