"""Naive reference values of demo features: plain Python over the raw events, written apart from
the aggregation core so that tests compare two independent computations.

Window rule (docs/aggregation.md): a sliding window of span S with tile size K, read at T,
covers event times in [floor(T / K) * K - S + K, T]; the near edge is exact, the far edge
is aligned to the tile grid.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

MINUTE_MS = 60_000


def window_start(read_ms: int, span_ms: int, tile_ms: int) -> int:
    return read_ms - read_ms % tile_ms - span_ms + tile_ms


def in_window(events: Iterable[tuple[int, dict[str, Any]]], read_ms: int, span_ms: int, tile_ms: int) -> list[dict[str, Any]]:
    lo = window_start(read_ms, span_ms, tile_ms)
    return [e for t, e in events if lo <= t <= read_ms]


def user_transactions_reference(events: list[tuple[int, int, dict[str, Any]]], read_ms: int) -> dict[str, Any]:
    """Features of the demo view ``user_transactions`` for one user; events are (time, offset, fields)."""
    timed = [(t, e) for t, _, e in events]
    hour = in_window(timed, read_ms, 60 * MINUTE_MS, MINUTE_MS)
    day = in_window(timed, read_ms, 24 * 60 * MINUTE_MS, 5 * MINUTE_MS)
    amounts_hour = [e["amount"] for e in hour]
    seen = [(t, off, e) for t, off, e in events if t <= read_ms]
    last = max(seen, key=lambda item: (item[0], item[1]))[2]["country"] if seen else None
    return {
        "txn_count_1h": len(hour),
        "txn_amount_sum_1h": sum(amounts_hour),
        "txn_amount_mean_1h": statistics.fmean(amounts_hour) if amounts_hour else None,
        "txn_amount_max_24h": max((e["amount"] for e in day), default=None),
        "distinct_merchants_24h": len({e["merchant"] for e in day}),
        "last_country": last,
    }


def assert_features_match(actual: dict[str, Any], expected: dict[str, Any], *, where: str) -> None:
    """Exact for counts and strings, 1e-9 relative for floats, 3% (HLL) for approximate distincts."""
    for name, want in expected.items():
        got = actual.get(name)
        if name.startswith("distinct_"):
            assert got is not None and abs(got - want) <= max(1, 0.03 * want), f"{where} {name}: {got} vs {want}"
        elif isinstance(want, float) and got is not None:
            assert abs(got - want) <= 1e-9 * max(1.0, abs(want)), f"{where} {name}: {got} vs {want}"
        else:
            assert got == want, f"{where} {name}: {got!r} vs {want!r}"
