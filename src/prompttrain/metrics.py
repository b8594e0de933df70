"""Every Prometheus metric object. Names start with `prompttrain_`; labels are bounded sets only."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
