"""What a response cost in USD: the pricing table, how a model id finds its rates, and the arithmetic.

The table ships as package data (`prompttrain/data/pricing.json`); `PRICING_FILE` names a JSON document of the same
shape whose `models` and `families` entries replace or extend the shipped ones (and whose `default`, if given,
replaces the default). Rates are USD per million tokens for input, output, cache writes (5-minute and 1-hour TTL)
and cache reads; cache rates left out derive from the input rate with Anthropic's published multipliers.

A model id finds its rates in this order (first hit wins):

1. the normalised id is a `models` key (exact price);
2. the longest `models` key that the id extends at a `-` boundary (`claude-sonnet-5-5` → `claude-sonnet-5`): an
   estimate, the newer minor version is assumed to cost what its line costs;
3. the first `families` name the id contains (`opus`, `sonnet`, `haiku`, ...): an estimate;
4. `default`: an estimate (the reference prices unknown models at Sonnet rates and flags them too, §5).

Estimated costs are stored with `cost_estimated = true`, so a dashboard can say "about".

Usage may split cache writes by TTL (`cache_creation: {ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}`);
without the split every cache write is priced as a 5-minute write, the API's default TTL. When usage carries
`iterations` (server-side fallback) each iteration is priced by its own model, and iterations that produced no
output are free, as the reference does (§5).

Pure logic apart from `load_pricing`, which reads the two JSON files once at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

PER_MILLION = 1_000_000.0
CACHE_WRITE_5M_FACTOR = 1.25
CACHE_WRITE_1H_FACTOR = 2.0
CACHE_READ_FACTOR = 0.1
OTHER_FAMILY = "other"

# Ids as providers spell them: "anthropic.claude-3-5-sonnet-20241022-v2:0" (Bedrock, maybe with a region prefix),
# "claude-opus-4@20250514" (Vertex), "anthropic/claude-sonnet-4.5" (routers), "claude-sonnet-4-5-20250929",
# "claude-3-7-sonnet-latest", "claude-opus-4-6[1m]".
_PROVIDER_PREFIX = re.compile(r"^(?:.*/)?(?:(?:[a-z]{2,6}\.)?anthropic\.)?")
_SUFFIXES = (
    re.compile(r"\[[^\]]*\]$"),
    re.compile(r"@.*$"),
    re.compile(r"-v\d+(:\d+)?$"),
    re.compile(r"-latest$"),
    re.compile(r"-\d{8}$"),
)


class PricingError(Exception):
    """A pricing document is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class Rates:
    """USD per million tokens."""

    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float


@dataclass(frozen=True)
class PriceEntry:
    rates: Rates
    introductory: Rates | None = None
    introductory_until: datetime | None = None

    def at(self, when: datetime | None) -> Rates:
        introductory, until = self.introductory, self.introductory_until
        if introductory is not None and until is not None and when is not None and when < until:
            return introductory
        return self.rates


