"""The serving layer on real Redis: values, statuses, decay, limits, errors, Redis down."""

from __future__ import annotations

import time

import pytest

from featurestream.serving.refs import ServingError
from featurestream.serving.service import OnlineService, ServingLimits
from tests.integration.serving.conftest import MIN, T0, ServingProject, order


def service(shop: ServingProject, at_ms: int, **kwargs: object) -> OnlineService:
    return OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda: at_ms, **kwargs)  # type: ignore[arg-type]


def values(rows: object) -> list[dict[str, tuple[object, str]]]:
    return [
        {name: (v.value, v.status) for name, v in zip(rows.feature_names, row.values, strict=True)}  # type: ignore[attr-defined]
        for row in rows.rows  # type: ignore[attr-defined]
    ]


def test_values_and_statuses_at_request_time(shop: ServingProject) -> None:
    svc = service(shop, T0 + 10 * MIN)
    rows = svc.get_online([{"user_id": "u1"}, {"user_id": "u2"}, {"user_id": "nobody"}], ["user_orders"])
    assert rows.feature_names == [
        "user_orders:count_1h", "user_orders:amount_sum_1h", "user_orders:amount_mean_1h",
        "user_orders:last_country", "user_orders:last_card",
    ]
    u1, u2, nobody = values(rows)
    assert u1["user_orders:count_1h"] == (2, "PRESENT")
    assert u1["user_orders:amount_sum_1h"] == (30.0, "PRESENT")
    assert u1["user_orders:amount_mean_1h"] == (15.0, "PRESENT")
    assert u1["user_orders:last_country"] == ("DE", "PRESENT")
    assert u2["user_orders:count_1h"] == (4, "INVALID")  # validation: max 3
    assert all(status == "MISSING" and value is None for value, status in nobody.values())
    assert rows.rows[0].values[0].event_time_ms == T0 + 5 * MIN


def test_windows_decay_and_values_go_stale(shop: ServingProject) -> None:
    # 50 minutes after u1's last event: still in the hour, but older than max_age 30m.
    later = values(service(shop, T0 + 55 * MIN).get_online([{"user_id": "u1"}], ["user_orders:count_1h"]))[0]
    assert later["user_orders:count_1h"] == (2, "STALE")
    # Two hours later the window is empty: count decays to 0, the mean to missing.
    decayed = values(service(shop, T0 + 125 * MIN).get_online([{"user_id": "u1"}], ["user_orders"]))[0]
    assert decayed["user_orders:count_1h"] == (0, "STALE")
    assert decayed["user_orders:amount_mean_1h"] == (None, "MISSING")
    assert decayed["user_orders:last_country"] == ("DE", "PRESENT")  # lifetime, no max_age


def test_near_edge_is_exact(shop: ServingProject) -> None:
    # u2's events are at minutes 2, 3, 4, 6: a read at minute 3 sees exactly the first two.
    got = values(service(shop, T0 + 3 * MIN).get_online([{"user_id": "u2"}], ["user_orders:count_1h"]))[0]
    assert got["user_orders:count_1h"] == (2, "PRESENT")


def test_feature_service_spans_two_entities(shop: ServingProject) -> None:
    rows = service(shop, T0 + 10 * MIN).get_online([{"user_id": "u2", "shop_id": "8"}], [], "checkout")
    assert values(rows)[0] == {"user_orders:count_1h": (4, "INVALID"), "shop_orders:count_1h": (3, "PRESENT")}


@pytest.mark.parametrize(
    ("entities", "features", "message"),
    [
        ([{"user_id": "u1"}], ["nope:count_1h"], "unknown or retired feature view 'nope'"),
        ([{"user_id": "u1"}], ["user_orders:nope"], "unknown feature 'nope' of view 'user_orders'"),
        ([{"user_id": "u1"}], ["user_orders@9:count_1h"], "has no live version 9"),
        ([{"user_id": "u1"}], ["Bad Ref"], "is not 'view', 'view:feature'"),
        ([{"user": "u1"}], ["user_orders:count_1h"], "entity row 0: missing join key 'user_id'"),
        ([{"shop_id": "x7"}], ["shop_orders"], "join key 'shop_id' must be an integer, got 'x7'"),
        ([], ["user_orders"], "give at least one entity"),
        ([{"user_id": "u"}] * 6, ["user_orders"], "6 entities in one request; the limit is 5"),
    ],
)
def test_bad_requests_name_the_offending_item(shop: ServingProject, entities: list[dict[str, str]], features: list[str], message: str) -> None:
    svc = service(shop, T0, limits=ServingLimits(max_entities=5))
    with pytest.raises(ServingError) as info:
        svc.get_online(entities, features)
    assert info.value.code == "INVALID_ARGUMENT"
    assert message in info.value.message


