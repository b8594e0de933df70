"""Every Prometheus metric object. Names start with `prompttrain_`; labels are bounded sets only.

Units are in the names (`_seconds`, `_usd`, `_bytes`, `_ratio`), counters end in `_total` once exposed. Label
values come from configuration (trains, accounts), from small fixed sets (model family, status class, token
kind, error type) or are folded into "unknown"/"other": a client cannot create a series by sending a new header,
model name or conversation. Who sets what: the request path (`proxy/exchange_metrics.py`, one increment or
observation per request), the writer and its observers (usage, cost, windows, errors; off the request path), the
OAuth manager and the Slack sender.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# `*_created` samples would double every counter's and histogram's series for a timestamp nobody graphs.
disable_created_metrics()  # type: ignore[no-untyped-call]

WRITER_QUEUE_DEPTH = Gauge(
    "prompttrain_writer_queue_depth",
    "Records waiting in memory for the database, by lane (metadata records are never dropped).",
    ["lane"],
)
WRITER_QUEUE_BYTES = Gauge(
    "prompttrain_writer_payload_queue_bytes",
    "Bytes of request and response bodies waiting in memory for the database.",
)
RECORDS_WRITTEN = Counter("prompttrain_records_written_total", "Records written to the database, by lane.", ["lane"])
RECORDS_SPOOLED = Counter(
    "prompttrain_records_spooled_total",
    "Metadata records written to the local spool while the database was unavailable.",
)
RECORDS_REPLAYED = Counter(
    "prompttrain_records_replayed_total", "Spooled metadata records written to the database after it came back."
)
RECORDS_LOST = Counter(
    "prompttrain_records_lost_total",
    "Metadata records that could not be kept: the spool was full, or the database refused the row itself.",
)
PAYLOADS_SHED = Counter(
    "prompttrain_payloads_shed_total", "Request/response bodies not stored because of memory or database pressure."
)
SPOOL_BYTES = Gauge("prompttrain_spool_bytes", "Size of the local spool of metadata records waiting for the database.")
RECORDER_KEPT_BYTES = Gauge(
    "prompttrain_recorder_unconfirmed_bytes",
    "Bytes of exchanges the proxy keeps until its recording process confirms them stored (or spooled).",
)
RECORDER_RESTARTS = Counter(
    "prompttrain_recorder_restarts", "Times the proxy started a new recording process after one exited."
)

# -- requests (observed on the request path: a counter increment or a histogram observation each, no parsing) --
# Labels: train (configured trains, or "unknown"), account (configured accounts, "passthrough" or "none"), model
# (the model family; the exact id only with METRICS_MODEL_LABEL=model, capped), status_class ("2xx".."5xx"),
# stream ("true"/"false"). Never a conversation, session, user or key.

# Claude Code turns stream for minutes: the duration buckets reach 10 minutes (LiteLLM's stop at 300 s).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
FIRST_TOKEN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# The proxy's own work is milliseconds; anything above a second is a bug worth seeing.
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

REQUESTS = Counter(
    "prompttrain_requests",
    "Requests answered by the proxy on /v1/*, by HTTP status class (in-band stream errors are counted in "
    "prompttrain_upstream_errors_total).",
    ["train", "account", "model", "status_class", "stream"],
)
REQUEST_DURATION = Histogram(
    "prompttrain_request_duration_seconds",
    "From the request's arrival to the last byte sent to the client.",
    ["train", "model", "stream"],
    buckets=DURATION_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "prompttrain_upstream_duration_seconds",
    "From sending the request upstream to the upstream's last byte.",
    ["train", "model", "stream"],
    buckets=DURATION_BUCKETS,
)
PROXY_OVERHEAD = Histogram(
    "prompttrain_proxy_overhead_seconds",
    "Time the proxy added before the first response byte, without the wait for the upstream (the "
    "x-prompttrain-overhead-ms header).",
    ["train", "stream"],
    buckets=OVERHEAD_BUCKETS,
)
IN_FLIGHT = Gauge("prompttrain_requests_in_flight", "Requests on /v1/* being answered right now.")
ACCOUNT_COOLDOWNS = Counter(
    "prompttrain_account_cooldowns",
    "Times an account was put in cooldown after the upstream answered 429.",
    ["account"],
)
OAUTH_REFRESHES = Counter(
    "prompttrain_oauth_refreshes",
    "Calls to the OAuth token endpoint, by result (success, rejected, unreachable, invalid_response).",
    ["account", "result"],
)

# -- usage (observed by the writer after it parsed each exchange, off the request path) -------------------------

FIRST_TOKEN = Histogram(
    "prompttrain_time_to_first_token_seconds",
    "From the request's arrival to the first content delta of a streamed response.",
    ["train", "model"],
    buckets=FIRST_TOKEN_BUCKETS,
)
TOKENS = Counter(
    "prompttrain_tokens",
    "Tokens billed, by kind: input, output, cache_read, cache_write_5m, cache_write_1h.",
    ["train", "account", "model", "kind"],
)
COST = Counter(
    "prompttrain_cost_usd",
    'Cost in USD from the pricing table; estimated="true" where the model was priced by its family.',
    ["train", "account", "model", "estimated"],
)
UPSTREAM_ERRORS = Counter(
    "prompttrain_upstream_errors",
    "Failed upstream exchanges by Anthropic error type (or timeout_error, upstream_connection_lost, "
    'incomplete_stream, unreachable); in_stream="true" for an error event after a 200 response had started.',
    ["train", "account", "error_type", "in_stream"],
)
WINDOW_UTILIZATION = Gauge(
    "prompttrain_subscription_window_utilization_ratio",
    "Utilisation (0..1) of a subscription account's 5-hour or 7-day window, as the last response reported it.",
    ["account", "window"],
)
WINDOW_RESET = Gauge(
    "prompttrain_subscription_window_reset_timestamp_seconds",
    "When a subscription account's 5-hour or 7-day window resets (Unix time), as the last response reported it.",
    ["account", "window"],
)
WINDOW_STATUS = Gauge(
    "prompttrain_subscription_status",
    "1 for the account's current unified rate-limit status (allowed, allowed_warning, rejected, other), else 0.",
    ["account", "status"],
)

# -- notifications ----------------------------------------------------------------------------------------------

SLACK_MESSAGES = Counter(
    "prompttrain_slack_messages",
    "Slack notifications by kind (turn, error) and result: sent, failed (error or timeout), dropped (queue "
    "full) or rate_limited.",
    ["kind", "result"],
)
SLACK_QUEUE_DEPTH = Gauge("prompttrain_slack_queue_depth", "Slack notifications waiting to be sent.")
TELEMETRY_EVENTS = Counter(
    "prompttrain_telemetry_events",
    "Per-request telemetry events for TELEMETRY_ENDPOINT by result: sent, failed (error or timeout), dropped "
    "(queue full).",
    ["result"],
)

OPERATOR_RECONCILIATIONS = Counter(
    "prompttrain_operator_reconciliations",
    "Train reconciliations that changed a Train's status, by outcome: ready (true/false) and the Ready reason.",
    ["ready", "reason"],
)

# What the proxy's recording processes set (the writer, its observers, telemetry). They report them to the proxy,
# whose /metrics serves them in place of its own (empty) copies. Slack's are the proxy's: it sends the notices.
RECORDER_METRICS = (
    WRITER_QUEUE_DEPTH,
    WRITER_QUEUE_BYTES,
    RECORDS_WRITTEN,
    RECORDS_SPOOLED,
    RECORDS_REPLAYED,
    RECORDS_LOST,
    PAYLOADS_SHED,
    SPOOL_BYTES,
    FIRST_TOKEN,
    TOKENS,
    COST,
    UPSTREAM_ERRORS,
    WINDOW_UTILIZATION,
    WINDOW_RESET,
    WINDOW_STATUS,
    TELEMETRY_EVENTS,
)
