"""The time ranges of the overview and the width of their chart buckets."""

from __future__ import annotations

from datetime import datetime, timedelta

from prompttrain.dashboard.errors import BadRequestError

# range -> (length, bucket seconds): about 50-170 points a chart.
RANGES: dict[str, tuple[timedelta, int]] = {
    "1h": (timedelta(hours=1), 60),
    "6h": (timedelta(hours=6), 300),
    "24h": (timedelta(hours=24), 900),
    "7d": (timedelta(days=7), 3600),
    "30d": (timedelta(days=30), 6 * 3600),
}


def overview_range(name: str, now: datetime) -> tuple[datetime, datetime, int]:
    if name not in RANGES:
        raise BadRequestError(f"range: expected one of {', '.join(RANGES)}")
    length, bucket = RANGES[name]
    return now - length, now, bucket
