"""Conversation linking, cost and subscription-window columns on request metadata.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JsonDocument = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

COLUMNS: list[sa.Column[Any]] = [
    # Conversation tracking (conversation/linking.py; meanings as in the reference §4).
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
]


def upgrade() -> None:
    for column in COLUMNS:
        op.add_column("api_requests", column)
    op.create_table(
        "task_invocations",
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("tool_use_id", sa.String(255), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("train_id", sa.String(255), nullable=False),
        sa.Column("conversation_id", sa.Uuid()),
        sa.Column("prompt_digest", sa.String(64), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", "tool_use_id", name="pk_task_invocations"),
    )
    op.create_index(
        "ix_task_invocations_train_id_prompt_digest_timestamp",
        "task_invocations",
        ["train_id", "prompt_digest", "timestamp"],
    )
    op.create_index("ix_api_requests_conversation_id_timestamp", "api_requests", ["conversation_id", "timestamp"])
    op.create_index(
        "ix_api_requests_train_id_current_message_hash", "api_requests", ["train_id", "current_message_hash"]
    )


def downgrade() -> None:
    op.drop_table("task_invocations")
    op.drop_index("ix_api_requests_train_id_current_message_hash", "api_requests")
    op.drop_index("ix_api_requests_conversation_id_timestamp", "api_requests")
    for column in reversed(COLUMNS):
        op.drop_column("api_requests", column.name)
