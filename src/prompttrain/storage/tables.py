"""Table definitions (SQLAlchemy Core metadata shared with Alembic)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# JSONB on PostgreSQL (indexable, compressed in TOAST), JSON text on SQLite.
JsonDocument = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

api_requests = sa.Table(
    "api_requests",
    metadata,
    sa.Column("request_id", sa.Uuid(), primary_key=True),
    sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
    sa.Column("train_id", sa.String(255), nullable=False),
    sa.Column("account_id", sa.String(255)),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("path", sa.String(2048), nullable=False),
    sa.Column("model", sa.String(255)),
    sa.Column("stream", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("status_code", sa.Integer()),
    # completed | upstream_error | stream_error | client_disconnected | timeout | unreachable | rejected
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
    # The request body exactly as the client sent it (text, not JSONB, so key order and spacing survive).
    sa.Column("request_body", sa.Text()),
    # The response message: the upstream JSON, or the message rebuilt from the SSE stream.
    sa.Column("response_body", JsonDocument),
    sa.Index(None, "timestamp"),
    sa.Index(None, "train_id", "timestamp"),
    sa.Index(None, "account_id", "timestamp"),
    sa.Index(None, "session_id"),
)

oauth_tokens = sa.Table(
    "oauth_tokens",
    metadata,
    sa.Column("account_id", sa.String(255), primary_key=True),
    # Encrypted with CREDENTIALS_ENCRYPTION_KEY (Fernet); never stored in clear text.
    sa.Column("access_token", sa.Text(), nullable=False),
    sa.Column("refresh_token", sa.Text(), nullable=False),
    sa.Column("expires_at_ms", sa.BigInteger(), nullable=False),
    sa.Column("scopes", sa.Text(), nullable=False, server_default=""),
    sa.Column("is_max", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=False),
)
