"""The JSON API (`/api/*`), documented by the OpenAPI document at `/openapi.json`.

Responses are the dataclasses of storage/dashboard_queries.py serialised with orjson; `response_model` gives the
OpenAPI document their schema. Errors use Anthropic's shape (errors.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from prompttrain.dashboard.auth import current_viewer
from prompttrain.dashboard.costs import conversation_costs
from prompttrain.dashboard.directory import Configured
from prompttrain.dashboard.errors import NotFoundError
from prompttrain.dashboard.params import FiltersDep, parse_cursor, parse_identifier, parse_time, parse_uuid
from prompttrain.dashboard.ranges import overview_range
from prompttrain.dashboard.state import ConnectionDep, StateDep
from prompttrain.storage import dashboard_queries as queries

router = APIRouter(prefix="/api", tags=["api"], dependencies=[Depends(current_viewer)])

Limit = Annotated[int, Query(ge=1, le=500, description="Rows per page")]
Before = Annotated[str | None, Query(description="`next_cursor` of the previous page: older rows")]
After = Annotated[str | None, Query(description="`prev_cursor` of the previous page: newer rows")]


def json(value: Any) -> Response:
    return Response(queries.to_json(value), media_type="application/json")


@router.get("/requests", response_model=queries.RequestPage, summary="Recorded requests, newest first")
async def list_requests(
    connection: ConnectionDep, filters: FiltersDep, before: Before = None, after: After = None, limit: Limit = 50
) -> Response:
    page = await queries.list_requests(
        connection,
        filters,
        before=parse_cursor("before", before),
        after=parse_cursor("after", after),
        limit=limit,
    )
    return json(page)


@router.get("/requests/{request_id}", response_model=queries.RequestDetail, summary="One request with its bodies")
async def get_request(connection: ConnectionDep, request_id: str) -> Response:
    detail = await queries.get_request(connection, parse_uuid("request_id", request_id))
    if detail is None:
        raise NotFoundError(f"no request {request_id}")
    return json(detail)


@router.get("/storage-stats", response_model=queries.StorageStats, summary="Totals and storage use")
async def storage_stats(
    connection: ConnectionDep,
    since: Annotated[str | None, Query(description="ISO 8601 time or a duration back from now")] = None,
    train_id: Annotated[str | None, Query(description="Only this train")] = None,
) -> Response:
    start = parse_time("since", since, datetime.now(UTC))
    return json(await queries.storage_stats(connection, start, parse_identifier("train_id", train_id)))


@router.get("/overview", response_model=queries.Overview, summary="Requests, tokens, cost and errors over time")
async def overview(
    connection: ConnectionDep,
    filters: FiltersDep,
    range_: Annotated[str, Query(alias="range", description="1h, 6h, 24h, 7d or 30d")] = "24h",
) -> Response:
    since, until, bucket = overview_range(range_, datetime.now(UTC))
    return json(await queries.overview(connection, filters, since, until, bucket))


@router.get("/conversations", response_model=queries.ConversationPage, summary="Conversations by last activity")
async def list_conversations(
    connection: ConnectionDep, filters: FiltersDep, before: Before = None, limit: Limit = 50
) -> Response:
    page = await queries.list_conversations(connection, filters, before=parse_cursor("before", before), limit=limit)
    return json(page)


@router.get(
    "/conversations/{conversation_id}",
    response_model=queries.ConversationDetail,
    summary="One conversation: branches (sub-agents, compactions) and its requests in time order",
)
async def get_conversation(connection: ConnectionDep, conversation_id: str) -> Response:
    identifier = parse_uuid("conversation_id", conversation_id)
    detail = await queries.get_conversation(connection, identifier)
    if detail is None:
        raise NotFoundError(f"no conversation {conversation_id}")
    costs = await conversation_costs(connection, identifier)
    return json(queries.ConversationDetail(detail.summary, detail.branches, detail.requests, costs))


@router.get(
    "/token-usage",
    response_model=queries.TokenUsage,
    summary="Per account 5-hour and 7-day windows (utilisation, resets, tokens); per train tokens",
)
async def token_usage(connection: ConnectionDep, state: StateDep) -> Response:
    configured = await state.directory.read()
    accounts = [account.name for account in configured.accounts]
    return json(await queries.token_usage(connection, datetime.now(UTC), accounts))


@router.get("/trains", response_model=Configured, summary="Configured trains and accounts (names and modes only)")
async def trains(state: StateDep) -> Response:
    return json(await state.directory.read())