@dataclass(frozen=True)
class TokenCounts:
    """Billable tokens by kind; `cache_write_5m + cache_write_1h` is the usage's `cache_creation_input_tokens`."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0

    @property
    def total(self) -> int:
        return self.input + self.output + self.cache_read + self.cache_write_5m + self.cache_write_1h

    def by_kind(self) -> dict[str, int]:
        return {
            "input": self.input,
            "output": self.output,
            "cache_read": self.cache_read,
            "cache_write_5m": self.cache_write_5m,
            "cache_write_1h": self.cache_write_1h,
        }


@dataclass(frozen=True)
class Cost:
    usd: float
    estimated: bool


FREE = Cost(0.0, False)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def token_counts(usage: Any) -> TokenCounts:
    """The billable tokens of a Messages API `usage` object (anything else counts as nothing)."""
    if not isinstance(usage, Mapping):
        return TokenCounts()
    written = _count(usage.get("cache_creation_input_tokens"))
    split = usage.get("cache_creation")
    five_minutes = one_hour = 0
    if isinstance(split, Mapping):
        five_minutes = _count(split.get("ephemeral_5m_input_tokens"))
        one_hour = _count(split.get("ephemeral_1h_input_tokens"))
    # Without a split (or with one that does not add up) the remainder is priced at the default 5-minute TTL.
    five_minutes += max(0, written - five_minutes - one_hour)
    return TokenCounts(
        input=_count(usage.get("input_tokens")),
        output=_count(usage.get("output_tokens")),
        cache_read=_count(usage.get("cache_read_input_tokens")),
        cache_write_5m=five_minutes,
        cache_write_1h=one_hour,
    )


def normalise_model(model: str) -> str:
    """The model id without provider prefixes, dates, versions and context-size suffixes, lower case."""
    name = model.strip().lower()
    name = _PROVIDER_PREFIX.sub("", name, count=1)
    changed = True
    while changed:
        changed = False
        for pattern in _SUFFIXES:
            stripped = pattern.sub("", name)
            if stripped != name:
                name, changed = stripped, True
    return name.replace(".", "-")


class PricingTable:
    """Model and family rates; lookups are cached (the same few model ids repeat for every request)."""

    def __init__(self, models: Mapping[str, PriceEntry], families: Mapping[str, PriceEntry], default: PriceEntry):
        self.models = dict(models)
        # Longest first, so `claude-opus-4-1` wins over `claude-opus-4` for `claude-opus-4-1-…`.
        self._prefixes = sorted(self.models, key=len, reverse=True)
        self.families = dict(families)
        self.default = default
        self.lookup = lru_cache(maxsize=1024)(self._lookup)

    @property
    def family_names(self) -> tuple[str, ...]:
        return tuple(self.families)

    def family(self, model: str | None) -> str:
        """The family a model id belongs to (a `families` key), or "other": a bounded metric label."""
        if not model:
            return OTHER_FAMILY
        return self.lookup(model)[2]

    def _lookup(self, model: str) -> tuple[PriceEntry, bool, str]:
        """(entry, estimated, family)."""
        name = normalise_model(model)
        family = next((family for family in self.families if family in name), OTHER_FAMILY)
        entry = self.models.get(name)
        if entry is not None:
            return entry, False, family
        for key in self._prefixes:
            if name.startswith(key + "-"):
                return self.models[key], True, family
        if family != OTHER_FAMILY:
            return self.families[family], True, family
        return self.default, True, family

    def cost(self, model: str | None, usage: Any, when: datetime | None = None) -> Cost:
        """The USD cost of one response's usage; free (and not an estimate) when nothing was billed."""
        iterations = usage.get("iterations") if isinstance(usage, Mapping) else None
        if isinstance(iterations, list) and iterations:
            total, estimated = 0.0, False
            for iteration in iterations:
                if not isinstance(iteration, Mapping) or _count(iteration.get("output_tokens")) == 0:
                    continue
                part = self._single(str(iteration.get("model") or model or ""), token_counts(iteration), when)
                total += part.usd
                estimated = estimated or part.estimated
            return Cost(total, estimated)
        return self._single(model or "", token_counts(usage), when)

    def _single(self, model: str, tokens: TokenCounts, when: datetime | None) -> Cost:
        if tokens.total == 0:
            return FREE
        entry, estimated, _ = self.lookup(model) if model else (self.default, True, OTHER_FAMILY)
        rates = entry.at(when)
        usd = (
            tokens.input * rates.input
            + tokens.output * rates.output
            + tokens.cache_read * rates.cache_read
            + tokens.cache_write_5m * rates.cache_write_5m
            + tokens.cache_write_1h * rates.cache_write_1h
        ) / PER_MILLION
        return Cost(usd, estimated)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise PricingError(f"{where}: must be a non-negative number")
    return float(value)


