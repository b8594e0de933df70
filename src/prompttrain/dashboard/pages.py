"""The HTML pages and the htmx partials that live updates swap in. Every page needs a viewer; without one a
browser is sent to the login form (app.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse

from prompttrain.dashboard.auth import current_viewer
from prompttrain.dashboard.costs import conversation_costs
from prompttrain.dashboard.errors import BadRequestError, NotFoundError
from prompttrain.dashboard.params import FiltersDep, parse_cursor, parse_uuid
from prompttrain.dashboard.ranges import RANGES, overview_range
from prompttrain.dashboard.rendering import render
from prompttrain.dashboard.state import ConnectionDep, StateDep
from prompttrain.dashboard.views import exchange_of, layout
from prompttrain.storage import dashboard_queries as queries

router = APIRouter(include_in_schema=False, dependencies=[Depends(current_viewer)])

PAGE_SIZE = 50
MAX_LIVE_IDS = 200
FILTER_KEYS = ("train_id", "account_id", "model", "status", "since", "until", "q")


def kept_filters(request: Request) -> dict[str, str]:
    return {key: value for key in FILTER_KEYS if (value := request.query_params.get(key, "").strip())}


@router.get("/", response_class=HTMLResponse)
async def overview(
    request: Request,
    connection: ConnectionDep,
    filters: FiltersDep,
    range_: Annotated[str, Query(alias="range")] = "24h",
) -> HTMLResponse:
    since, until, bucket = overview_range(range_, datetime.now(UTC))
    data = await queries.overview(connection, filters, since, until, bucket)
    chart = {
        "x": [int(point.start.timestamp()) for point in data.series],
        "requests": [point.totals.requests for point in data.series],
        "errors": [point.totals.errors for point in data.series],
        "input": [point.totals.input_tokens + point.totals.cache_read_input_tokens for point in data.series],
        "output": [point.totals.output_tokens for point in data.series],
        "cost": [round(point.totals.cost_usd, 6) for point in data.series],
    }
    context = {"data": data, "chart": chart, "range": range_, "ranges": list(RANGES), "filters": kept_filters(request)}
    return render(request, "overview.html", context)


@router.get("/requests", response_class=HTMLResponse)
async def requests_page(
    request: Request,
    connection: ConnectionDep,
    state: StateDep,
    filters: FiltersDep,
    before: str | None = None,
    after: str | None = None,
) -> HTMLResponse:
    page = await queries.list_requests(
        connection, filters, before=parse_cursor("before", before), after=parse_cursor("after", after), limit=PAGE_SIZE
    )
    context = {
        "page": page,
        "filters": kept_filters(request),
        "choices": await state.choices(),
        "live": before is None and after is None,
    }
    return render(request, "requests.html", context)


@router.get("/partials/request-rows", response_class=HTMLResponse)
async def request_rows(
    request: Request, connection: ConnectionDep, filters: FiltersDep, ids: str | None = None
) -> HTMLResponse:
    """Rows for the live requests page: those of `ids` (comma-separated) that match the filters, else the
    newest page."""
    if ids:
        wanted = [part for part in ids.split(",") if part.strip()]
        if len(wanted) > MAX_LIVE_IDS:
            raise BadRequestError(f"ids: at most {MAX_LIVE_IDS}")
        rows = await queries.requests_by_id(connection, [parse_uuid("ids", part) for part in wanted], filters)
    else:
        rows = (await queries.list_requests(connection, filters, limit=PAGE_SIZE)).requests
    return render(request, "partials/request_rows.html", {"rows": rows})


@router.get("/requests/{request_id}", response_class=HTMLResponse)
async def request_page(
    request: Request, connection: ConnectionDep, request_id: str, messages: str | None = None
) -> HTMLResponse:
    detail = await queries.get_request(connection, parse_uuid("request_id", request_id))
    if detail is None:
        raise NotFoundError(f"no request {request_id}")
    exchange = exchange_of(detail.request_body, detail.response_body, last=None if messages == "all" else 40)
    return render(request, "request.html", {"detail": detail, "record": detail.request, "exchange": exchange})


@router.get("/conversations", response_class=HTMLResponse)
async def conversations_page(
    request: Request, connection: ConnectionDep, state: StateDep, filters: FiltersDep, before: str | None = None
) -> HTMLResponse:
    page = await queries.list_conversations(connection, filters, before=parse_cursor("before", before), limit=PAGE_SIZE)
    context = {"page": page, "filters": kept_filters(request), "choices": await state.choices(), "live": not before}
    return render(request, "conversations.html", context)


async def _conversation_context(
    connection: ConnectionDep, conversation_id: str, view: str, branch: str | None
) -> dict[str, object]:
    if view not in ("tree", "timeline"):
        raise BadRequestError("view: expected tree or timeline")
    identifier = parse_uuid("conversation_id", conversation_id)
    detail = await queries.get_conversation(connection, identifier)
    if detail is None:
        raise NotFoundError(f"no conversation {conversation_id}")
    if branch and branch not in {item.branch_id for item in detail.branches}:
        raise BadRequestError(f"branch: this conversation has no branch '{branch[:80]}'")
    shown = [item for item in detail.requests if not branch or item.branch_id == branch]
    started = detail.requests[0].timestamp
    longest = max((item.duration_ms or 0.0 for item in shown), default=0.0)
    costs = await conversation_costs(connection, identifier)
    return {
        "detail": detail,
        "summary": detail.summary,
        "requests": shown,
        "graph": layout(shown),
        "view": view,
        "branch": branch,
        "started": started,
        "longest": longest or 1.0,
        "costs": costs,
        "costs_view": orjson.loads(queries.to_json(costs)) if costs is not None else None,
    }


@router.get("/conversations/{conversation_id}", response_class=HTMLResponse)
async def conversation_page(
    request: Request, connection: ConnectionDep, conversation_id: str, view: str = "tree", branch: str | None = None
) -> HTMLResponse:
    context = await _conversation_context(connection, conversation_id, view, branch)
    return render(request, "conversation.html", context)


@router.get("/partials/conversations/{conversation_id}", response_class=HTMLResponse)
async def conversation_body(
    request: Request, connection: ConnectionDep, conversation_id: str, view: str = "tree", branch: str | None = None
) -> HTMLResponse:
    context = await _conversation_context(connection, conversation_id, view, branch)
    return render(request, "partials/conversation_body.html", context)


@router.get("/token-usage", response_class=HTMLResponse)
async def token_usage_page(request: Request, connection: ConnectionDep, state: StateDep) -> HTMLResponse:
    configured = await state.directory.read()
    usage = await queries.token_usage(connection, datetime.now(UTC), [account.name for account in configured.accounts])
    accounts = sorted({point.account_id for point in usage.hourly})
    hours = sorted({int(point.start.timestamp()) for point in usage.hourly})
    index = {hour: position for position, hour in enumerate(hours)}
    series = {account: [0] * len(hours) for account in accounts}
    for point in usage.hourly:
        series[point.account_id][index[int(point.start.timestamp())]] = point.output_tokens
    chart = {"x": hours, "series": [{"label": name, "values": series[name]} for name in accounts]}
    return render(request, "token_usage.html", {"usage": usage, "chart": chart})


@router.get("/trains", response_class=HTMLResponse)
async def trains_page(request: Request, connection: ConnectionDep, state: StateDep) -> HTMLResponse:
    configured = await state.directory.read()
    activity = await queries.train_account_activity(connection)
    return render(request, "trains.html", {"configured": configured, "activity": activity})
