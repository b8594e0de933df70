"""Cost per tool and per sub-agent branch of a conversation, from the conversation-linking work's
`prompttrain.storage.conversation_queries.conversation_costs(connection, conversation_id)`.

INTEGRATION POINT: the function is looked up at call time, so the dashboard also runs on a tree without it (or
with it failing): this then returns None and the conversation page shows per-branch totals only.
"""

from __future__ import annotations

import importlib
import logging
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

log = logging.getLogger(__name__)


async def conversation_costs(connection: AsyncConnection, conversation_id: uuid.UUID) -> Any:
    try:
        module = importlib.import_module("prompttrain.storage.conversation_queries")
    except ImportError:
        return None
    function = getattr(module, "conversation_costs", None)
    if function is None:
        return None
    try:
        return await function(connection, conversation_id)
    except Exception:  # a bug there must not take the conversation page down
        log.exception("conversation_costs failed for %s", conversation_id)
        return None
