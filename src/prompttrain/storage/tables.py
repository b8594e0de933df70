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

# Request metadata: one row per request, never dropped. On PostgreSQL partitioned by day on `timestamp` (see
# storage/partitions.py), hence the composite primary key; request ids are UUIDv4, unique on their own.
api_requests = sa.Table(
    "api_requests",
    metadata,
    sa.Column("request_id", sa.Uuid(), primary_key=True),
    sa.Column("timestamp", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("train_id", sa.String(255), nullable=False),
    sa.Column("account_id", sa.String(255)),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("path", sa.String(2048), nullable=False),
    sa.Column("model", sa.String(255)),
    sa.Column("stream", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("status_code", sa.Integer()),
    # completed | upstream_error | stream_error | client_disconnected | timeout | unreachable | rejected | interrupted
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
    # True when the bodies were not kept (shed under pressure); the usage above is complete regardless.
    sa.Column("payload_shed", sa.Boolean(), nullable=False, server_default=sa.false()),
    # Conversation tracking (conversation/linking.py; meanings as in the reference §4), revision 0002.
    sa.Column("conversation_id", sa.Uuid()),
    sa.Column("branch_id", sa.String(255)),
    sa.Column("current_message_hash", sa.String(64)),
    sa.Column("parent_message_hash", sa.String(64)),
    sa.Column("system_hash", sa.String(64)),
    sa.Column("parent_request_id", sa.Uuid()),
    sa.Column("is_subtask", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("parent_task_request_id", sa.Uuid()),
    sa.Column("message_count", sa.Integer(), nullable=False, server_default="0"),
    # Agent/Task tool_use blocks of the response ([{id, name, input}]): where sub-agents come from.
    sa.Column("task_tool_invocation", JsonDocument),
    # For summarisation (compaction) requests: the start of the summary the model wrote, lower-cased, so that the
    # continuation request Claude Code sends afterwards can be joined to this conversation.
    sa.Column("compact_summary", sa.Text()),
    # Names of the tools whose results this request carries (cost attribution per tool).
    sa.Column("tool_result_names", JsonDocument),
    # Cost at write time from the pricing table; `cost_estimated` when the model was priced by family.
    sa.Column("cost_usd", sa.Float(), nullable=False, server_default="0"),
    sa.Column("cost_estimated", sa.Boolean(), nullable=False, server_default=sa.false()),
    # Subscription windows from the anthropic-ratelimit-unified-* response headers.
    sa.Column("ratelimit_status", sa.String(32)),
    sa.Column("ratelimit_5h_utilization", sa.Float()),
    sa.Column("ratelimit_5h_reset", sa.DateTime(timezone=True)),
    sa.Column("ratelimit_7d_utilization", sa.Float()),
    sa.Column("ratelimit_7d_reset", sa.DateTime(timezone=True)),
    sa.Index(None, "timestamp"),
    sa.Index(None, "train_id", "timestamp"),
    sa.Index(None, "account_id", "timestamp"),
    sa.Index(None, "conversation_id", "timestamp"),
    sa.Index(None, "train_id", "current_message_hash"),
    postgresql_partition_by="RANGE (timestamp)",
)

# The bodies of a request, kept apart so that list queries never touch them and they can expire sooner.
request_payloads = sa.Table(
    "request_payloads",
    metadata,
    sa.Column("request_id", sa.Uuid(), primary_key=True),
    sa.Column("timestamp", sa.DateTime(timezone=True), primary_key=True),
    # The request body as a template plus references to content_blobs (storage/content.py) ...
    sa.Column("request_template", sa.Text()),
    sa.Column("system_refs", sa.LargeBinary()),
    sa.Column("tools_refs", sa.LargeBinary()),
    sa.Column("message_chunks", sa.LargeBinary()),
    sa.Column("message_refs", sa.LargeBinary()),
    # ... or, when the body does not split and round-trip exactly, the body as sent.
    sa.Column("raw_request_body", sa.Text()),
    # The response message: the upstream JSON, or the message rebuilt from the SSE stream.
    sa.Column("response_body", JsonDocument),
    postgresql_partition_by="RANGE (timestamp)",
)

# Messages, system prompts and tool lists, stored once, keyed by the SHA-256 of their canonical JSON.
content_blobs = sa.Table(
    "content_blobs",
    metadata,
    sa.Column("digest", sa.LargeBinary(32), primary_key=True),
    sa.Column("content", sa.Text(), nullable=False),
    # Refreshed (at most daily) whenever a request references the blob; payload retention deletes stale blobs.
    sa.Column("last_seen", sa.Date(), nullable=False),
    sa.Index(None, "last_seen"),
)

# Every Agent/Task tool call, numbered within its conversation: a sub-agent's first request finds its parent here
# by the digest of its prompt (the reference scans response bodies instead, §4.5).
task_invocations = sa.Table(
    "task_invocations",
    metadata,
    sa.Column("request_id", sa.Uuid(), primary_key=True),
    sa.Column("tool_use_id", sa.String(255), primary_key=True),
    sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
    sa.Column("train_id", sa.String(255), nullable=False),
    sa.Column("conversation_id", sa.Uuid()),
    sa.Column("prompt_digest", sa.String(64), nullable=False),
    sa.Column("ordinal", sa.Integer(), nullable=False),
    sa.Index(None, "train_id", "prompt_digest", "timestamp"),
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