def _rates(document: Any, where: str, base: Rates | None = None) -> Rates:
    if not isinstance(document, Mapping):
        raise PricingError(f"{where}: must be an object")
    if base is None and ("input" not in document or "output" not in document):
        raise PricingError(f"{where}: needs 'input' and 'output' (USD per million tokens)")
    input_rate = _number(document["input"], f"{where}.input") if "input" in document else (base.input if base else 0)
    output_rate = (
        _number(document["output"], f"{where}.output") if "output" in document else (base.output if base else 0)
    )

    def cache(key: str, factor: float) -> float:
        if key in document:
            return _number(document[key], f"{where}.{key}")
        return round(input_rate * factor, 6)

    return Rates(
        input=input_rate,
        output=output_rate,
        cache_write_5m=cache("cache_write_5m", CACHE_WRITE_5M_FACTOR),
        cache_write_1h=cache("cache_write_1h", CACHE_WRITE_1H_FACTOR),
        cache_read=cache("cache_read", CACHE_READ_FACTOR),
    )


def _entry(document: Any, where: str) -> PriceEntry:
    rates = _rates(document, where)
    intro = document.get("introductory")
    if intro is None:
        return PriceEntry(rates)
    if not isinstance(intro, Mapping) or not isinstance(intro.get("until"), str):
        raise PricingError(f"{where}.introductory: needs 'until' (an ISO 8601 instant) and rates")
    try:
        until = datetime.fromisoformat(intro["until"].replace("Z", "+00:00"))
    except ValueError:
        raise PricingError(f"{where}.introductory.until: not an ISO 8601 instant") from None
    if until.tzinfo is None:
        until = until.replace(tzinfo=UTC)
    return replace(
        PriceEntry(rates), introductory=_rates(intro, f"{where}.introductory", rates), introductory_until=until
    )


def _section(document: Mapping[str, Any], key: str, source: str) -> dict[str, PriceEntry]:
    section = document.get(key, {})
    if not isinstance(section, Mapping):
        raise PricingError(f"{source}: '{key}' must be an object")
    entries: dict[str, PriceEntry] = {}
    for name, value in section.items():
        entries[normalise_model(name) if key == "models" else name.strip().lower()] = _entry(
            value, f"{source}: {key}.{name}"
        )
    return entries


def parse_pricing(
    base: Any, override: Any = None, *, source: str = "pricing", override_source: str = ""
) -> PricingTable:
    """A table from the shipped document, with an optional override document laid over it entry by entry."""
    documents = [(base, source)] + ([(override, override_source or "override")] if override is not None else [])
    models: dict[str, PriceEntry] = {}
    families: dict[str, PriceEntry] = {}
    default: PriceEntry | None = None
    for document, name in documents:
        if not isinstance(document, Mapping):
            raise PricingError(f"{name}: expected a JSON object")
        models.update(_section(document, "models", name))
        families.update(_section(document, "families", name))
        if "default" in document:
            default = _entry(document["default"], f"{name}: default")
    if default is None:
        raise PricingError(f"{source}: needs a 'default' entry")
    return PricingTable(models, families, default)


def shipped_document() -> Any:
    return orjson.loads(resources.files("prompttrain").joinpath("data/pricing.json").read_bytes())


def load_pricing(override_file: Path | None = None) -> PricingTable:
    """The shipped table, extended by `override_file` (PRICING_FILE) when given. Raises PricingError."""
    override = None
    if override_file is not None:
        try:
            override = orjson.loads(override_file.read_bytes())
        except OSError as error:
            raise PricingError(f"{override_file}: cannot read ({error.strerror})") from None
        except orjson.JSONDecodeError as error:
            raise PricingError(f"{override_file}: not valid JSON ({error})") from None
    return parse_pricing(shipped_document(), override, source="pricing.json", override_source=str(override_file))


_active: PricingTable | None = None


def active_pricing() -> PricingTable:
    """The table in force. Rows are built by the writer, which has no settings object: the proxy and its recording
    process install their table once at start-up (`use_pricing`), and until then the shipped table applies."""
    global _active
    if _active is None:
        _active = load_pricing()
    return _active


def use_pricing(table: PricingTable) -> None:
    global _active
    _active = table
