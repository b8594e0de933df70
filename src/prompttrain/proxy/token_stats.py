"""`GET /token-stats[?train_id=]`: usage totals per train and per account, aggregated from `api_requests`.

Answered from the database, not from process memory (unlike the reference, §5, whose counters reset on restart
and differ per replica): every replica gives the same answer, before and after restarts. Only requests that reached
an account are usage; requests the proxy rejected (unknown train, bad key) are not counted.

Per train and per account: all-time totals and the last 5 hours (rolling). Per subscription account also the
current 5-hour window as Anthropic reported it in the newest response's `anthropic-ratelimit-unified-*` headers
(utilisation, status, reset) with the usage recorded since that window started, and the 7-day window.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.responses import Response

from prompttrain.credentials import CredentialSnapshot, is_identifier
from prompttrain.proxy.errors import InvalidRequestError, ProxyError, ServiceUnavailableError
from prompttrain.storage.records import new_request_id
from prompttrain.storage.tables import api_requests

FIVE_HOURS = timedelta(hours=5)
# Windows older than this cannot be current any more (the longest window is 7 days).
WINDOW_LOOKBACK = timedelta(days=7)
T = api_requests.c


def _totals() -> list[sa.ColumnElement[Any]]:
    def total(column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(sa.func.sum(column), 0).label(name)

    return [
        sa.func.count().label("requests"),
        total(sa.case((T.outcome != "completed", 1), else_=0), "errors"),
        total(T.input_tokens, "input_tokens"),
        total(T.output_tokens, "output_tokens"),
        total(T.cache_read_input_tokens, "cache_read_input_tokens"),
        total(T.cache_creation_input_tokens, "cache_creation_input_tokens"),
        total(T.cost_usd, "cost_usd"),
        total(sa.case((T.cost_estimated, 1), else_=0), "estimated_cost_requests"),
        sa.func.min(T.timestamp).label("first_request_at"),
        sa.func.max(T.timestamp).label("last_request_at"),
    ]


EMPTY: dict[str, Any] = {
    "requests": 0,
    "errors": 0,
    "input_tokens": 0,
    "output_tokens": 0,
    "cache_read_input_tokens": 0,
    "cache_creation_input_tokens": 0,
    "cost_usd": 0.0,
    "estimated_cost_requests": 0,
    "first_request_at": None,
    "last_request_at": None,
}


_NOT_COUNTS = ("cost_usd", "first_request_at", "last_request_at")


def _utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    # SQLite hands back naive datetimes; everything is stored in UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(value: Any) -> str | None:
    instant = _utc(value)
    return instant.isoformat() if instant is not None else None


def _block(row: Any) -> dict[str, Any]:
    if row is None:
        return dict(EMPTY)
    block: dict[str, Any] = {key: int(row[key] or 0) for key in EMPTY if key not in _NOT_COUNTS}
    block["cost_usd"] = round(float(row["cost_usd"] or 0.0), 6)
    block["first_request_at"] = _iso(row["first_request_at"])
    block["last_request_at"] = _iso(row["last_request_at"])
    return {key: block[key] for key in EMPTY}


async def _grouped(
    connection: AsyncConnection, column: sa.ColumnElement[Any], where: list[sa.ColumnElement[bool]]
) -> dict[str, dict[str, Any]]:
    query = sa.select(column.label("key"), *_totals()).where(*where).group_by(column)
    rows = (await connection.execute(query)).mappings().all()
    return {str(row["key"]): _block(row) for row in rows}


async def _latest_windows(
    connection: AsyncConnection, where: list[sa.ColumnElement[bool]], now: datetime
) -> dict[str, dict[str, Any]]:
    ranked = (
        sa.select(
            T.account_id,
            T.timestamp,
            T.ratelimit_status,
            T.ratelimit_5h_utilization,
            T.ratelimit_5h_reset,
            T.ratelimit_7d_utilization,
            T.ratelimit_7d_reset,
            sa.func.row_number().over(partition_by=T.account_id, order_by=T.timestamp.desc()).label("rank"),
        )
        .where(*where, T.timestamp >= now - WINDOW_LOOKBACK, T.ratelimit_status.is_not(None))
        .subquery()
    )
    rows = (await connection.execute(sa.select(ranked).where(ranked.c.rank == 1))).mappings().all()
    return {str(row["account_id"]): dict(row) for row in rows}


async def collect(
    engine: AsyncEngine, snapshot: CredentialSnapshot, train_id: str | None, now: datetime | None = None
) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    where: list[sa.ColumnElement[bool]] = [T.account_id.is_not(None)]
    if train_id is not None:
        where.append(T.train_id == train_id)
    recent = [*where, T.timestamp >= now - FIVE_HOURS]
    async with engine.connect() as connection:
        trains = await _grouped(connection, T.train_id, where)
        trains_recent = await _grouped(connection, T.train_id, recent)
        accounts = await _grouped(connection, T.account_id, where)
        accounts_recent = await _grouped(connection, T.account_id, recent)
        latest = await _latest_windows(connection, where, now)
        window_usage: dict[str, dict[str, Any]] = {}
        for account, seen in latest.items():
            resets_at = _utc(seen["ratelimit_5h_reset"])
            if resets_at is not None and resets_at > now:
                since = resets_at - FIVE_HOURS
                usage = await _grouped(
                    connection, T.account_id, [*where, T.account_id == account, T.timestamp >= since]
                )
                window_usage[account] = usage.get(account, dict(EMPTY))
    if train_id is not None and train_id not in trains and train_id not in snapshot.trains:
        raise InvalidRequestError(f"train_id: unknown train '{train_id}'")
    names = {train_id} if train_id is not None else set(trains) | set(snapshot.trains)
    return {
        "generated_at": now.isoformat(),
        "train_id": train_id,
        "trains": {
            name: {"total": trains.get(name, dict(EMPTY)), "last_5h": trains_recent.get(name, dict(EMPTY))}
            for name in sorted(names)
        },
        "accounts": {
            name: {
                "total": accounts[name],
                "last_5h": accounts_recent.get(name, dict(EMPTY)),
                **_windows(latest.get(name), window_usage.get(name), now),
            }
            for name in sorted(accounts)
        },
    }


def _windows(seen: Mapping[str, Any] | None, usage: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
    """The subscription windows of an account as its newest response reported them (None for API keys)."""
    if seen is None:
        return {"window_5h": None, "window_7d": None}
    five_reset, seven_reset = _utc(seen["ratelimit_5h_reset"]), _utc(seen["ratelimit_7d_reset"])
    current = five_reset is not None and five_reset > now
    return {
        "window_5h": {
            "status": seen["ratelimit_status"],
            # A window whose reset passed is over: its last utilisation says nothing about the new one.
            "utilization": seen["ratelimit_5h_utilization"] if current else None,
            "starts_at": (five_reset - FIVE_HOURS).isoformat() if current and five_reset else None,
            "resets_at": five_reset.isoformat() if current and five_reset else None,
            "usage": usage if current else None,
            "observed_at": _iso(seen["timestamp"]),
        },
        "window_7d": {
            "utilization": seen["ratelimit_7d_utilization"] if seven_reset and seven_reset > now else None,
            "resets_at": seven_reset.isoformat() if seven_reset and seven_reset > now else None,
        },
    }


def _error(error: ProxyError) -> Response:
    return Response(error.body(str(new_request_id())), status_code=error.status, media_type="application/json")


async def answer(engine: AsyncEngine | None, snapshot: CredentialSnapshot, train_id: str | None) -> Response:
    if train_id is not None:
        train_id = train_id.strip()
        if not train_id or not is_identifier(train_id):
            return _error(InvalidRequestError("train_id: must match ^[A-Za-z0-9._:-]+$"))
    if engine is None:
        return _error(ServiceUnavailableError("token stats are read from the database, and storage is disabled"))
    try:
        stats = await collect(engine, snapshot, train_id)
    except ProxyError as error:
        return _error(error)
    except (SQLAlchemyError, OSError):
        return _error(ServiceUnavailableError("the database is unavailable; token stats cannot be read"))
    return Response(orjson.dumps(stats), media_type="application/json")
