"""Subscription windows read from Anthropic's `anthropic-ratelimit-unified-*` response headers.

Claude subscription (OAuth) accounts get, on every response, the overall status (`allowed`, `allowed_warning`,
`rejected`) and per window (`5h`, `7d`) a utilisation in [0, 1] and the reset time in epoch seconds. API-key
accounts get none of these; then there is nothing to report. Pure parsing, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

PREFIX = "anthropic-ratelimit-unified-"
WINDOWS = ("5h", "7d")
# Metric label values for the status; anything else Anthropic may add later is reported as "other".
STATUSES = ("allowed", "allowed_warning", "rejected")


@dataclass(frozen=True)
class Window:
    utilization: float | None
    resets_at: datetime | None
    status: str | None = None


@dataclass(frozen=True)
class WindowReport:
    """What one response said about its account's subscription windows."""

    status: str | None
    windows: Mapping[str, Window]

    def window(self, name: str) -> Window:
        return self.windows.get(name) or Window(None, None)


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _instant(value: str | None) -> datetime | None:
    seconds = _float(value)
    if seconds is None:
        if value:
            # Some responses carry an ISO 8601 instant rather than epoch seconds.
            try:
                parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            except ValueError:
                return None
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        return None
    if not 0 < seconds < 1e11:
        return None
    return datetime.fromtimestamp(seconds, UTC)


def parse_windows(headers: Mapping[str, str]) -> WindowReport | None:
    """The windows a response reported (header names in lower case), or None when it reported none."""
    if not any(name.startswith(PREFIX) for name in headers):
        return None
    windows: dict[str, Window] = {}
    for name in WINDOWS:
        utilization = _float(headers.get(f"{PREFIX}{name}-utilization"))
        resets_at = _instant(headers.get(f"{PREFIX}{name}-reset"))
        status = headers.get(f"{PREFIX}{name}-status")
        if utilization is not None or resets_at is not None or status is not None:
            windows[name] = Window(
                utilization=max(0.0, utilization) if utilization is not None else None,
                resets_at=resets_at,
                status=status[:32] if status else None,
            )
    status = headers.get(f"{PREFIX}status")
    return WindowReport(status=status.strip()[:32] if status else None, windows=windows)


def status_label(status: str | None) -> str:
    return status if status in STATUSES else "other"
