"""What the proxy measures about each exchange, and which label values it may use.

Two places feed the metrics in `prompttrain.metrics`:

- `request_finished`, on the request path when a response has ended: one counter increment and up to three
  histogram observations from times the record already holds. No parsing.
- `UsageMeter`, a writer observer: tokens by kind, cost, time to first token, upstream errors (in-band stream
  errors included) and subscription windows, from the row the writer built off the request path.

Label values are bounded: `train` is a configured train (a request naming an unknown train is counted under
"unknown"), `account` a configured account, "passthrough" or "none", `model` the model family from the pricing
table ("other" when none matches). METRICS_MODEL_LABEL=model opts into exact model ids, still bounded: only
`claude-*` ids, at most MODEL_LABEL_CAP distinct ones per process, the rest fall back to their family. The label
policy is process-wide because the metric objects are: it is set once at start-up by `configure`.
"""

from __future__ import annotations

import re
from typing import Any

from prompttrain import metrics
from prompttrain.conversation.pricing import active_pricing, normalise_model, token_counts
from prompttrain.conversation.ratelimits import STATUSES, WINDOWS, status_label
from prompttrain.storage.records import BuiltRows, ExchangeRecord, Outcome

UNKNOWN_TRAIN = "unknown"
NO_ACCOUNT = "none"
MODEL_LABEL_CAP = 50
MODEL_LABEL_MODES = ("family", "model")
_EXACT_MODEL = re.compile(r"^claude-[a-z0-9-]{1,60}$")
# Anthropic's error types (https://docs.anthropic.com/en/api/errors) and the proxy's own names for failures that
# have no upstream body. Anything else an upstream says is "other": the label set stays fixed.
ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "api_error",
        "overloaded_error",
        "timeout_error",
        "upstream_connection_lost",
        "incomplete_stream",
        "unreachable",
    }
)
UPSTREAM_FAILURES = frozenset({Outcome.UPSTREAM_ERROR, Outcome.STREAM_ERROR, Outcome.TIMEOUT, Outcome.UNREACHABLE})
_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class ModelLabels:
    """Maps a client-supplied model id to a bounded label value (cached: the same few ids repeat)."""

    def __init__(self, mode: str = "family", cap: int = MODEL_LABEL_CAP) -> None:
        if mode not in MODEL_LABEL_MODES:
            raise ValueError(f"model label mode must be one of {', '.join(MODEL_LABEL_MODES)}")
        self.mode = mode
        self.cap = cap
        self._cache: dict[str, str] = {}
        self._exact: set[str] = set()

    def __call__(self, model: str | None) -> str:
        if not model:
            return "none"
        label = self._cache.get(model)
        if label is not None:
            return label
        label = self._label(model)
        if len(self._cache) < 4096:  # the cache itself must not grow with whatever clients send
            self._cache[model] = label
        return label

    def _label(self, model: str) -> str:
        family = active_pricing().family(model)
        if self.mode == "family":
            return family
        exact = normalise_model(model)
        if not _EXACT_MODEL.match(exact):
            return family
        if exact in self._exact or len(self._exact) < self.cap:
            self._exact.add(exact)
            return exact
        return family


_model_label = ModelLabels()


def configure(model_label_mode: str = "family") -> None:
    """Set the label policy (METRICS_MODEL_LABEL) once at start-up."""
    global _model_label
    _model_label = ModelLabels(model_label_mode)


def model_label(model: str | None) -> str:
    return _model_label(model)


def status_class(status: int | None) -> str:
    if status is None:
        return "none"
    return _STATUS_CLASSES.get(status // 100, "none")


def train_label(train_id: str, known: bool) -> str:
    return train_id if known else UNKNOWN_TRAIN


_RequestChildren = tuple[Any, Any, Any, Any]
# The labelled children of the request-path metrics, per label combination: `.labels()` validates and locks on every
# call, a dict lookup does not. Bounded like the labels themselves.
_children: dict[tuple[str, str, str, str, str], _RequestChildren] = {}


def _request_children(train: str, account: str, model: str, status: str, stream: str) -> _RequestChildren:
    key = (train, account, model, status, stream)
    children = _children.get(key)
    if children is None:
        children = _children[key] = (
            metrics.REQUESTS.labels(train, account, model, status, stream),
            metrics.REQUEST_DURATION.labels(train, model, stream),
            metrics.UPSTREAM_DURATION.labels(train, model, stream),
            metrics.PROXY_OVERHEAD.labels(train, stream),
        )
    return children


def request_finished(record: ExchangeRecord, train: str | None = None) -> None:
    """Count a finished request; `train` overrides the record's train (a rejected request's unknown train)."""
    finished = record.finished
    if finished is None:
        return
    requests, duration, upstream, overhead = _request_children(
        record.train_id if train is None else train,
        record.account_id or NO_ACCOUNT,
        _model_label(record.model),
        status_class(record.status_code),
        "true" if record.stream else "false",
    )
    requests.inc()
    duration.observe(finished - record.started)
    if record.upstream_sent is not None:
        upstream.observe(finished - record.upstream_sent)
    if record.overhead_ms is not None:
        overhead.observe(record.overhead_ms / 1000.0)


def error_type_label(row: dict[str, Any]) -> str:
    outcome = row.get("outcome")
    if outcome == Outcome.UNREACHABLE:
        return "unreachable"
    if outcome == Outcome.TIMEOUT:
        return "timeout_error"
    error_type = row.get("error_type")
    return error_type if error_type in ERROR_TYPES else "other"


class UsageMeter:
    """Writer observer: usage, cost, first-token time, upstream errors and subscription windows of an exchange."""

    def __call__(self, record: ExchangeRecord, built: BuiltRows) -> None:
        if record.account_id is None:
            return  # rejected before an account was chosen: nothing reached the upstream
        row = built.metadata
        train, account = record.train_id, record.account_id
        model = _model_label(record.model)
        status = row.get("status_code")
        succeeded = status is not None and status < 400
        if succeeded:
            for kind, count in token_counts(row.get("usage")).by_kind().items():
                if count:
                    metrics.TOKENS.labels(train, account, model, kind).inc(count)
            cost = row.get("cost_usd") or 0.0
            if cost > 0:
                estimated = "true" if row.get("cost_estimated") else "false"
                metrics.COST.labels(train, account, model, estimated).inc(cost)
            first_token_ms = row.get("first_token_ms")
            if record.stream and first_token_ms is not None:
                metrics.FIRST_TOKEN.labels(train, model).observe(first_token_ms / 1000.0)
        if row.get("outcome") in UPSTREAM_FAILURES:
            in_stream = "true" if succeeded else "false"
            metrics.UPSTREAM_ERRORS.labels(train, account, error_type_label(row), in_stream).inc()
        self._windows(account, row)

    @staticmethod
    def _windows(account: str, row: dict[str, Any]) -> None:
        for window in WINDOWS:
            utilization = row.get(f"ratelimit_{window}_utilization")
            if utilization is not None:
                metrics.WINDOW_UTILIZATION.labels(account, window).set(utilization)
            resets_at = row.get(f"ratelimit_{window}_reset")
            if resets_at is not None:
                metrics.WINDOW_RESET.labels(account, window).set(resets_at.timestamp())
        status = row.get("ratelimit_status")
        if status is not None:
            current = status_label(status)
            for value in (*STATUSES, "other"):
                metrics.WINDOW_STATUS.labels(account, value).set(1.0 if value == current else 0.0)
