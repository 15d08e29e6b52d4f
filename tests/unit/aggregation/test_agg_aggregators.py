"""Each aggregator against a naive reference; merge laws; IR byte round trips."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestream.aggregation import EXACT_UP_TO, IR, Aggregator, CodecError, make_aggregator

# (time, seq, value) triples; None values are nulls
Item = tuple[int, int, Any]

VALUES: dict[str, st.SearchStrategy[Any]] = {
    "int64": st.integers(-(10**6), 10**6),
    "float64": st.integers(-(10**6), 10**6).map(lambda c: c / 64),
    "string": st.text(max_size=6),
    "bool": st.booleans(),
    "timestamp": st.integers(-(10**15), 10**16),  # epoch microseconds inside the IR
}

CASES = [
    ("count", "string"), ("count", "int64"), ("sum", "int64"), ("sum", "float64"),
    ("mean", "int64"), ("mean", "float64"), ("stddev", "int64"), ("stddev", "float64"),
    ("min", "int64"), ("min", "float64"), ("min", "timestamp"), ("max", "int64"), ("max", "timestamp"),
    ("first", "string"), ("first", "bool"), ("first", "float64"), ("last", "string"), ("last", "int64"),
    ("last", "timestamp"), ("approx_count_distinct", "string"), ("approx_count_distinct", "int64"),
    ("approx_count_distinct", "float64"),
]  # fmt: skip


def items(input_type: str) -> st.SearchStrategy[list[Item]]:
    return st.lists(
        st.tuples(st.integers(0, 20), st.integers(0, 3), st.one_of(st.none(), VALUES[input_type])),
        max_size=30,
    )


def fold(agg: Aggregator, xs: list[Item]) -> IR:
    row = list(agg.identity())
    for t, seq, v in xs:
        agg.update(row, 0, v, t, seq)
    return tuple(row)


def reference(kind: str, input_type: str, xs: list[Item]) -> Any:
    rows = [x for x in xs if x[2] is not None]
    vals = [v for _, _, v in rows]
    answers: dict[str, Callable[[], Any]] = {
        "count": lambda: len(vals),
        "sum": lambda: math.fsum(vals) if input_type == "float64" else sum(vals),
        "mean": lambda: statistics.fmean(vals) if vals else None,
        "stddev": lambda: statistics.stdev(vals) if len(vals) > 1 else None,
        "min": lambda: min(vals, default=None),
        "max": lambda: max(vals, default=None),
        "first": lambda: min(rows)[2] if rows else None,
        "last": lambda: max(rows)[2] if rows else None,
        "approx_count_distinct": lambda: len(set(vals)),
    }
    return answers[kind]()


def same(kind: str, got: Any, want: Any, scale: float = 1.0) -> bool:
    if got is None or want is None:
        return got is None and want is None
    if kind == "approx_count_distinct":
        return bool(abs(got - want) <= max(1.0, 0.04 * want))
    if isinstance(got, float) or isinstance(want, float):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9 * scale)
    return bool(got == want)


def scale_of(xs: list[Item]) -> float:
    return max([abs(v) for _, _, v in xs if isinstance(v, int | float)] + [1.0])


@pytest.mark.parametrize(("kind", "input_type"), CASES)
@given(data=st.data())
@settings(deadline=None)
def test_fold_matches_naive_reference(kind: str, input_type: str, data: st.DataObject) -> None:
    agg = make_aggregator(kind, input_type)
    xs = data.draw(items(input_type))
    assert same(kind, agg.finalize(fold(agg, xs)), reference(kind, input_type, xs), scale_of(xs))


@pytest.mark.parametrize(("kind", "input_type"), CASES)
@given(data=st.data())
@settings(deadline=None)
def test_merge_is_associative_and_commutative(kind: str, input_type: str, data: st.DataObject) -> None:
    agg = make_aggregator(kind, input_type)
    a, b, c = (fold(agg, data.draw(items(input_type))) for _ in range(3))
    left = agg.merge(agg.merge(a, b), c)
    right = agg.merge(a, agg.merge(b, c))
    swapped = agg.merge(c, agg.merge(b, a))
    many = agg.merge_columns(list(zip(a, b, c, strict=True)))
    outs = [agg.finalize(x) for x in (left, right, swapped, many)]
    if kind == "stddev" or (kind in ("sum", "mean") and input_type == "float64"):
        assert all(same(kind, o, outs[0], 1e6) for o in outs)
    else:  # exact aggregators: identical IRs, not just equal values
        assert outs.count(outs[0]) == 4
        if kind != "approx_count_distinct":
            assert left == right == swapped == many


@pytest.mark.parametrize(("kind", "input_type"), CASES)
@given(data=st.data())
@settings(deadline=None)
def test_split_fold_then_merge_equals_one_fold(kind: str, input_type: str, data: st.DataObject) -> None:
    agg = make_aggregator(kind, input_type)
    xs = data.draw(items(input_type))
    cut = data.draw(st.integers(0, len(xs)))
    merged = agg.merge(fold(agg, xs[:cut]), fold(agg, xs[cut:]))
    shuffled = fold(agg, data.draw(st.permutations(xs)))
    whole = agg.finalize(fold(agg, xs))
    assert same(kind, agg.finalize(merged), whole, scale_of(xs))
    assert same(kind, agg.finalize(shuffled), whole, scale_of(xs))


@pytest.mark.parametrize(("kind", "input_type"), CASES)
@given(data=st.data())
@settings(deadline=None)
def test_encode_decode_round_trip(kind: str, input_type: str, data: st.DataObject) -> None:
    agg = make_aggregator(kind, input_type)
    ir = fold(agg, data.draw(items(input_type)))
    raw = agg.encode(ir)
    back = agg.decode(raw)
    if kind != "approx_count_distinct":  # a sketch's bytes may reorder its hash set
        assert agg.encode(back) == raw
    assert agg.finalize(back) == agg.finalize(ir)
    with pytest.raises(CodecError):
        agg.decode(raw + b"\x00")


def test_identity_values_after_no_events() -> None:
    empty = {k: make_aggregator(k, t).finalize(make_aggregator(k, t).identity()) for k, t in CASES}
    assert empty == {
        "count": 0, "sum": 0.0, "mean": None, "stddev": None, "min": None, "max": None,
        "first": None, "last": None, "approx_count_distinct": 0,
    }  # fmt: skip
    assert make_aggregator("sum", "int64").finalize(make_aggregator("sum", "int64").identity()) == 0


def test_first_last_ties_break_by_sequence_then_value() -> None:
    first, last = make_aggregator("first", "string"), make_aggregator("last", "string")
    same_time = [(5, 2, "b"), (5, 9, "a"), (5, 1, "c"), (7, 0, "late"), (3, 4, None)]
    assert first.finalize(fold(first, same_time)) == "c"
    assert last.finalize(fold(last, same_time)) == "late"
    assert last.finalize(fold(last, same_time[:3])) == "a"  # the greater sequence (offset)
    assert last.finalize(fold(last, [(5, 0, "a"), (5, 0, "b")])) == "b"  # no sequences: value


def test_stddev_is_the_sample_deviation_and_stable() -> None:
    agg = make_aggregator("stddev", "float64")
    assert agg.finalize(agg.prepare(3.0)) is None
    assert agg.finalize(fold(agg, [(0, 0, 2.0), (0, 0, 4.0)])) == pytest.approx(math.sqrt(2))
    # large offset, tiny spread: (sum, sum of squares) would lose every digit here
    xs = [(0, 0, 1e9 + v) for v in (4.0, 7.0, 13.0, 16.0)]
    parts = [fold(agg, [x]) for x in xs]
    merged = agg.merge_columns(list(zip(*parts, strict=True)))
    assert agg.finalize(merged) == pytest.approx(statistics.stdev([4.0, 7.0, 13.0, 16.0]), rel=1e-9)


def test_count_distinct_error_stays_within_the_bound_on_many_values() -> None:
    agg = make_aggregator("approx_count_distinct", "string")
    tiles = [fold(agg, [(0, 0, f"user-{i}") for i in range(k, 60_000, 7)]) for k in range(7)]
    merged = agg.merge_columns(list(zip(*tiles, strict=True)))
    assert abs(agg.finalize(merged) - 60_000) <= 0.04 * 60_000  # 3 sigma at lg_k 12
    assert len(agg.encode(merged)) <= 4 + 1 + 4096  # slot length, kind, one byte per register


@given(n=st.integers(0, 2_500), seed=st.integers(0, 2**32))
@settings(deadline=None, max_examples=40)
def test_count_distinct_is_the_same_whatever_the_merge_order_and_grouping(n: int, seed: int) -> None:
    """Online merges partition sub-states, offline folds one state: both must give one answer."""
    import random

    order = random.Random(seed)
    values = [order.randrange(3_000) for _ in range(n)]
    splits = [order.randrange(6) for _ in range(n)]
    agg = make_aggregator("approx_count_distinct", "int64")
    whole = fold(agg, [(0, 0, v) for v in values])
    parts = [fold(agg, [(0, 0, v) for v, p in zip(values, splits, strict=False) if p == k]) for k in range(6)]
    order.shuffle(parts)
    flat = agg.merge_columns(list(zip(*parts, strict=True)))
    nested = agg.merge(agg.merge_columns(list(zip(*parts[:3], strict=True))), agg.merge_columns(list(zip(*parts[3:], strict=True))))
    assert agg.finalize(whole) == agg.finalize(flat) == agg.finalize(nested)
    assert whole == flat == nested or not values
    distinct = len(set(values))
    if distinct <= EXACT_UP_TO:
        assert agg.finalize(flat) == distinct  # exact while small
    else:
        assert abs(agg.finalize(flat) - distinct) <= 0.05 * distinct
    assert agg.decode(agg.encode(flat)) == flat


def test_merge_does_not_mutate_its_inputs() -> None:
    agg = make_aggregator("approx_count_distinct", "int64")
    a, b = agg.prepare(1), agg.prepare(2)
    agg.merge(a, b)
    assert agg.finalize(a) == 1 and agg.finalize(b) == 1


def test_unknown_or_field_less_aggregations_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        make_aggregator("median", "int64")
    with pytest.raises(ValueError, match="needs an input"):
        make_aggregator("sum", None)


def test_int64_sum_beyond_int64_is_a_codec_error() -> None:
    agg = make_aggregator("sum", "int64")
    with pytest.raises(CodecError):
        agg.encode(fold(agg, [(0, 0, 2**62), (0, 0, 2**62)]))


@given(n=st.integers(0, 2_500), seed=st.integers(0, 2**32), through_bytes=st.lists(st.booleans(), min_size=6, max_size=6))
@settings(deadline=None, max_examples=40)
def test_count_distinct_read_from_bytes_merges_and_grows_like_sets_held(
    n: int, seed: int, through_bytes: list[bool]
) -> None:
    """Sets decoded from bytes (kept as sorted bytes until needed) merge, count, add and encode
    exactly as sets built in memory: the reader and the worker share these objects' format."""
    import random

    from featurestream.aggregation.distinct import DistinctSet, value_hash

    order = random.Random(seed)
    values = [order.randrange(3_000) for _ in range(n)]
    splits = [order.randrange(6) for _ in range(n)]
    parts: list[DistinctSet | None] = []
    for k in range(6):
        held = DistinctSet()
        for v, p in zip(values, splits, strict=True):
            if p == k:
                held.add(value_hash(v))
        parts.append(DistinctSet.from_bytes(held.to_bytes()) if through_bytes[k] else held)
    parts.append(None)
    whole = DistinctSet()
    for v in values:
        whole.add(value_hash(v))
    merged = DistinctSet.union(parts)
    assert merged is not None
    assert merged == whole and merged.estimate() == whole.estimate()
    assert DistinctSet.from_bytes(merged.to_bytes()) == whole
    assert merged.to_bytes() == whole.to_bytes()
    # a decoded set grows like the set it was written from; the union's inputs stay as they were
    before = [p.to_bytes() for p in parts if p is not None]
    extra = [value_hash(order.randrange(3_000, 6_000)) for _ in range(order.randrange(0, 600))]
    for h in extra:
        merged.add(h)
        whole.add(h)
    assert merged == whole and merged.to_bytes() == whole.to_bytes()
    assert [p.to_bytes() for p in parts if p is not None] == before