def test_unknown_feature_service(shop: ServingProject) -> None:
    with pytest.raises(ServingError, match="no feature service 'nope'") as info:
        service(shop, T0).get_online([{"user_id": "u1"}], [], "nope")
    assert info.value.code == "NOT_FOUND"


def test_cache_serves_hot_keys_until_its_ttl(shop: ServingProject) -> None:
    now = [T0 + 10 * MIN]
    svc = OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda: now[0], cache_ttl_ms=500)
    before = values(svc.get_online([{"user_id": "u1"}], ["user_orders:count_1h"]))[0]
    shop.write([b'{"user_id": "u1", "shop_id": 7, "amount": 1, "country": "DE", "card": "c", "ts": %d}' % (T0 + 9 * MIN)], first_offset=100)
    assert values(svc.get_online([{"user_id": "u1"}], ["user_orders:count_1h"]))[0] == before  # cached
    now[0] += 501
    assert values(svc.get_online([{"user_id": "u1"}], ["user_orders:count_1h"]))[0]["user_orders:count_1h"] == (3, "PRESENT")


def test_redis_down_fails_fast_with_unavailable(shop: ServingProject) -> None:
    svc = OnlineService(lambda: shop.snapshot, "redis://127.0.0.1:1/0", clock_ms=lambda: T0)
    started = time.monotonic()
    with pytest.raises(ServingError) as info:
        svc.get_online([{"user_id": "u1"}], ["user_orders:count_1h"])
    assert info.value.code == "UNAVAILABLE"
    assert time.monotonic() - started < 1.0


def test_in_process_reader_matches_the_service(shop: ServingProject) -> None:
    from featurestream import OnlineReader

    reader = OnlineReader(shop.redis_url, postgres_url=shop.postgres_url, project=shop.name)
    try:
        got = reader.get([{"user_id": "u1"}], ["user_orders:amount_sum_1h", "user_orders:last_country"])
        [result] = got["results"]
        assert result["entity"] == {"user_id": "u1"}
        assert result["features"]["user_orders:amount_sum_1h"]["value"] == 0.0  # read now: the hour has passed
        assert result["features"]["user_orders:last_country"]["value"] == "DE"
        assert result["features"]["user_orders:last_country"]["event_time"] == "2026-11-27T10:05:00Z"
    finally:
        reader.close()


def test_state_of_an_older_layout_is_missing_not_an_error(shop: ServingProject) -> None:
    spec = shop.definition.model_dump(mode="json")
    spec["feature_views"][0]["features"].append({"name": "amount_max_1h", "aggregation": "max", "field": "amount", "window": "1h"})
    from featurestream.definitions.models import ProjectDefinition

    shop.registry.apply(ProjectDefinition.model_validate(spec))
    snapshot = shop.registry.snapshot(shop.name)
    assert snapshot.view("user_orders").version == 1  # adding a feature keeps the version
    svc = OnlineService(lambda: snapshot, shop.redis_url, clock_ms=lambda: T0 + 10 * MIN)
    got = values(svc.get_online([{"user_id": "u1"}], ["user_orders:count_1h", "user_orders:amount_max_1h"]))[0]
    assert got == {"user_orders:count_1h": (None, "MISSING"), "user_orders:amount_max_1h": (None, "MISSING")}
    assert values(svc.get_online([{"shop_id": "7"}], ["shop_orders:count_1h"]))[0] == {"shop_orders:count_1h": (3, "PRESENT")}


