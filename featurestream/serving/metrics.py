"""Prometheus metrics of the serving layer (exposed on /metrics by the REST server and on the
metrics port of `featurestream serve`)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUEST_SECONDS = Histogram(
    "featurestream_serving_seconds",
    "Time in the serving layer per request",
    ["method"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
VALUES = Counter("featurestream_served_values_total", "Feature values served", ["method"])
CACHE = Counter("featurestream_serving_cache_total", "Entity state cache lookups", ["result"])
REDIS_ERRORS = Counter("featurestream_serving_redis_errors_total", "Requests failed because Redis was unreachable")
STALE_LAYOUT = Counter(
    "featurestream_serving_old_layout_states_total",
    "Entity states written for an older layout of their view (served as MISSING until rebuilt)",
)
