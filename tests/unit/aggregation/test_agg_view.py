"""ViewAggregator, online (fold/compact/prune/bytes/evaluate) and offline, against the naive reference."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest
from aggregation_reference import (
    BASE,
    EPOCH,
    FIELD_TYPES,
    HOUR,
    MIN,
    close,
    covered,
    event_lists,
    exact_sliding,
    make_view,
    naive,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurestream.aggregation import StateLayoutError, TileKey, ViewAggregator, ViewState
from featurestream.definitions.models import Feature, Source

VIEW = make_view()
AGG = ViewAggregator(VIEW, FIELD_TYPES)
Events = list[dict[str, Any]]

read_times = st.one_of(
    st.integers(BASE - HOUR, BASE + 4 * HOUR),
    st.integers(0, 4 * 60).map(lambda k: BASE + k * MIN + (k % 3) - 1),  # on, before, after edges
)


def seqs(events: Events) -> list[int]:
    return [e["seq"] for e in events]


def check(values: dict[str, Any], events: Events, at: int) -> None:
    assert set(values) == {f.name for f in VIEW.features}
    for f in VIEW.features:
        want = naive(f, events, *covered(f, at))
        assert close(f, values[f.name], want, events), (f.name, values[f.name], want)


def same_values(got: dict[str, Any], want: dict[str, Any], events: Events) -> None:
    """Equal, floats up to rounding (float sums depend on the order events were added in)."""
    assert got.keys() == want.keys()
    for f in VIEW.features:
        assert close(f, got[f.name], want[f.name], events), (f.name, got[f.name], want[f.name])


def online(events: Events, at: int, cuts: list[int], lags: list[int], data: st.DataObject) -> ViewState:
    """Fold in chunks, compacting/pruning/re-encoding between chunks, never past ``at``."""
    state = AGG.new_state()
    bounds = sorted({0, len(events), *(c % (len(events) + 1) for c in cuts)})
    for i, (a, b) in enumerate(pairwise(bounds)):
        AGG.fold(state, events[a:b], seqs(events[a:b]))
        lag = lags[i % len(lags)] if lags else 0
        AGG.compact(state, at - lag)
        if data.draw(st.booleans()):
            AGG.prune(state, at - lag)
        if data.draw(st.booleans()):
            state = AGG.decode_state(AGG.encode_state(state))
    return state


@given(
    events=event_lists(),
    at=read_times,
    cuts=st.lists(st.integers(0, 40), max_size=4),
    lags=st.lists(st.integers(0, 3 * HOUR), max_size=3),
    data=st.data(),
)
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_online_and_offline_equal_the_naive_reference(
    events: Events, at: int, cuts: list[int], lags: list[int], data: st.DataObject
) -> None:
    state = online(events, at, cuts, lags, data)
    check(AGG.evaluate(state, at), events, at)
    check(AGG.evaluate_history(events, [at], seqs(events))[0], events, at)


@given(events=event_lists(), reads=st.lists(read_times, max_size=12))
@settings(deadline=None)
def test_batch_at_many_read_times_equals_evaluating_each_from_scratch(
    events: Events, reads: list[int]
) -> None:
    batch = AGG.evaluate_history(events, reads, seqs(events))
    assert len(batch) == len(reads)
    for at, values in zip(reads, batch, strict=True):
        fresh = AGG.new_state()  # everything raw in the head: exact by construction
        AGG.fold(fresh, events, seqs(events))
        same_values(values, AGG.evaluate(fresh, at), events)


@given(events=event_lists(), at=read_times, lag=st.integers(0, HOUR))
@settings(deadline=None)
def test_an_event_one_millisecond_after_the_read_is_never_counted(events: Events, at: int, lag: int) -> None:
    future = dict(events[0] if events else {"qty": 1}, t=at + 1, seq=10**9, country="zz", qty=999)
    future["event_time"] = EPOCH + timedelta(milliseconds=at + 1)
    state = AGG.new_state()
    AGG.fold(state, [*events, future], [*seqs(events), 10**9])
    AGG.compact(state, at - lag)
    without = AGG.evaluate(AGG.build_state(events, at, seqs(events)), at)
    same_values(AGG.evaluate(state, at), without, events)
    with_future = AGG.evaluate_history([*events, future], [at], [*seqs(events), 10**9])[0]
    same_values(with_future, AGG.evaluate_history(events, [at], seqs(events))[0], events)
    check(without, events, at)


@given(
    events=event_lists(),
    at=read_times,
    later=st.lists(st.integers(0, 2 * HOUR), min_size=1, max_size=8),
    lag=st.integers(0, HOUR),
)
@settings(deadline=None)
def test_reads_with_equal_keys_evaluate_alike(events: Events, at: int, later: list[int], lag: int) -> None:
    """What lets a reader reuse values evaluated from the same bytes: equal keys, equal values,
    for the cheap ``evaluation_key`` and for the finer ``window_key`` it falls back to in a new
    minute; and evaluating from kept columns is evaluating from the state."""
    state = AGG.new_state()
    AGG.fold(state, events, seqs(events))
    AGG.compact(state, at - lag)
    columns = AGG.columns(state)
    first = AGG.evaluate(state, at)
    assert AGG.evaluate(state, at, columns) == first
    for step in later:
        t = at + step
        values = AGG.evaluate(state, t)
        assert AGG.evaluate(state, t, columns) == values
        same_coarse = AGG.evaluation_key(state, t) == AGG.evaluation_key(state, at)
        same_window = AGG.window_key(state, t, columns) == AGG.window_key(state, at, columns)
        if same_coarse:
            assert values == first, step
        if same_window:
            assert values == first, step
        if not (same_coarse and same_window):
            check(values, events, t)


def test_a_new_minute_keeps_the_window_key_while_no_window_loses_a_tile() -> None:
    """Events older than every window but the 2-day one and the lifetime: minutes pass, the
    coarse key moves, the window key does not, until the 2-day window loses the tiles."""
    events = [
        {"t": BASE + 10 * MIN + i, "seq": i, "event_time": EPOCH + timedelta(milliseconds=BASE + 10 * MIN + i),
         "amount": 1.5, "qty": i, "country": "fr", "flag": True, "ts": None}
        for i in range(3)
    ]
    at = BASE + 5 * HOUR
    state = AGG.new_state()
    AGG.fold(state, events, seqs(events))
    AGG.compact(state, at)
    columns = AGG.columns(state)
    later = at + 7 * MIN
    assert AGG.evaluation_key(state, later) != AGG.evaluation_key(state, at)
    assert AGG.window_key(state, later, columns) == AGG.window_key(state, at, columns)
    assert AGG.evaluate(state, later) == AGG.evaluate(state, at)
    gone = at + 48 * HOUR
    assert AGG.window_key(state, gone, columns) != AGG.window_key(state, at, columns)
    check(AGG.evaluate(state, gone, columns), events, gone)

def view_of(*features: dict[str, Any], filters: tuple[dict[str, Any], ...] = ()) -> ViewAggregator:
    return ViewAggregator(make_view([Feature.model_validate(f) for f in features], filters), FIELD_TYPES)


def ev(t_ms: int, **fields: Any) -> dict[str, Any]:
    return {"event_time": t_ms, **fields}


def test_values_decay_after_silence() -> None:
    agg = view_of(
        {"name": "n", "aggregation": "count", "window": "1h"},
        {"name": "s", "aggregation": "sum", "field": "qty", "window": "1h"},
        {"name": "m", "aggregation": "mean", "field": "amount", "window": "1h"},
        {"name": "l", "aggregation": "last", "field": "country", "window": "1h"},
        {"name": "d", "aggregation": "approx_count_distinct", "field": "country", "window": "1h"},
        {"name": "forever", "aggregation": "count"},
    )
    events = [ev(BASE + 10 * i, qty=2, amount=1.5, country="fr") for i in range(5)]
    state = agg.build_state(events, BASE + 1000)
    assert agg.evaluate(state, BASE + 1000) == {"n": 5, "s": 10, "m": 1.5, "l": "fr", "d": 1, "forever": 5}
    later = BASE + HOUR + MIN
    silent = {"n": 0, "s": 0, "m": None, "l": None, "d": 0, "forever": 5}
    assert agg.evaluate(state, later) == silent
    agg.prune(state, later)
    assert agg.evaluate(state, later) == silent == agg.evaluate_history(events, [later])[0]


def test_tumbling_and_hopping_boundaries() -> None:
    agg = view_of(
        {"name": "tumble", "aggregation": "count", "window": {"type": "tumbling", "size": "10m"}},
        {"name": "hop", "aggregation": "count", "window": {"type": "hopping", "size": "30m", "hop": "10m"}},
    )
    events = [ev(BASE + t) for t in (0, 10 * MIN - 1, 10 * MIN, 25 * MIN, 30 * MIN - 1)]
    cases = {
        BASE + 10 * MIN - 1: (0, 0),  # nothing has closed yet
        BASE + 10 * MIN: (2, 2),  # [0, 10m) closed: the event at 10m belongs to the next one
        BASE + 20 * MIN - 1: (2, 2),
        BASE + 20 * MIN: (1, 3),
        BASE + 30 * MIN: (2, 5),
        BASE + 40 * MIN: (0, 3),  # [10m, 40m)
        BASE + 60 * MIN: (0, 0),
    }
    state = agg.build_state(events, BASE)
    history = agg.evaluate_history(events, list(cases))
    for (at, (tumble, hop)), batch in zip(cases.items(), history, strict=True):
        assert agg.evaluate(state, at) == {"tumble": tumble, "hop": hop} == batch, at


@given(events=event_lists(), at=read_times)
@settings(deadline=None)
def test_far_edge_error_is_less_than_one_tile(events: Events, at: int) -> None:
    values = AGG.evaluate_history(events, [at], seqs(events))[0]
    for f in VIEW.features:
        if f.window is None or f.window.type != "sliding" or f.aggregation != "count":
            continue
        lo, hi = exact_sliding(f, at)
        missed = [e for e in events if lo <= e["t"] < covered(f, at)[0]]
        assert all(e["t"] - lo < f.window.tile.total_seconds() * 1000 for e in missed)
        exact = naive(f, events, lo, hi)
        assert values[f.name] == exact - naive(f, missed, lo, hi)


def test_late_events_are_reported_and_kept_by_the_batch_path() -> None:
    agg = view_of(
        {"name": "n", "aggregation": "count", "window": "5m"},
        {"name": "n2", "aggregation": "count", "window": "2h"},
    )
    now = BASE + 3 * HOUR
    state = agg.build_state([], now)
    result = agg.fold(state, [ev(now - 10 * MIN), ev(now - HOUR), ev(now - 3 * HOUR), ev(now + 5)])
    assert (result.late, result.head) == (1, 1)  # 3h old: beyond both windows; +5ms: head
    assert result.touched == {TileKey(5 * MIN, now - 10 * MIN), TileKey(5 * MIN, now - HOUR)}
    assert agg.evaluate(state, now) == {"n": 0, "n2": 2}
    lifetime = view_of({"name": "all", "aggregation": "count"})
    state = lifetime.build_state([], now)
    assert lifetime.fold(state, [ev(0)]).late == 0  # a lifetime feature takes any event


def test_filters_apply_before_aggregation() -> None:
    filters = (
        {"field": "country", "op": "in", "value": ["fr", "de"]},
        {"field": "qty", "op": "ge", "value": 2},
        {"field": "ts", "op": "lt", "value": "2024-01-01T00:00:00+00:00"},
        {"field": "flag", "op": "ne", "value": True},
    )
    agg = view_of({"name": "n", "aggregation": "count"}, filters=filters)
    old, new = datetime(2023, 1, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC)
    keep = {"country": "fr", "qty": 2, "ts": old, "flag": False}
    events = [
        ev(BASE, **keep),
        ev(BASE, **{**keep, "country": "it"}),
        ev(BASE, **{**keep, "qty": 1}),
        ev(BASE, **{**keep, "ts": new}),
        ev(BASE, **{**keep, "flag": True}),
        ev(BASE, **{**keep, "flag": None}),  # a null fails every condition, "ne" included
        ev(BASE, **{**keep, "country": "de", "qty": 7}),
    ]
    assert agg.evaluate_history(events, [BASE])[0] == {"n": 2}


def test_declared_dtype_widens_and_timestamps_come_back_aware() -> None:
    agg = view_of(
        {"name": "n", "aggregation": "count", "dtype": "float64"},
        {"name": "s", "aggregation": "sum", "field": "qty", "dtype": "float64"},
        {"name": "t", "aggregation": "max", "field": "ts"},
    )
    when = datetime(2024, 5, 1, 12, 0, 0, 123_456, tzinfo=UTC)
    values = agg.evaluate_history([ev(BASE, qty=3, ts=when)], [BASE])[0]
    assert values == {"n": 1.0, "s": 3.0, "t": when}
    assert isinstance(values["n"], float) and isinstance(values["s"], float)
    with pytest.raises(ValueError, match="gives"):
        view_of({"name": "bad", "aggregation": "sum", "field": "amount", "dtype": "int64"})
    with pytest.raises(ValueError, match="unknown source field"):
        view_of({"name": "bad", "aggregation": "sum", "field": "nope"})


head_starts = st.sampled_from([None, 0, HOUR, 2 * HOUR])  # lags behind the read time


@given(
    events=event_lists(), at=read_times, cut=st.integers(0, 40), starts=st.tuples(head_starts, head_starts)
)
@settings(deadline=None)
def test_merging_partial_states_equals_folding_everything(
    events: Events, at: int, cut: int, starts: tuple[int | None, int | None]
) -> None:
    stored, partial = (AGG.new_state(None if lag is None else at - lag) for lag in starts)
    AGG.fold(stored, events[:cut], seqs(events[:cut]))
    AGG.fold(partial, events[cut:], seqs(events[cut:]))
    before = AGG.encode_state(partial)
    AGG.merge(stored, partial)
    assert AGG.encode_state(partial) == before  # merge leaves its argument alone
    assert all(rec[0] >= stored.head_start for rec in stored.head)
    check(AGG.evaluate(stored, at), events, at)


@given(events=event_lists(), at=read_times)
@settings(deadline=None)
def test_state_bytes_round_trip_whole_and_in_parts(events: Events, at: int) -> None:
    state = AGG.build_state(events, at)
    whole = AGG.decode_state(AGG.encode_state(state))
    parts = AGG.decode_parts(
        AGG.encode_header(state), [(k, AGG.encode_tile(state, k)) for k in AGG.tile_keys(state)]
    )
    want = AGG.evaluate(state, at)
    assert AGG.evaluate(whole, at) == want == AGG.evaluate(parts, at)
    assert (whole.head_start, whole.horizon, whole.head) == (state.head_start, state.horizon, state.head)
    assert whole.latest == parts.latest == max((e["t"] for e in events), default=whole.latest)


def test_state_of_another_layout_is_refused() -> None:
    one = view_of({"name": "n", "aggregation": "count", "window": "1h"})
    two = view_of(
        {"name": "n", "aggregation": "count", "window": "1h"},
        {"name": "s", "aggregation": "sum", "field": "qty", "window": "1h"},
    )
    raw = one.encode_state(one.build_state([ev(BASE)], BASE))
    with pytest.raises(StateLayoutError):
        two.decode_state(raw)


def test_from_source_uses_the_source_schema_and_event_time_field() -> None:
    source = Source.model_validate(
        {
            "name": "tx",
            "topic": "tx",
            "event_time_field": "at",
            "fields": [{"name": "at", "type": "timestamp"}, {"name": "qty", "type": "int64"}],
        }
    )
    agg = ViewAggregator.from_source(make_view([Feature(name="s", aggregation="sum", field="qty")]), source)
    at = datetime(2024, 1, 1, tzinfo=UTC)
    assert agg.evaluate_history([{"at": at, "qty": 4}], [at])[0] == {"s": 4}


@given(at=st.integers(-(10**13), 10**13))
def test_pruning_keeps_the_oldest_tile_any_member_reads(at: int) -> None:
    for group in AGG.groups:
        assert group.oldest_needed(at) == min(m.window.tile_range(at)[0] for m in group.members)


def test_features_that_differ_only_in_their_window_share_one_ir() -> None:
    agg = view_of(
        {"name": "n_5m", "aggregation": "count", "window": "5m"},
        {"name": "n_1h", "aggregation": "count", "window": "1h"},
        {"name": "amount_5m", "aggregation": "sum", "field": "amount", "window": "5m"},
        {"name": "amount_1h", "aggregation": "sum", "field": "amount", "window": "1h"},
        {"name": "qty_1h", "aggregation": "sum", "field": "qty", "window": "1h"},
    )
    [group] = agg.groups
    assert group.slots == "qdq" and group.offsets == (0, 0, 1, 1, 2)
    events = [ev(BASE - 30 * MIN, amount=2.0, qty=1), ev(BASE - 2 * MIN, amount=3.0, qty=4)]
    state = agg.new_state()
    agg.fold(state, events)
    agg.compact(state, BASE)
    assert agg.evaluate(state, BASE) == {"n_5m": 1, "n_1h": 2, "amount_5m": 3.0, "amount_1h": 5.0, "qty_1h": 5}
