"""Read queries shared by the dashboard, the CLI and tests."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from prompttrain.storage.content import digests, expand_chunks, join_body, referenced
from prompttrain.storage.tables import content_blobs, request_payloads


@dataclass(frozen=True)
class StoredPayload:
    request_body: bytes | None  # exactly as the client sent it
    response_body: Any


async def load_payload(connection: AsyncConnection, request_id: uuid.UUID) -> StoredPayload | None:
    """The bodies of one request, the request body rebuilt byte for byte from its content blobs."""
    row = (
        (await connection.execute(sa.select(request_payloads).where(request_payloads.c.request_id == request_id)))
        .mappings()
        .first()
    )
    if row is None:
        return None
    if row["request_template"] is None:
        raw = row["raw_request_body"]
        return StoredPayload(raw.encode("utf-8") if raw is not None else None, row["response_body"])
    system_refs, tools_refs, message_refs = row["system_refs"], row["tools_refs"], row["message_refs"] or b""
    chunks = row["message_chunks"] or b""
    blobs = await _blobs(connection, referenced(system_refs, tools_refs, message_refs, chunks))
    inner = set(digests(expand_chunks(chunks, blobs))) - blobs.keys()
    blobs.update(await _blobs(connection, inner))
    body = join_body(row["request_template"], system_refs, tools_refs, message_refs, blobs, chunks)
    return StoredPayload(body, row["response_body"])


async def _blobs(connection: AsyncConnection, wanted: set[bytes]) -> dict[bytes, str]:
    if not wanted:
        return {}
    found = await connection.execute(
        sa.select(content_blobs.c.digest, content_blobs.c.content).where(content_blobs.c.digest.in_(wanted))
    )
    return {bytes(digest): content for digest, content in found}
