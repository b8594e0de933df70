"""Query parameters shared by the JSON API and the pages, parsed once into storage-level filters.

A malformed value is a 400 whose message names the parameter and says what is expected; it never reaches the
database. FastAPI's own checks (integer bounds) are turned into the same 400 by the app's error handler.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Depends, Query

from prompttrain.dashboard.errors import BadRequestError
from prompttrain.settings import IDENTIFIER_PATTERN
from prompttrain.storage.dashboard_queries import Cursor, RequestFilters

RELATIVE = re.compile(r"^(?P<amount>\d{1,6})(?P<unit>[mhdw])$")
UNIT = {"m": 60, "h": 3600, "d": 86400, "w": 604800}
STATUS = re.compile(r"^(ok|error|[2-5]xx|[1-5]\d\d)$")
MAX_TEXT = 255


def parse_time(name: str, value: str | None, now: datetime) -> datetime | None:
    """ISO 8601 (no offset means UTC) or a duration back from now (`90m`, `24h`, `7d`, `2w`)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    match = RELATIVE.match(text)
    if match:
        return now - timedelta(seconds=int(match["amount"]) * UNIT[match["unit"]])
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequestError(
            f"{name}: expected an ISO 8601 time (2026-01-31T12:00:00Z) or a duration back from now (30m, 24h, 7d)"
        ) from None
    if moment.year < 2000 or moment.year > 2999:
        raise BadRequestError(f"{name}: year {moment.year} is out of range")
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_identifier(name: str, value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    text = value.strip()
    if len(text) > MAX_TEXT or not IDENTIFIER_PATTERN.match(text):
        raise BadRequestError(f"{name}: must be at most {MAX_TEXT} characters matching {IDENTIFIER_PATTERN.pattern}")
    return text


def parse_text(name: str, value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    if len(value) > MAX_TEXT:
        raise BadRequestError(f"{name}: at most {MAX_TEXT} characters")
    return value.strip()


def parse_status(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    text = value.strip().lower()
    if not STATUS.match(text):
        raise BadRequestError("status: expected ok, error, 2xx, 4xx, 5xx or a status code such as 429")
    return text


def parse_uuid(name: str, value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise BadRequestError(f"{name}: '{value[:80]}' is not a UUID") from None


def parse_cursor(name: str, value: str | None) -> Cursor | None:
    if value is None or not value.strip():
        return None
    try:
        return Cursor.decode(value.strip())
    except ValueError:
        raise BadRequestError(f"{name}: not a cursor returned by this API (use next_cursor / prev_cursor)") from None


def request_filters(
    train_id: Annotated[str | None, Query(description="Only this train")] = None,
    account_id: Annotated[str | None, Query(description="Only this account")] = None,
    model: Annotated[str | None, Query(description="Only this model (exact)")] = None,
    status: Annotated[str | None, Query(description="ok, error, 2xx, 4xx, 5xx or a status code")] = None,
    since: Annotated[str | None, Query(description="ISO 8601 time or a duration back from now: 30m, 24h, 7d")] = None,
    until: Annotated[str | None, Query(description="ISO 8601 time or a duration back from now")] = None,
    q: Annotated[
        str | None,
        Query(description="Text in model, error, session, path or branch; or a request/conversation id"),
    ] = None,
) -> RequestFilters:
    now = datetime.now(UTC)
    start, end = parse_time("since", since, now), parse_time("until", until, now)
    if start is not None and end is not None and start >= end:
        raise BadRequestError("since: must be earlier than until")
    return RequestFilters(
        train_id=parse_identifier("train_id", train_id),
        account_id=parse_identifier("account_id", account_id),
        model=parse_text("model", model),
        status=parse_status(status),
        since=start,
        until=end,
        search=parse_text("q", q),
    )


FiltersDep = Annotated[RequestFilters, Depends(request_filters)]


def filter_query(filters: RequestFilters, raw: dict[str, str]) -> dict[str, str]:
    """The filter parameters of the current page as given (to build links that keep them)."""
    keys = ("train_id", "account_id", "model", "status", "since", "until", "q")
    return {key: raw[key] for key in keys if raw.get(key)}