def test_read_memo_never_serves_what_redis_no_longer_holds(shop: ServingProject) -> None:
    """Decoded hashes are reused only while Redis returns the same bytes; values still decay."""
    now = [T0 + 10 * MIN]
    svc = OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda: now[0], memo_entries=16)
    read = lambda: values(svc.get_online([{"user_id": "u1"}], ["user_orders:count_1h", "user_orders:last_country"]))[0]  # noqa: E731
    assert read() == {"user_orders:count_1h": (2, "PRESENT"), "user_orders:last_country": ("DE", "PRESENT")}
    shop.write([order("u1", 7, 1.0, 9, "IT")], first_offset=100)
    assert read() == {"user_orders:count_1h": (3, "PRESENT"), "user_orders:last_country": ("IT", "PRESENT")}
    now[0] = T0 + 62 * MIN  # same bytes, a later tile: u1's minute-1 event has left the hour
    assert read()["user_orders:count_1h"] == (2, "STALE")
    import redis

    from featurestream.storage.online.redis_store import redis_key

    redis.Redis.from_url(shop.redis_url).delete(redis_key(shop.name, "user_orders", 1, ("u1",)))
    assert read() == {"user_orders:count_1h": (None, "MISSING"), "user_orders:last_country": (None, "MISSING")}


def test_memo_off_and_on_give_the_same_values(shop: ServingProject) -> None:
    entities = [{"user_id": u} for u in ("u1", "u2", "u1", "nobody")]
    for minutes in (3, 4.5, 10, 61, 66, 125):
        at = T0 + int(minutes * MIN)
        off = OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda at=at: at, memo_entries=0)  # type: ignore[misc]
        on = OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda at=at: at, memo_entries=2)  # type: ignore[misc]
        on.get_online(entities, ["user_orders"])  # fills the memo (2 entries: the young generation turns over)
        assert values(on.get_online(entities, ["user_orders"])) == values(off.get_online(entities, ["user_orders"]))


def test_unchanged_hashes_are_not_sent_again_and_a_flushed_script_is_reloaded(shop: ServingProject) -> None:
    import redis

    from featurestream.storage.online.redis_store import WRITE_TOKEN, read_command, redis_key, round_trip

    client = redis.Redis.from_url(shop.redis_url)
    key = redis_key(shop.name, "user_orders", 1, ("u1",)).encode()
    svc = service(shop, T0 + 10 * MIN, memo_entries=16)
    first = values(svc.get_online([{"user_id": "u1"}], ["user_orders"]))
    token = client.hget(key, WRITE_TOKEN)
    assert token and round_trip(svc.redis, [read_command(key, token)]) == [1]  # what a memo hit costs

    client.script_flush()  # Redis restarted or flushed: the server loads its script again
    assert values(svc.get_online([{"user_id": "u1"}], ["user_orders"])) == first
    shop.write([order("u1", 7, 5.0, 9, "IT")], first_offset=100)  # a write changes the token
    assert client.hget(key, WRITE_TOKEN) != token
    assert isinstance(round_trip(svc.redis, [read_command(key, token)])[0], list)
    assert values(svc.get_online([{"user_id": "u1"}], ["user_orders:count_1h"]))[0]["user_orders:count_1h"] == (3, "PRESENT")

    client.hdel(key, WRITE_TOKEN)  # a hash written before tokens: compared field by field
    assert values(svc.get_online([{"user_id": "u1"}], ["user_orders:count_1h"]))[0]["user_orders:count_1h"] == (3, "PRESENT")
    shop.write([order("u1", 7, 5.0, 9.5, "IT")], first_offset=101)
    assert values(svc.get_online([{"user_id": "u1"}], ["user_orders:count_1h"]))[0]["user_orders:count_1h"] == (4, "INVALID")  # validation: max 3


def test_reused_statuses_still_turn_stale_on_time(shop: ServingProject) -> None:
    """u1's newest event is at minute 5 and count_1h has max_age 30m: at minute 35 exactly the
    value is PRESENT, a millisecond later STALE, within one tile (same evaluation key)."""
    now = [T0 + 35 * MIN]
    svc = OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda: now[0], memo_entries=16)
    read = lambda: values(svc.get_online([{"user_id": "u1"}], ["user_orders:count_1h"]))[0]["user_orders:count_1h"]  # noqa: E731
    assert read() == (2, "PRESENT")
    now[0] += 1
    assert read() == (2, "STALE")
    now[0] -= 1  # a clock that steps back is answered for its own time
    assert read() == (2, "PRESENT")
