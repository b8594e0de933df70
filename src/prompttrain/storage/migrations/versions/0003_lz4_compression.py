"""LZ4 instead of pglz for the large text columns on PostgreSQL (content blobs, request templates, response bodies).

PostgreSQL compresses values over about 2 KB before storing them out of line. pglz, its default, cost the database
half of its CPU per recorded Claude Code request (about 0.5 of 1.0 ms per ~200 KB request on the linking
benchmark), on the same cores as the proxy; LZ4 compresses several times faster at a similar ratio. Existing
values keep their compression (PostgreSQL reads both); new ones use LZ4.

`ALTER TABLE ... SET COMPRESSION` on a partitioned table applies to partitions created later, not to existing ones,
so every existing partition is altered too. A server without LZ4 (built without it, or older than PostgreSQL 14)
keeps pglz: the migration logs that and succeeds. SQLite: nothing to do.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

log = logging.getLogger("prompttrain.storage.migrate")

COMPRESSED_COLUMNS = {
    "content_blobs": ("content",),
    "request_payloads": ("request_template", "raw_request_body", "response_body"),
}


def _tables(bind: sa.Connection, table: str) -> list[str]:
    """The table and, when it is partitioned, each of its partitions."""
    rows = bind.execute(
        sa.text(
            "SELECT child.relname FROM pg_inherits "
            "JOIN pg_class parent ON parent.oid = pg_inherits.inhparent "
            "JOIN pg_class child ON child.oid = pg_inherits.inhrelid "
            "WHERE parent.relname = :table ORDER BY child.relname"
        ),
        {"table": table},
    )
    return [table, *(row[0] for row in rows)]


def _set_compression(method: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    if bind.dialect.server_version_info is not None and bind.dialect.server_version_info < (14,):
        log.info("PostgreSQL before 14 compresses with pglz only; large columns keep it")
        return
    for table, columns in COMPRESSED_COLUMNS.items():
        for name in _tables(bind, table):
            for column in columns:
                try:
                    with bind.begin_nested():
                        bind.execute(sa.text(f'ALTER TABLE "{name}" ALTER COLUMN "{column}" SET COMPRESSION {method}'))
                except sa.exc.DBAPIError as error:  # LZ4 not built into this server
                    log.info("large columns keep the default compression (%s)", str(error.orig).splitlines()[0])
                    return


def upgrade() -> None:
    _set_compression("lz4")


def downgrade() -> None:
    _set_compression("pglz")
