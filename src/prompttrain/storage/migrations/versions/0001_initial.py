"""Request metadata, request payloads, content blobs and OAuth tokens.

On PostgreSQL the request tables are partitioned by day on `timestamp` from the start (retention drops whole
partitions); a DEFAULT partition catches any row whose day has no partition yet. Daily partitions are created by
`prompttrain migrate` and by every proxy (storage/partitions.py).

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JsonDocument = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
PARTITIONED: dict[str, Any] = {"postgresql_partition_by": "RANGE (timestamp)"}


def upgrade() -> None:
    op.create_table(
        "api_requests",
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("train_id", sa.String(255), nullable=False),
        sa.Column("account_id", sa.String(255)),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.String(2048), nullable=False),
        sa.Column("model", sa.String(255)),
        sa.Column("stream", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("status_code", sa.Integer()),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("error_type", sa.String(100)),
        sa.Column("error_message", sa.Text()),
        sa.Column("duration_ms", sa.Float()),
        sa.Column("upstream_ms", sa.Float()),
        sa.Column("first_token_ms", sa.Float()),
        sa.Column("overhead_ms", sa.Float()),
        sa.Column("input_tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("cache_read_input_tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("cache_creation_input_tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("usage", JsonDocument),
        sa.Column("stop_reason", sa.String(64)),
        sa.Column("tool_call_count", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("session_id", sa.String(255)),
        sa.Column("upstream_request_id", sa.String(255)),
        sa.Column("request_headers", JsonDocument),
        sa.Column("response_headers", JsonDocument),
        sa.Column("request_bytes", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("payload_shed", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("request_id", "timestamp", name="pk_api_requests"),
        **PARTITIONED,
    )
    op.create_index("ix_api_requests_timestamp", "api_requests", ["timestamp"])
    op.create_index("ix_api_requests_train_id_timestamp", "api_requests", ["train_id", "timestamp"])
    op.create_index("ix_api_requests_account_id_timestamp", "api_requests", ["account_id", "timestamp"])
    op.create_table(
        "request_payloads",
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_template", sa.Text()),
        sa.Column("system_refs", sa.LargeBinary()),
        sa.Column("tools_refs", sa.LargeBinary()),
        sa.Column("message_chunks", sa.LargeBinary()),
        sa.Column("message_refs", sa.LargeBinary()),
        sa.Column("raw_request_body", sa.Text()),
        sa.Column("response_body", JsonDocument),
        sa.PrimaryKeyConstraint("request_id", "timestamp", name="pk_request_payloads"),
        **PARTITIONED,
    )
    op.create_table(
        "content_blobs",
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("last_seen", sa.Date(), nullable=False),
        sa.PrimaryKeyConstraint("digest", name="pk_content_blobs"),
    )
    op.create_index("ix_content_blobs_last_seen", "content_blobs", ["last_seen"])
    op.create_table(
        "oauth_tokens",
        sa.Column("account_id", sa.String(255), nullable=False),
        sa.Column("access_token", sa.Text(), nullable=False),
        sa.Column("refresh_token", sa.Text(), nullable=False),
        sa.Column("expires_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False, server_default=""),
        sa.Column("is_max", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("account_id", name="pk_oauth_tokens"),
    )
    if op.get_bind().dialect.name == "postgresql":
        for table in ("api_requests", "request_payloads"):
            op.execute(f"CREATE TABLE {table}_default PARTITION OF {table} DEFAULT")
        # Most blobs (a message, a tool) are a few hundred bytes: below the default 2 KB threshold PostgreSQL
        # would store them uncompressed.
        op.execute("ALTER TABLE content_blobs SET (toast_tuple_target = 256)")


def downgrade() -> None:
    op.drop_table("oauth_tokens")
    op.drop_table("content_blobs")
    op.drop_table("request_payloads")
    op.drop_table("api_requests")
