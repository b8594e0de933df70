"""Conversation read queries: cost attribution per tool and per sub-agent branch.

A request is attributed to the tools whose results it carries (Claude Code sends a tool's result in the request
that follows the tool call, and that request's tokens are the cost of feeding the result back); a request carrying
several tools' results is split evenly between them. Sub-agent branches (`subtask_N`) sum every request of the
branch.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from prompttrain.storage.tables import api_requests

TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


@dataclass
class CostShare:
    """Tokens and dollars attributed to one tool or one branch (fractions when a request is shared)."""

    name: str
    requests: int = 0
    input_tokens: float = 0.0
    output_tokens: float = 0.0
    cache_read_input_tokens: float = 0.0
    cache_creation_input_tokens: float = 0.0
    cost_usd: float = 0.0

    def add(self, row: Any, share: float = 1.0) -> None:
        self.requests += 1
        for name in TOKEN_FIELDS:
            setattr(self, name, getattr(self, name) + (getattr(row, name) or 0) * share)
        self.cost_usd += float(row.cost_usd or 0.0) * share


@dataclass
class ConversationCosts:
    conversation_id: uuid.UUID
    total: CostShare
    per_tool: list[CostShare] = field(default_factory=list)
    per_subagent: list[CostShare] = field(default_factory=list)


async def conversation_costs(connection: AsyncConnection, conversation_id: uuid.UUID) -> ConversationCosts:
    query = sa.select(
        api_requests.c.branch_id,
        api_requests.c.tool_result_names,
        api_requests.c.cost_usd,
        *(api_requests.c[name] for name in TOKEN_FIELDS),
    ).where(api_requests.c.conversation_id == conversation_id)
    rows = (await connection.execute(query)).all()
    return attribute(conversation_id, rows)


def attribute(conversation_id: uuid.UUID, rows: Iterable[Any]) -> ConversationCosts:
    total = CostShare("total")
    tools: dict[str, CostShare] = {}
    branches: dict[str, CostShare] = {}
    for row in rows:
        total.add(row)
        names = row.tool_result_names or []
        for name in names:
            tools.setdefault(name, CostShare(name)).add(row, 1.0 / len(names))
        branch = row.branch_id or ""
        if branch.startswith("subtask_"):
            branches.setdefault(branch, CostShare(branch)).add(row)
    return ConversationCosts(
        conversation_id=conversation_id,
        total=total,
        per_tool=sorted(tools.values(), key=lambda share: -share.cost_usd),
        per_subagent=sorted(branches.values(), key=lambda share: int(share.name.removeprefix("subtask_") or 0)),
    )
