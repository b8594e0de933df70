"""The Jinja2 environment of the pages: autoescaping always on, and the formatting filters templates use."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

TEMPLATES = Path(__file__).parent / "templates"
MISSING = "\u2013"  # an en dash where there is no value


def number(value: Any) -> str:
    if value is None:
        return MISSING
    return f"{int(value):,}".replace(",", "\u202f")


def compact(value: Any) -> str:
    if value is None:
        return MISSING
    amount = float(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(amount) >= limit:
            return f"{amount / limit:.1f}{suffix}"
    return f"{amount:.0f}"


def usd(value: Any) -> str:
    if value is None:
        return MISSING
    amount = float(value)
    return f"${amount:,.4f}" if 0 < abs(amount) < 1 else f"${amount:,.2f}"


def millis(value: Any) -> str:
    if value is None:
        return MISSING
    amount = float(value)
    return f"{amount / 1000:.2f} s" if amount >= 1000 else f"{amount:.0f} ms"


def percent(value: Any) -> str:
    return MISSING if value is None else f"{float(value) * 100:.0f}%"


def iso(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).isoformat()


def when(value: datetime | None) -> str:
    """UTC, to the second; the page script rewrites <time> elements into the viewer's local time."""
    return MISSING if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def short(value: Any) -> str:
    return str(value)[:8] if value is not None else MISSING


def nbytes(value: Any) -> str:
    if value is None:
        return MISSING
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"


def json_data(value: Any) -> Markup:
    """JSON for a <script type="application/json"> block: `<`, `>` and `&` escaped so no content can close the
    element (what Jinja's `tojson` does, with orjson and our dataclasses)."""
    from prompttrain.storage.dashboard_queries import to_json

    text = to_json(value).decode("utf-8")
    text = text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return Markup(text)  # noqa: S704 - escaped above for a JSON script block


def query(base: dict[str, Any], **changes: Any) -> str:
    """A query string: the current parameters with `changes` applied (None removes a key)."""
    merged = {**base, **changes}
    return urlencode({key: value for key, value in merged.items() if value not in (None, "")})


def create_environment() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(
        number=number,
        compact=compact,
        usd=usd,
        millis=millis,
        percent=percent,
        iso=iso,
        when=when,
        short=short,
        nbytes=nbytes,
        json_data=json_data,
    )
    environment.globals.update(
        query=query, pretty=lambda value: orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    )
    return environment
