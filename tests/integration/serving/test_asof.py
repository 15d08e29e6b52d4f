"""GetFeaturesAsOf on real PostgreSQL: values from history at past times, hand-computed from the
shop fixture's events (u1: minutes 1, 5; u2: minutes 2, 3, 4, 6; arrival T0)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from featurestream.serving.access import ANONYMOUS, OpenAccess, Principal
from featurestream.serving.asof import AsOfLimits, AsOfService
from featurestream.serving.refs import FeatureRef, ServingError
from featurestream.serving.service import OnlineService, ServedRows, ServingLimits
from featurestream.storage.offline.layout import qualified, table_name
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.stream_jobs.processor import Record
from tests.integration.serving.conftest import MIN, T0, ServingProject, order

HOUR = 60 * MIN


@pytest.fixture
def asof(shop: ServingProject) -> Iterator[AsOfService]:
    svc = AsOfService(lambda: shop.snapshot, shop.postgres_url)
    yield svc
    svc.close()


def values(rows: ServedRows, short: bool = True) -> list[dict[str, tuple[Any, str]]]:
    """(value, status) per feature of each row; ``short`` drops the view name (one view only)."""
    return [
        {
            (name.split(":")[1] if short else name): (v.value, v.status)
            for name, v in zip(rows.feature_names, row.values, strict=True)
        }
        for row in rows.rows
    ]


def one(svc: AsOfService, user: str, at_ms: int, **kwargs: Any) -> dict[str, tuple[Any, str]]:
    return values(svc.get_as_of([({"user_id": user}, at_ms)], ["user_orders"], **kwargs))[0]


def test_values_at_known_times(asof: AsOfService) -> None:
    rows = asof.get_as_of(
        [
            ({"user_id": "u1"}, T0 + 30_000),  # before u1's first event
            ({"user_id": "u1"}, T0 + 3 * MIN),
            ({"user_id": "u1"}, T0 + 5 * MIN),  # the near edge is inclusive
            ({"user_id": "u1"}, T0 + 5 * MIN - 1),
            ({"user_id": "u2"}, T0 + 3 * MIN),
            ({"user_id": "u2"}, T0 + 6 * MIN),
        ],
        ["user_orders"],
    )
    assert rows.feature_names[0] == "user_orders:count_1h"
    assert [r.at_ms for r in rows.rows] == [T0 + 30_000, T0 + 3 * MIN, T0 + 5 * MIN, T0 + 5 * MIN - 1, T0 + 3 * MIN, T0 + 6 * MIN]
    before, at3, at5, just_before5, u2_at3, u2_at6 = values(rows)
    assert all(v == (None, "MISSING") for v in before.values())
    assert all(v.event_time_ms is None for v in rows.rows[0].values)
    assert at3 == {
        "count_1h": (1, "PRESENT"), "amount_sum_1h": (10.0, "PRESENT"), "amount_mean_1h": (10.0, "PRESENT"),
        "last_country": ("FR", "PRESENT"), "last_card": ("4111-u1", "PRESENT"),
    }
    assert rows.rows[1].values[0].event_time_ms == T0 + 1 * MIN
    assert at5["count_1h"] == (2, "PRESENT") and at5["amount_sum_1h"] == (30.0, "PRESENT")
    assert at5["amount_mean_1h"] == (15.0, "PRESENT") and at5["last_country"] == ("DE", "PRESENT")
    assert rows.rows[2].values[0].event_time_ms == T0 + 5 * MIN
    assert just_before5 == at3
    assert u2_at3["count_1h"] == (2, "PRESENT")
    assert u2_at6["count_1h"] == (4, "INVALID")  # validation: max 3
    assert u2_at6["amount_sum_1h"] == (20.0, "PRESENT")


def test_windows_end_at_the_row_time_and_values_go_stale(asof: AsOfService) -> None:
    # The hour (T - 1h, T] at minute 61.5 holds only u1's event of minute 5, 56.5 minutes old.
    later = one(asof, "u1", T0 + 61 * MIN + 30_000)
    assert later["count_1h"] == (1, "STALE")  # max_age 30m
    assert later["amount_sum_1h"] == (20.0, "PRESENT")  # no max_age
    decayed = one(asof, "u1", T0 + 2 * HOUR)
    assert decayed["count_1h"] == (0, "STALE")
    assert decayed["amount_mean_1h"] == (None, "MISSING")
    assert decayed["last_country"] == ("DE", "PRESENT")
    # The online key expires effective_online_ttl (1h + 1d) after the last event: MISSING then too.
    assert one(asof, "u1", T0 + 5 * MIN + 25 * HOUR)["last_country"] == ("DE", "PRESENT")
    assert all(v == (None, "MISSING") for v in one(asof, "u1", T0 + 5 * MIN + 25 * HOUR + 1).values())


@pytest.mark.parametrize("at_ms", [T0 + 10 * MIN, T0 + 55 * MIN, T0 + 125 * MIN])
def test_equal_to_online_values_at_the_online_clock(shop: ServingProject, asof: AsOfService, at_ms: int) -> None:
    entities = [{"user_id": "u1", "shop_id": "7"}, {"user_id": "u2", "shop_id": "8"}, {"user_id": "nobody", "shop_id": "99"}]
    online = OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda: at_ms)
    try:
        expected = online.get_online(entities, ["user_orders", "shop_orders"])
    finally:
        online.close()
    got = asof.get_as_of([(e, at_ms) for e in entities], ["user_orders", "shop_orders"])
    assert got.feature_names == expected.feature_names
    assert got.rows == expected.rows


def test_out_of_order_event_counts_where_it_belongs(shop: ServingProject, asof: AsOfService) -> None:
    shop.write([order("u1", 7, 4.0, 3, "IT")], first_offset=100)  # minute 3, after minute 5 was processed
    at3, at4, at5 = values(
        asof.get_as_of([({"user_id": "u1"}, T0 + t * MIN) for t in (3, 4, 5)], ["user_orders"])
    )
    assert at3["count_1h"] == (2, "PRESENT") and at3["amount_sum_1h"] == (14.0, "PRESENT")
    assert at3["last_country"] == ("IT", "PRESENT")
    assert at4 == at3
    assert at5["count_1h"] == (3, "PRESENT") and at5["last_country"] == ("DE", "PRESENT")


def test_as_of_arrival_hides_events_that_arrived_later(shop: ServingProject, asof: AsOfService) -> None:
    # Event time minute 8, but it reached Kafka at minute 20.
    late = order("u1", 7, 100.0, 8, "ES")
    assert not shop.processor.process([Record(0, 200, T0 + 20 * MIN, late)]).dead_letters
    rows = [({"user_id": "u1"}, T0 + 10 * MIN), ({"user_id": "u1"}, T0 + 20 * MIN - 1), ({"user_id": "u1"}, T0 + 20 * MIN)]
    by_event_time = values(asof.get_as_of(rows, ["user_orders"]))
    assert by_event_time[0]["count_1h"] == (3, "PRESENT")
    assert by_event_time[0]["amount_sum_1h"] == (130.0, "PRESENT")
    assert by_event_time[0]["last_country"] == ("ES", "PRESENT")
    arrived = asof.get_as_of(rows, ["user_orders"], as_of_arrival=True)
    at10, before20, at20 = values(arrived)
    assert at10["count_1h"] == (2, "PRESENT") and at10["amount_sum_1h"] == (30.0, "PRESENT")
    assert at10["last_country"] == ("DE", "PRESENT")
    assert arrived.rows[0].values[0].event_time_ms == T0 + 5 * MIN
    assert before20 == at10
    assert at20 == by_event_time[2]  # arrived at (not after) T: visible
    assert arrived.rows[2].values[0].event_time_ms == T0 + 8 * MIN
    # A second late event (minute 9, arrived at minute 15): each read sees what had arrived.
    assert not shop.processor.process([Record(0, 201, T0 + 15 * MIN, order("u1", 7, 1.0, 9, "PT"))]).dead_letters
    reads = [({"user_id": "u1"}, T0 + t * MIN) for t in (12, 15, 16, 19, 20, 21)]
    got = values(asof.get_as_of(reads, ["user_orders"], as_of_arrival=True))
    assert [(g["count_1h"][0], g["amount_sum_1h"][0], g["last_country"][0]) for g in got] == [
        (2, 30.0, "DE"), (3, 31.0, "PT"), (3, 31.0, "PT"), (3, 31.0, "PT"), (4, 131.0, "PT"), (4, 131.0, "PT"),
    ]
    assert [g["count_1h"][0] for g in values(asof.get_as_of(reads, ["user_orders"]))] == [4] * 6


def test_unknown_entity_is_missing(asof: AsOfService) -> None:
    rows = asof.get_as_of([({"user_id": "nobody", "shop_id": "99"}, T0 + 10 * MIN)], [], "checkout")
    assert values(rows, short=False)[0] == {
        "user_orders:count_1h": (None, "MISSING"), "shop_orders:count_1h": (None, "MISSING")
    }
    assert [v.event_time_ms for v in rows.rows[0].values] == [None, None]


def test_feature_service_spans_two_entities_with_one_query_per_key_group(
    shop: ServingProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[tuple[str, ...], int, int | None]] = []
    original = PostgresOfflineStore.read_events

    def counting(self: PostgresOfflineStore, source: Any, key_columns: Any, keys: Any, end_ms: Any) -> Any:
        calls.append((tuple(key_columns), len(keys), end_ms))
        return original(self, source, key_columns, keys, end_ms)

    monkeypatch.setattr(PostgresOfflineStore, "read_events", counting)
    svc = AsOfService(lambda: shop.snapshot, shop.postgres_url)
    rows = [
        ({"user_id": "u2", "shop_id": "8"}, T0 + 10 * MIN),
        ({"user_id": "u2", "shop_id": "8"}, T0 + 3 * MIN + 30_000),
        ({"user_id": "u1", "shop_id": "7"}, T0 + 4 * MIN),
    ]
    got = values(svc.get_as_of(rows, [], "checkout"), short=False)
    # u2: minutes 2, 3, 4, 6; shop 8: minutes 3, 4, 6; u1: minutes 1, 5; shop 7: minutes 1, 2, 5.
    assert got == [
        {"user_orders:count_1h": (4, "INVALID"), "shop_orders:count_1h": (3, "PRESENT")},
        {"user_orders:count_1h": (2, "PRESENT"), "shop_orders:count_1h": (1, "PRESENT")},
        {"user_orders:count_1h": (1, "PRESENT"), "shop_orders:count_1h": (2, "PRESENT")},
    ]
    assert sorted(calls) == [(("shop_id",), 2, T0 + 10 * MIN), (("user_id",), 2, T0 + 10 * MIN)]
    # Smaller batches: more queries, the same answers.
    calls.clear()
    small = AsOfService(lambda: shop.snapshot, shop.postgres_url, as_of_limits=AsOfLimits(batch_entities=1))
    assert values(small.get_as_of(rows, [], "checkout"), short=False) == got
    assert len(calls) == 4
    svc.close()
    small.close()


@pytest.mark.parametrize(
    ("rows", "features", "message"),
    [
        ([({"user_id": "u1"}, T0)], ["nope:count_1h"], "unknown or retired feature view 'nope'"),
        ([({"user_id": "u1"}, T0)], ["user_orders:nope"], "unknown feature 'nope' of view 'user_orders'"),
        ([({"user": "u1"}, T0)], ["user_orders:count_1h"], "entity row 0: missing join key 'user_id'"),
        ([({"shop_id": "x7"}, T0)], ["shop_orders"], "join key 'shop_id' must be an integer, got 'x7'"),
        ([], ["user_orders"], "give at least one row"),
        ([({"user_id": "u"}, T0)] * 6, ["user_orders"], "6 rows in one request; the limit is 5"),
        ([({"user_id": "u1"}, T0), ({"user_id": "u1"}, -1)], ["user_orders"], "row 1: timestamp must be epoch milliseconds"),
        ([({"user_id": "u1"}, 1.5)], ["user_orders"], "row 0: timestamp must be epoch milliseconds"),
        ([({"user_id": "u1"}, True)], ["user_orders"], "row 0: timestamp must be epoch milliseconds"),
    ],
)
def test_bad_requests_name_the_offending_item(
    shop: ServingProject, rows: list[tuple[dict[str, str], int]], features: list[str], message: str
) -> None:
    svc = AsOfService(lambda: shop.snapshot, shop.postgres_url, limits=ServingLimits(max_entities=5))
    with pytest.raises(ServingError) as info:
        svc.get_as_of(rows, features)
    assert info.value.code == "INVALID_ARGUMENT"
    assert message in info.value.message
    svc.close()


def test_unknown_feature_service(asof: AsOfService) -> None:
    with pytest.raises(ServingError, match="no feature service 'nope'") as info:
        asof.get_as_of([({"user_id": "u1"}, T0)], [], "nope")
    assert info.value.code == "NOT_FOUND"


def test_too_much_history_is_refused_and_the_connection_stays_usable(shop: ServingProject) -> None:
    svc = AsOfService(lambda: shop.snapshot, shop.postgres_url, as_of_limits=AsOfLimits(max_events=3))
    with pytest.raises(ServingError, match="more than 3 history events") as info:
        svc.get_as_of([({"user_id": "u2"}, T0 + 10 * MIN)], ["user_orders:count_1h"])
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert values(svc.get_as_of([({"user_id": "u1"}, T0 + 10 * MIN)], ["user_orders:count_1h"]))[0] == {
        "count_1h": (2, "PRESENT")
    }
    svc.close()


def test_source_without_archive_is_missing(shop: ServingProject, asof: AsOfService) -> None:
    with psycopg.connect(shop.postgres_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("drop table {} cascade").format(qualified(table_name("raw", "orders"))))
    got = one(asof, "u1", T0 + 10 * MIN)
    assert all(v == (None, "MISSING") for v in got.values())


def test_postgres_down_fails_fast_with_unavailable(shop: ServingProject) -> None:
    svc = AsOfService(lambda: shop.snapshot, "postgresql://postgres@127.0.0.1:1/nothing", connect_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(ServingError) as info:
        svc.get_as_of([({"user_id": "u1"}, T0)], ["user_orders:count_1h"])
    assert info.value.code == "UNAVAILABLE"
    assert time.monotonic() - started < 2.0


class RecordingPolicy(OpenAccess):
    def __init__(self, deny: bool = False) -> None:
        self.deny = deny
        self.calls: list[tuple[str, str]] = []

    def authorize(self, principal: Principal, refs: list[FeatureRef], method: str) -> None:
        self.calls.append(("authorize", method))
        if self.deny:
            raise ServingError("PERMISSION_DENIED", f"{principal.name} may not read '{refs[0].name}'")

    def present(self, principal: Principal, rows: ServedRows, method: str) -> ServedRows:
        self.calls.append(("present", method))
        return ServedRows(rows.feature_names, rows.refs, rows.rows[:1])


def test_access_policy_is_asked_before_reading_and_shapes_the_answer(shop: ServingProject) -> None:
    policy = RecordingPolicy()
    svc = AsOfService(lambda: shop.snapshot, shop.postgres_url, access=policy)
    rows = svc.get_as_of([({"user_id": "u1"}, T0 + 10 * MIN)] * 2, ["user_orders:count_1h"], principal=ANONYMOUS)
    assert len(rows.rows) == 1
    assert policy.calls == [("authorize", "as_of"), ("present", "as_of")]
    denied = AsOfService(lambda: shop.snapshot, shop.postgres_url, access=RecordingPolicy(deny=True))
    with pytest.raises(ServingError) as info:
        denied.get_as_of([({"user_id": "u1"}, T0)], ["user_orders:count_1h"], principal=Principal("bob"))
    assert info.value.code == "PERMISSION_DENIED"
    svc.close()
    denied.close()
