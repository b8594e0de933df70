"""Metrics from several recording processes become one exposition: counts add up, window readings take the highest."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from prompttrain import metrics
from prompttrain.storage.recorder import merge_families


def one_process(tokens: float, utilization: float, first_token: list[float]) -> list[Metric]:
    registry = CollectorRegistry()
    counter = Counter("prompttrain_tokens", "t", ["kind"], registry=registry)
    counter.labels("input").inc(tokens)
    window = Gauge(metrics.WINDOW_UTILIZATION._name, "w", ["account", "window"], registry=registry)
    window.labels("acct", "5h").set(utilization)
    histogram = Histogram("prompttrain_first_token_seconds", "f", buckets=(1.0, 5.0), registry=registry)
    for value in first_token:
        histogram.observe(value)
    return list(registry.collect())


def samples(families: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }


def test_counts_add_up_and_window_readings_take_the_highest() -> None:
    merged = samples(merge_families([one_process(10, 0.25, [0.5]), one_process(5, 0.75, [3.0, 7.0])]))
    assert merged["prompttrain_tokens_total", (("kind", "input"),)] == 15
    assert merged[metrics.WINDOW_UTILIZATION._name, (("account", "acct"), ("window", "5h"))] == 0.75
    assert merged["prompttrain_first_token_seconds_count", ()] == 3
    assert merged["prompttrain_first_token_seconds_bucket", (("le", "1.0"),)] == 1
    assert merged["prompttrain_first_token_seconds_bucket", (("le", "5.0"),)] == 2
    assert merged["prompttrain_first_token_seconds_sum", ()] == 10.5


def test_one_process_is_passed_through() -> None:
    report = one_process(1, 0.5, [])
    assert merge_families([report]) is report
