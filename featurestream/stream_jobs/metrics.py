"""Prometheus metrics of the stream worker (served over HTTP by ``featurestream worker``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("featurestream_events_total", "Valid events processed", ["source"])
DEAD_LETTERS = Counter("featurestream_dead_letters_total", "Events sent to the dead-letter topic", ["source", "reason"])
REPLAYED = Counter("featurestream_replayed_events_total", "Redelivered events skipped as already applied", ["source"])
REBUILT = Counter(
    "featurestream_rebuilt_states_total",
    "Entity states rebuilt from the archive (written for another layout of their view)",
    ["source"],
)
LATE = Counter("featurestream_late_events_total", "Events too old for every online window (archived only)", ["view"])
BATCH_SECONDS = Histogram(
    "featurestream_batch_seconds",
    "Time to process one batch end to end",
    ["source"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
BATCH_SIZE = Histogram("featurestream_batch_events", "Records per batch", ["source"], buckets=(1, 10, 100, 500, 1000, 2000, 5000))
SINK_FAILURES = Counter("featurestream_sink_failures_total", "Batches that failed to reach Redis or PostgreSQL (retried)", ["source"])
LAG_SECONDS = Gauge("featurestream_event_lag_seconds", "Wall clock minus the newest event time of the last batch", ["source"])


def reason_class(reason: str) -> str:
    """A low-cardinality label for a dead-letter reason."""
    if reason.startswith("not valid JSON") or reason.startswith("expected a JSON object"):
        return "malformed"
    if reason.startswith("not a valid Avro"):
        return "malformed"
    if reason.startswith("missing required field"):
        return "missing_field"
    if "expected" in reason:
        return "wrong_type"
    if "minimum" in reason or "maximum" in reason or "allowed" in reason or "longer than" in reason:
        return "constraint"
    if "event time" in reason:
        return "event_time"
    return "other"
