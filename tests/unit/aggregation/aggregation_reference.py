"""A naive reference for aggregation tests: plain Python over the raw events, written from the
spec in docs/aggregation.md and sharing no code with featurestream.aggregation."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from featurestream.definitions.models import Feature, FeatureView

MIN = 60_000
HOUR = 3_600_000
BASE = 1_700_000_000_000 - 1_700_000_000_000 % HOUR  # an hour boundary
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

FIELD_TYPES = {"amount": "float64", "qty": "int64", "country": "string", "flag": "bool", "ts": "timestamp"}

WINDOWS: dict[str, Any] = {
    "5m": "5m",
    "1h": "1h",
    "2h": "2h",  # 5-minute tiles
    "2d": "2d",  # 1-hour tiles
    "tumble": {"type": "tumbling", "size": "10m"},
    "hop": {"type": "hopping", "size": "30m", "hop": "10m"},
    "life": None,
}

AGG_FIELDS: dict[str, tuple[str, ...]] = {
    "count": ("", "country"),
    "sum": ("amount", "qty"),
    "mean": ("amount", "qty"),
    "stddev": ("amount", "qty"),
    "min": ("qty", "ts", "amount"),
    "max": ("qty", "ts"),
    "first": ("country", "qty", "flag"),
    "last": ("country", "amount", "ts"),
    "approx_count_distinct": ("country", "qty"),
}


def all_features() -> list[Feature]:
    out = []
    for agg, fields in AGG_FIELDS.items():
        for fld in fields:
            for wname, window in WINDOWS.items():
                name = f"{agg}_{fld or 'all'}_{wname}".replace("approx_count_distinct", "acd")
                out.append(
                    Feature.model_validate(
                        {"name": name, "aggregation": agg, "field": fld or None, "window": window}
                    )
                )
    return out


def make_view(features: list[Feature] | None = None, filters: tuple[dict[str, Any], ...] = ()) -> FeatureView:
    return FeatureView.model_validate(
        {
            "name": "v",
            "entity": "user",
            "source": "tx",
            "features": features or all_features(),
            "filter": list(filters),
        }
    )


def ms(t: datetime) -> int:
    return (t - EPOCH) // timedelta(milliseconds=1)


# ---------------------------------------------------------------- windows, from the spec text


def _ms(d: timedelta) -> int:
    return int(d.total_seconds() * 1000)


def covered(feature: Feature, at: int) -> tuple[float, int]:
    """[first, last] event times (ms, inclusive) a read at ``at`` covers."""
    w = feature.window
    if w is None:
        return -math.inf, at
    if w.type == "sliding":
        tile = _ms(w.tile)
        c = at - at % tile  # the tile holding T; the window's tiles start in (T - w, T]
        return c - _ms(w.duration) + tile, at
    hop = _ms(w.tile)
    end = at - at % hop  # last window closed at or before T: [end - size, end)
    return end - _ms(w.span), end - 1


def exact_sliding(feature: Feature, at: int) -> tuple[float, int]:
    """(T - w, T] without tile rounding, as [first, last] inclusive."""
    assert feature.window is not None and feature.window.type == "sliding"
    return at - _ms(feature.window.duration) + 1, at


# ---------------------------------------------------------------- values


def naive(feature: Feature, events: list[dict[str, Any]], lo: float, hi: int) -> Any:
    """The feature over events with lo <= event time <= hi (events carry 't' and 'seq')."""
    inside = [e for e in events if lo <= e["t"] <= hi]
    fld = feature.field
    if fld is None:
        return len(inside)
    rows = [(e["t"], e["seq"], e[fld]) for e in inside if e.get(fld) is not None]
    vals = [v for _, _, v in rows]
    kind = feature.aggregation
    if kind == "count":
        return len(vals)
    if kind == "sum":
        return sum(vals) if FIELD_TYPES[fld] == "int64" else math.fsum(vals)
    if kind == "mean":
        return statistics.fmean(vals) if vals else None
    if kind == "stddev":
        return statistics.stdev(vals) if len(vals) >= 2 else None
    if kind == "min":
        return min(vals, default=None)
    if kind == "max":
        return max(vals, default=None)
    if kind == "first":
        return min(rows)[2] if rows else None
    if kind == "last":
        return max(rows)[2] if rows else None
    if kind == "approx_count_distinct":
        return len(set(vals))
    raise AssertionError(kind)


def close(feature: Feature, got: Any, want: Any, events: list[dict[str, Any]]) -> bool:
    if got is None or want is None:
        return got is None and want is None
    if feature.aggregation == "approx_count_distinct":
        return bool(abs(got - want) <= max(1.0, 0.04 * want))  # ~3 sigma of HLL lg_k=12
    if isinstance(want, float) or isinstance(got, float):
        fld = feature.field or ""
        scale = max([abs(e[fld]) for e in events if e.get(fld) is not None] + [1.0])
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9 * scale)
    return bool(got == want) and type(got) is type(want)


# ---------------------------------------------------------------- events

COUNTRIES = ["fr", "de", "it", "es", "pl"]


@st.composite
def event_lists(draw: st.DrawFn, span_ms: int = 3 * HOUR, max_size: int = 40) -> list[dict[str, Any]]:
    """Events with unique sequences, in random (arrival) order, times clustered on tile edges."""
    n = draw(st.integers(0, max_size))
    times = draw(
        st.lists(
            st.one_of(
                st.integers(BASE, BASE + span_ms),
                st.integers(0, span_ms // MIN).map(lambda k: BASE + k * MIN + draw_offset(k)),
            ),
            min_size=n,
            max_size=n,
        )
    )
    events = []
    for seq, t in enumerate(times):
        events.append(
            {
                "t": t,
                "seq": seq * 7 % 101 + seq * 1000,
                "event_time": EPOCH + timedelta(milliseconds=t),
                "amount": draw(st.one_of(st.none(), st.integers(-5000, 5000).map(lambda c: c / 100))),
                "qty": draw(st.one_of(st.none(), st.integers(-50, 50))),
                "country": draw(st.one_of(st.none(), st.sampled_from(COUNTRIES))),
                "flag": draw(st.one_of(st.none(), st.booleans())),
                "ts": draw(
                    st.one_of(
                        st.none(),
                        st.integers(0, 10**6).map(
                            lambda s: EPOCH + timedelta(seconds=1_700_000_000, microseconds=s * 37)
                        ),
                    )
                ),
            }
        )
    return draw(st.permutations(events))


def draw_offset(k: int) -> int:
    """Land exactly on, just after or just before a tile edge."""
    return (0, 1, -1, 59_999)[k % 4]
