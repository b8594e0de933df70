"""The pricing table: how model ids find their rates, what is an estimate, cache TTLs, overrides."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from prompttrain.conversation.pricing import (
    PricingError,
    load_pricing,
    normalise_model,
    parse_pricing,
    shipped_document,
    token_counts,
)

TABLE = load_pricing()
MILLION = 1_000_000


@pytest.mark.parametrize(
    ("model", "normalised"),
    [
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
        ("us.anthropic.claude-opus-4-1-20250805-v1:0", "claude-opus-4-1"),
        ("claude-opus-4@20250514", "claude-opus-4"),
        ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
        ("claude-opus-4-6[1m]", "claude-opus-4-6"),
        ("Claude-3.5-Haiku", "claude-3-5-haiku"),
        ("anthropic/claude-sonnet-4.5", "claude-sonnet-4-5"),
        ("publishers/anthropic/models/claude-opus-4@20250514", "claude-opus-4"),
        ("not-a-claude-model", "not-a-claude-model"),
    ],
)
def test_model_ids_are_normalised_the_way_providers_spell_them(model: str, normalised: str) -> None:
    assert normalise_model(model) == normalised


@pytest.mark.parametrize(
    ("model", "input_rate", "output_rate", "estimated", "family"),
    [
        ("claude-sonnet-4-5-20250929", 3, 15, False, "sonnet"),
        ("claude-opus-4-1-20250805", 15, 75, False, "opus"),
        ("claude-opus-4-5", 5, 25, False, "opus"),
        ("claude-haiku-4-5-20251001", 1, 5, False, "haiku"),
        ("claude-3-5-haiku-20241022", 0.8, 4, False, "haiku"),
        ("claude-3-haiku-20240307", 0.25, 1.25, False, "haiku"),
        # A newer minor version of a listed line: priced like the line, but flagged.
        ("claude-sonnet-5-5", 3, 15, True, "sonnet"),
        # Unknown version of a known family: the family's rates, flagged.
        ("claude-opus-9", 5, 25, True, "opus"),
        # Nothing known at all: the default (Sonnet rates, as the reference), flagged.
        ("some-other-model", 3, 15, True, "other"),
    ],
)
def test_rates_and_estimates(model: str, input_rate: float, output_rate: float, estimated: bool, family: str) -> None:
    cost = TABLE.cost(model, {"input_tokens": MILLION, "output_tokens": 0})
    assert cost.usd == pytest.approx(input_rate)
    assert cost.estimated is estimated
    assert TABLE.cost(model, {"output_tokens": MILLION}).usd == pytest.approx(output_rate)
    assert TABLE.family(model) == family


def test_cache_writes_are_priced_by_ttl_and_reads_at_a_tenth() -> None:
    usage = {
        "input_tokens": 0,
        "cache_creation_input_tokens": 3 * MILLION,
        "cache_creation": {"ephemeral_5m_input_tokens": MILLION, "ephemeral_1h_input_tokens": 2 * MILLION},
        "cache_read_input_tokens": MILLION,
    }
    # Sonnet: 5-minute write 3.75, 1-hour write 6, read 0.30 per million.
    assert TABLE.cost("claude-sonnet-4-5", usage).usd == pytest.approx(3.75 + 12 + 0.3)
    counts = token_counts(usage)
    assert (counts.cache_write_5m, counts.cache_write_1h, counts.cache_read) == (MILLION, 2 * MILLION, MILLION)


def test_cache_writes_without_a_split_are_five_minute_writes() -> None:
    counts = token_counts({"cache_creation_input_tokens": 400})
    assert (counts.cache_write_5m, counts.cache_write_1h) == (400, 0)
    # A split that does not add up: the remainder is priced at the default TTL.
    partial = token_counts({"cache_creation_input_tokens": 500, "cache_creation": {"ephemeral_1h_input_tokens": 100}})
    assert (partial.cache_write_5m, partial.cache_write_1h) == (400, 100)


def test_explicit_cache_rates_win_over_the_multipliers() -> None:
    usage = {"cache_creation_input_tokens": MILLION, "cache_read_input_tokens": MILLION}
    assert TABLE.cost("claude-3-haiku-20240307", usage).usd == pytest.approx(0.30 + 0.03)


def test_introductory_rates_apply_by_request_time() -> None:
    usage = {"input_tokens": MILLION, "output_tokens": MILLION}
    before = datetime(2026, 8, 31, 23, 59, tzinfo=UTC)
    after = datetime(2026, 9, 1, tzinfo=UTC)
    assert TABLE.cost("claude-sonnet-5", usage, before).usd == pytest.approx(2 + 10)
    assert TABLE.cost("claude-sonnet-5", usage, after).usd == pytest.approx(3 + 15)


def test_nothing_billed_costs_nothing_and_is_no_estimate() -> None:
    cost = TABLE.cost("unknown-model", {"input_tokens": 0, "output_tokens": 0})
    assert (cost.usd, cost.estimated) == (0.0, False)
    assert TABLE.cost(None, None).usd == 0.0


def test_iterations_are_priced_by_their_own_model_and_empty_ones_are_free() -> None:
    usage = {
        "input_tokens": 2 * MILLION,
        "output_tokens": MILLION,
        "iterations": [
            {"model": "claude-opus-4-1", "input_tokens": MILLION, "output_tokens": 0},
            {"model": "claude-sonnet-4-5", "input_tokens": MILLION, "output_tokens": MILLION},
        ],
    }
    cost = TABLE.cost("claude-opus-4-1", usage)
    assert cost.usd == pytest.approx(3 + 15)
    assert not cost.estimated


def test_an_override_file_replaces_and_extends_entries(tmp_path: Path) -> None:
    override = tmp_path / "pricing.json"
    override.write_bytes(
        orjson.dumps(
            {
                "models": {
                    "claude-sonnet-4-5": {"input": 2.5, "output": 12.5},
                    "claude-internal-7": {"input": 1, "output": 2, "cache_read": 0.5},
                },
                "families": {"internal": {"input": 9, "output": 9}},
            }
        )
    )
    table = load_pricing(override)
    assert table.cost("claude-sonnet-4-5-20250929", {"input_tokens": MILLION}).usd == pytest.approx(2.5)
    internal = table.cost("claude-internal-7", {"cache_read_input_tokens": MILLION})
    assert (internal.usd, internal.estimated) == (pytest.approx(0.5), False)
    assert table.family("claude-internal-8") == "internal"
    # Entries the override does not name are the shipped ones.
    assert table.cost("claude-opus-4-1", {"input_tokens": MILLION}).usd == pytest.approx(15)


@pytest.mark.parametrize(
    "document",
    [
        {"models": {"claude-x": {"input": 1}}},
        {"models": {"claude-x": {"input": -1, "output": 1}}},
        {"models": {"claude-x": {"input": "1", "output": 1}}},
        {"models": {"claude-x": {"input": 1, "output": 1, "introductory": {"until": "soon"}}}},
        {"models": []},
    ],
)
def test_malformed_overrides_are_refused_with_the_entry_named(document: object) -> None:
    with pytest.raises(PricingError, match=r"override"):
        parse_pricing(shipped_document(), document, override_source="override.json")


def test_an_unreadable_override_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(PricingError, match=r"missing\.json"):
        load_pricing(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(PricingError, match="not valid JSON"):
        load_pricing(broken)


def test_every_shipped_entry_is_complete() -> None:
    for name, entry in TABLE.models.items():
        rates = entry.rates
        assert rates.output > rates.input > 0, name
        assert rates.cache_write_1h > rates.cache_write_5m > rates.input > rates.cache_read > 0, name
