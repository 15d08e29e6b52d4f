from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from featurestream.aggregation import TileKey, WindowSpec, from_millis, tile_start, to_millis
from featurestream.definitions.models import Feature

H = 3_600_000
M = 60_000


def spec(window: object) -> WindowSpec:
    return WindowSpec.of(
        Feature.model_validate({"name": "f", "aggregation": "count", "window": window}).window
    )


def test_to_millis_floors_aware_datetimes_and_passes_ints() -> None:
    t = datetime(2024, 1, 1, 0, 0, 0, 999, tzinfo=UTC)
    assert to_millis(t) == to_millis(datetime(2024, 1, 1, tzinfo=UTC)) == 1_704_067_200_000
    assert to_millis(datetime(1969, 12, 31, 23, 59, 59, 999_500, tzinfo=UTC)) == -1
    plus_two = datetime(2024, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))
    assert to_millis(plus_two) == 1_704_067_200_000
    assert to_millis(42) == 42
    assert from_millis(1_704_067_200_000) == datetime(2024, 1, 1, tzinfo=UTC)


def test_to_millis_rejects_naive_and_other_types() -> None:
    with pytest.raises(ValueError, match="naive"):
        to_millis(datetime(2024, 1, 1))  # noqa: DTZ001 - the point of the test
    with pytest.raises(TypeError):
        to_millis(True)
    with pytest.raises(TypeError):
        to_millis(1.5)  # type: ignore[arg-type]


@given(st.integers(-(10**13), 10**13), st.sampled_from([M, 5 * M, H]))
def test_tile_start_is_epoch_aligned(t: int, tile: int) -> None:
    s = tile_start(t, tile)
    assert s % tile == 0 and s <= t < s + tile
    assert tile_start(t, 0) == 0


def test_tile_key_round_trips_as_a_hash_field() -> None:
    key = TileKey(M, 1_704_067_200_000)
    assert key.encode() == b"60000:1704067200000"
    assert TileKey.decode(key.encode()) == key == TileKey.decode("60000:1704067200000")


def test_specs_from_definitions() -> None:
    assert spec("1h") == WindowSpec("sliding", H, M)
    assert spec("1d") == WindowSpec("sliding", 24 * H, 5 * M)
    assert spec("7d") == WindowSpec("sliding", 7 * 24 * H, H)
    assert spec({"type": "tumbling", "size": "10m"}) == WindowSpec("tumbling", 10 * M, 10 * M)
    assert spec({"type": "hopping", "size": "1h", "hop": "10m"}) == WindowSpec("hopping", H, 10 * M)
    assert spec(None) == WindowSpec("lifetime", 0, 0)


def test_sliding_range_is_the_tiles_starting_in_the_window() -> None:
    w = spec("1h")
    at = 10 * H + 30 * M + 15_000  # 10:30:15
    assert w.tile_range(at) == (9 * H + 31 * M, 10 * H + 30 * M)  # 60 tiles, 09:31 .. 10:30
    assert w.coverage(at) == (9 * H + 31 * M, at)
    # on a tile boundary, the tile starting at T - w is outside (T - w, T]
    assert w.tile_range(10 * H) == (9 * H + M, 10 * H)


def test_tumbling_and_hopping_ranges_are_the_last_closed_window() -> None:
    tumble = spec({"type": "tumbling", "size": "10m"})
    assert tumble.tile_range(20 * M) == (10 * M, 10 * M)
    assert tumble.coverage(20 * M) == (10 * M, 20 * M - 1)
    assert tumble.coverage(20 * M - 1) == (0, 10 * M - 1)
    hop = spec({"type": "hopping", "size": "30m", "hop": "10m"})
    assert hop.tile_range(65 * M) == (30 * M, 50 * M)
    assert hop.coverage(65 * M) == (30 * M, 60 * M - 1)


@given(st.integers(-(10**12), 10**13), st.sampled_from(["5m", "1h", "2h", "1d", "3d"]))
def test_far_edge_misses_less_than_one_tile_and_never_overreaches(at: int, window: str) -> None:
    w = spec(window)
    lo, hi = w.coverage(at)
    assert hi == at
    assert lo is not None
    exact_lo = at - w.span_ms + 1  # (T - w, T]
    assert exact_lo <= lo < exact_lo + w.tile_ms
