"""`token_usage` (the dashboard's token-usage page and API) on SQLite and PostgreSQL, against a plain-Python model of
what it reports: rows a second either side of every window start, readings from columns, from stored headers and
none at all, and a number of queries that does not grow with the number of accounts."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from prompttrain.settings import normalise_database_url
from prompttrain.storage.dashboard_queries import (
    AccountUsage,
    TokenUsage,
    Totals,
    TrainUsage,
    UsagePoint,
    Window,
    WindowReading,
    token_usage,
    window_from_headers,
)
from prompttrain.storage.engine import create_engine
from tests.browser.support import insert, migrate_database, request_row

# Not on a whole hour, so that every trailing window starts inside an hour.
NOW = datetime(2026, 11, 20, 14, 37, 12, 345678, tzinfo=UTC)
WEEK_AGO = NOW - timedelta(days=7)
SECOND = timedelta(seconds=1)
NUMBERS = itertools.count(1)


def row(account: str | None, when: datetime, train: str = "alpha", **fields: Any) -> dict[str, Any]:
    """A request whose numbers say which row it is (sums of different rows differ); costs are exact in binary."""
    number = next(NUMBERS)
    values: dict[str, Any] = {
        "account_id": account,
        "train_id": train,
        "timestamp": when,
        "input_tokens": 1000 * number + 1,
        "output_tokens": 100 * number + 3,
        "cache_read_input_tokens": 10_000 * number,
        "cache_creation_input_tokens": 7 * number,
        "cost_usd": number / 64,
    }
    values.update(fields)
    return request_row(**values)


def columns(status: str, five: float, five_reset: datetime, seven: float, seven_reset: datetime) -> dict[str, Any]:
    return {
        "ratelimit_status": status,
        "ratelimit_5h_utilization": five,
        "ratelimit_5h_reset": five_reset,
        "ratelimit_7d_utilization": seven,
        "ratelimit_7d_reset": seven_reset,
    }


def headers(five: float, five_reset: datetime, seven: float, seven_reset: datetime) -> dict[str, str]:
    return {
        "request-id": "req_1",
        "anthropic-ratelimit-unified-status": "allowed",
        "anthropic-ratelimit-unified-5h-utilization": str(five),
        "anthropic-ratelimit-unified-5h-reset": str(int(five_reset.timestamp())),
        "anthropic-ratelimit-unified-7d-utilization": str(seven),
        "anthropic-ratelimit-unified-7d-reset": str(int(seven_reset.timestamp())),
    }


def scenario() -> list[dict[str, Any]]:
    # max-a: readings in the ratelimit_* columns, windows that reset in the middle of an hour.
    a_five_reset = NOW + timedelta(hours=1, minutes=23, seconds=20)
    a_seven_reset = NOW + timedelta(days=2, hours=3, minutes=5, seconds=7)
    a_five, a_seven = a_five_reset - timedelta(hours=5), a_seven_reset - timedelta(days=7)
    # hdr-b: readings only in the stored response headers, windows that reset on the hour.
    b_five_reset = datetime(2026, 11, 20, 17, 0, tzinfo=UTC)
    b_seven_reset = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)
    b_five, b_seven = b_five_reset - timedelta(hours=5), b_seven_reset - timedelta(days=7)
    # key-c: no readings at all (an API key): the trailing 5 hours and 7 days.
    c_five = NOW - timedelta(hours=5)
    rows = [
        row("max-a", NOW - timedelta(minutes=10), **columns("allowed_warning", 0.91, a_five_reset, 0.4, a_seven_reset)),
        row("max-a", a_five + SECOND),
        row("max-a", a_five - SECOND, train="beta"),
        row("max-a", a_five.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)),  # the next full hour
        row("max-a", a_five - timedelta(hours=2)),
        row("max-a", a_seven + SECOND),
        row("max-a", a_seven - SECOND),
        row("max-a", WEEK_AGO - timedelta(minutes=1), **columns("allowed", 0.1, NOW, 0.1, NOW)),
        row("max-a", NOW + timedelta(seconds=30)),  # a proxy whose clock is ahead: only its last request
        row(
            "max-a",
            NOW - timedelta(minutes=3),
            status_code=529,
            outcome="upstream_error",
            input_tokens=0,
            output_tokens=0,
            cost_usd=0.0,
        ),
        row("hdr-b", NOW - timedelta(minutes=10)),
        row(
            "hdr-b",
            NOW - timedelta(minutes=20),
            train="beta",
            response_headers=headers(0.66, b_five_reset, 0.25, b_seven_reset),
        ),
        row("hdr-b", NOW - timedelta(minutes=15), response_headers={"request-id": "req_2"}),
        row("hdr-b", b_five, train="beta"),
        row("hdr-b", b_five - SECOND),
        row("hdr-b", b_seven),
        row("hdr-b", b_seven - SECOND, train="beta"),
        row("key-c", NOW, train="beta"),
        row("key-c", c_five),
        row("key-c", c_five + SECOND, train="beta"),
        row("key-c", c_five - SECOND),
        row("key-c", c_five.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1), train="beta"),
        row("key-c", WEEK_AGO + SECOND, train="beta"),
        row("key-c", WEEK_AGO - SECOND),
        # Windows that reset in the past: the reading is reported, the windows are the trailing ones.
        row(
            "lapsed-d", NOW - timedelta(hours=6), **columns("allowed", 0.5, NOW - timedelta(hours=1), 0.7, NOW - SECOND)
        ),
        row("lapsed-d", NOW - timedelta(hours=1), train="beta"),
        # Configured, last seen 7.5 days ago: its reading still counts (one day of look-back), its windows are empty.
        row("stale-f", WEEK_AGO - timedelta(hours=12), **columns("rejected", 1.0, NOW - timedelta(days=2), 0.9, NOW)),
        # Requests without an account count for their train only.
        row(None, NOW - timedelta(hours=1), train="gamma"),
        row(None, NOW - timedelta(days=3), train="gamma"),
    ]
    # deep-g: its headers are older than the 50 responses the look-back reads.
    rows.append(
        row("deep-g", NOW - timedelta(hours=2), response_headers=headers(0.3, NOW + timedelta(hours=1), 0.3, NOW))
    )
    rows += [row("deep-g", NOW - timedelta(minutes=100 - minute)) for minute in range(50)]
    return rows


# -- what token_usage reports, computed row by row ---------------------------------------------------------------


def totals(rows: Iterable[Mapping[str, Any]]) -> Totals:
    result = Totals()
    for item in rows:
        result.add(
            Totals(
                requests=1,
                errors=int(item["outcome"] != "completed"),
                input_tokens=item["input_tokens"],
                output_tokens=item["output_tokens"],
                cache_read_input_tokens=item["cache_read_input_tokens"],
                cache_creation_input_tokens=item["cache_creation_input_tokens"],
                cost_usd=item["cost_usd"],
            )
        )
    return result


def reading_of(rows: Iterable[Mapping[str, Any]]) -> WindowReading | None:
    """The newest reading in the columns (8 days back), else in the headers of the 50 newest responses of the week."""
    newest_first = sorted(rows, key=lambda item: item["timestamp"], reverse=True)
    for item in newest_first:
        if item["timestamp"] >= WEEK_AGO - timedelta(days=1) and (
            item.get("ratelimit_5h_utilization") is not None or item.get("ratelimit_7d_utilization") is not None
        ):
            return WindowReading(
                item["ratelimit_status"],
                item["timestamp"],
                item["ratelimit_5h_utilization"],
                item["ratelimit_5h_reset"],
                item["ratelimit_7d_utilization"],
                item["ratelimit_7d_reset"],
            )
    for item in [item for item in newest_first if item["timestamp"] >= WEEK_AGO][:50]:
        found = window_from_headers(item.get("response_headers") or {}, item["timestamp"])
        if found is not None:
            return found
    return None


def window_start(reset: datetime | None, length: timedelta) -> datetime:
    return reset - length if reset is not None and reset > NOW and reset - length <= NOW else NOW - length


def expected(rows: list[dict[str, Any]], configured: Iterable[str]) -> TokenUsage:
    week = [item for item in rows if WEEK_AGO <= item["timestamp"] <= NOW]
    by_account: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in rows:
        if item["account_id"] is not None:
            by_account[item["account_id"]].append(item)
    last = {
        name: max(item["timestamp"] for item in own)
        for name, own in by_account.items()
        if any(item["timestamp"] >= WEEK_AGO for item in own)
    }
    accounts = []
    for name in sorted(set(last) | set(configured)):
        own = by_account.get(name, [])
        reading = reading_of(own)
        windows = []
        for length, utilization, reset in (
            (timedelta(hours=5), "five_hour_utilization", "five_hour_reset"),
            (timedelta(days=7), "seven_day_utilization", "seven_day_reset"),
        ):
            resets_at = getattr(reading, reset) if reading else None
            start = window_start(resets_at, length)
            inside = totals(item for item in own if start <= item["timestamp"] <= NOW)
            windows.append(Window(getattr(reading, utilization) if reading else None, resets_at, inside))
        accounts.append(
            AccountUsage(
                account_id=name,
                status=reading.status if reading else None,
                observed_at=reading.observed_at if reading else None,
                five_hour=windows[0],
                seven_day=windows[1],
                last_request=last.get(name),
            )
        )
    trains = [
        TrainUsage(
            train_id=train,
            five_hour=totals(
                item for item in week if item["train_id"] == train and item["timestamp"] >= NOW - timedelta(hours=5)
            ),
            seven_day=totals(item for item in week if item["train_id"] == train),
        )
        for train in sorted({item["train_id"] for item in week})
    ]
    hours: dict[tuple[datetime, str], list[dict[str, Any]]] = defaultdict(list)
    for item in week:
        if item["account_id"] is not None:
            hours[(item["timestamp"].replace(minute=0, second=0, microsecond=0), item["account_id"])].append(item)
    hourly = [
        UsagePoint(
            start, account, sum(item["output_tokens"] for item in part), sum(item["input_tokens"] for item in part)
        )
        for (start, account), part in sorted(hours.items())
    ]
    return TokenUsage(now=NOW, accounts=accounts, trains=trains, hourly=hourly)


def measured(database_url: str, configured: list[str]) -> tuple[TokenUsage, list[str]]:
    """token_usage at NOW, and the statements it sent."""
    statements: list[str] = []

    async def run() -> TokenUsage:
        engine = create_engine(normalise_database_url(database_url), pool_size=1)

        def record(*arguments: Any) -> None:
            statements.append(str(arguments[2]))

        try:
            async with engine.connect() as connection:
                sa.event.listen(connection.sync_connection, "before_cursor_execute", record)
                return await token_usage(connection, NOW, configured)
        finally:
            await engine.dispose()

    return asyncio.run(run()), statements


def test_token_usage_matches_the_rows_per_account_window_train_and_hour(database_url: str) -> None:
    migrate_database(database_url)
    rows = scenario()
    insert(database_url, rows)
    configured = ["max-a", "idle-e", "stale-f"]
    usage, _ = measured(database_url, configured)
    assert usage == expected(rows, configured)
    # The scenario reaches what it is about (so that the comparison above compares something).
    accounts = {account.account_id: account for account in usage.accounts}
    assert set(accounts) == {"max-a", "hdr-b", "key-c", "lapsed-d", "stale-f", "idle-e", "deep-g"}
    assert accounts["max-a"].five_hour.tokens.requests == 4 and accounts["max-a"].five_hour.tokens.errors == 1
    assert accounts["max-a"].seven_day.tokens.requests == 7
    assert accounts["max-a"].last_request == NOW + timedelta(seconds=30)
    assert accounts["hdr-b"].five_hour.utilization == 0.66 and accounts["hdr-b"].five_hour.tokens.requests == 4
    assert accounts["key-c"].five_hour.tokens.requests == 4 and accounts["key-c"].seven_day.tokens.requests == 6
    assert accounts["lapsed-d"].status == "allowed" and accounts["lapsed-d"].five_hour.tokens.requests == 1
    assert accounts["stale-f"].status == "rejected" and accounts["stale-f"].last_request is None
    assert accounts["deep-g"].status is None and accounts["deep-g"].seven_day.tokens.requests == 51
    assert [train.train_id for train in usage.trains] == ["alpha", "beta", "gamma"]


def test_token_usage_sends_the_same_few_queries_for_many_accounts(database_url: str) -> None:
    migrate_database(database_url)
    rows = []
    for number in range(40):
        name = f"bulk-{number:02d}"
        # Half with readings whose windows reset mid-hour, half without (trailing windows).
        reading = columns(
            "allowed", 0.5, NOW + timedelta(minutes=number + 1), 0.5, NOW + timedelta(days=1, minutes=number)
        )
        rows.append(row(name, NOW - timedelta(minutes=number), **(reading if number % 2 else {})))
        rows.append(row(name, NOW - timedelta(hours=4, minutes=59), response_headers={"request-id": f"req_{number}"}))
    insert(database_url, rows)
    usage, statements = measured(database_url, [])
    assert usage == expected(rows, [])
    assert len(usage.accounts) == 40
    # One pass over the week, later requests, readings, headers, window edges (and SET LOCAL on PostgreSQL).
    assert len(statements) <= 6, statements
