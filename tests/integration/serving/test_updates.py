"""StreamFeatureUpdates on real Redis: writes through the stream processor reach subscribers
within a second, only for subscribed entities, with fresh values; close() ends the stream."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from featurestream.definitions.models import ProjectDefinition
from featurestream.serving.access import OpenAccess, Principal
from featurestream.serving.refs import FeatureRef, ServingError
from featurestream.serving.service import OnlineService, ServedRows, ServingLimits
from featurestream.serving.updates import FeatureSubscription, UpdateService
from featurestream.storage.online.redis_store import updates_channel
from tests.integration.serving.conftest import MIN, T0, ServingProject, order

AT = T0 + 10 * MIN


@pytest.fixture
def online(shop: ServingProject) -> Iterator[OnlineService]:
    svc = OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda: AT)
    yield svc
    svc.close()


@pytest.fixture
def updates(shop: ServingProject, online: OnlineService) -> Iterator[UpdateService]:
    svc = UpdateService(lambda: shop.snapshot, shop.redis_url, online, poll_s=0.1)
    yield svc
    svc.close()
    assert svc.active == 0


class Reader:
    """Iterates a subscription on its own thread, as a gRPC server would."""

    def __init__(self, subscription: FeatureSubscription) -> None:
        self.subscription = subscription
        self.received: queue.Queue[ServedRows] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for rows in self.subscription:
                self.received.put(rows)
        except BaseException as exc:
            self.error = exc

    def next(self, timeout: float = 1.0) -> ServedRows:
        return self.received.get(timeout=timeout)

    def nothing_for(self, seconds: float) -> bool:
        try:
            self.received.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def stop(self) -> None:
        self.subscription.close()
        self.thread.join(timeout=2)
        assert not self.thread.is_alive()


def values(rows: ServedRows) -> list[tuple[dict[str, str], dict[str, tuple[Any, str]]]]:
    return [
        (row.entity, {n: (v.value, v.status) for n, v in zip(rows.feature_names, row.values, strict=True)})
        for row in rows.rows
    ]


def test_new_values_arrive_within_a_second(shop: ServingProject, updates: UpdateService) -> None:
    reader = Reader(updates.subscribe([{"user_id": "u1"}], ["user_orders:count_1h", "user_orders:amount_sum_1h"]))
    written = time.monotonic()
    shop.write([order("u1", 7, 5.0, 8, "ES")], first_offset=100)
    rows = reader.next(timeout=1.0)
    assert time.monotonic() - written < 1.0
    assert values(rows) == [
        ({"user_id": "u1"}, {"user_orders:count_1h": (3, "PRESENT"), "user_orders:amount_sum_1h": (35.0, "PRESENT")})
    ]
    assert rows.rows[0].at_ms == AT
    assert rows.rows[0].values[0].event_time_ms == T0 + 8 * MIN
    reader.stop()


def test_unsubscribed_entities_are_not_delivered(shop: ServingProject, updates: UpdateService) -> None:
    reader = Reader(updates.subscribe([{"user_id": "u1"}, {"user_id": "u3"}], ["user_orders:count_1h"]))
    shop.write([order("u2", 7, 5.0, 8)], first_offset=100)
    assert reader.nothing_for(0.5)
    shop.write([order("u2", 7, 5.0, 9), order("u1", 7, 5.0, 9)], first_offset=200)
    assert [entity for entity, _ in values(reader.next())] == [{"user_id": "u1"}]  # not u2, not u3 (unchanged)
    assert reader.nothing_for(0.3)
    reader.stop()


def test_feature_service_rows_follow_both_entities(shop: ServingProject, updates: UpdateService) -> None:
    reader = Reader(updates.subscribe([{"user_id": "u5", "shop_id": "8"}, {"user_id": "u6", "shop_id": "9"}], [], "checkout"))
    shop.write([order("u9", 8, 5.0, 8)], first_offset=100)  # neither user, but shop 8
    (entity, got), = values(reader.next())
    assert entity == {"user_id": "u5", "shop_id": "8"}
    assert got == {"user_orders:count_1h": (None, "MISSING"), "shop_orders:count_1h": (4, "PRESENT")}
    reader.stop()


def test_cached_online_values_are_not_served_after_an_update(shop: ServingProject) -> None:
    online = OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda: AT, cache_ttl_ms=60_000)
    svc = UpdateService(lambda: shop.snapshot, shop.redis_url, online, poll_s=0.1)
    assert online.get_online([{"user_id": "u1"}], ["user_orders:count_1h"]).rows[0].values[0].value == 2  # now cached
    reader = Reader(svc.subscribe([{"user_id": "u1"}], ["user_orders:count_1h"]))
    shop.write([order("u1", 7, 5.0, 8)], first_offset=100)
    assert values(reader.next())[0][1] == {"user_orders:count_1h": (3, "PRESENT")}
    reader.stop()
    svc.close()
    online.close()


def test_close_ends_the_iterator_promptly(updates: UpdateService) -> None:
    reader = Reader(updates.subscribe([{"user_id": "u1"}], ["user_orders"]))
    time.sleep(0.2)  # blocked waiting for messages
    assert updates.active == 1
    started = time.monotonic()
    reader.stop()
    assert time.monotonic() - started < 0.5
    assert reader.error is None
    assert updates.active == 0


def test_close_before_iterating_releases_the_connection(updates: UpdateService) -> None:
    subscription = updates.subscribe([{"user_id": "u1"}], ["user_orders"])
    assert updates.active == 1
    subscription.close()
    assert updates.active == 0
    assert list(subscription) == []


def test_breaking_out_of_the_loop_releases_the_connection(shop: ServingProject, updates: UpdateService) -> None:
    subscription = updates.subscribe([{"user_id": "u1"}], ["user_orders"])
    iterator = iter(subscription)
    shop.write([order("u1", 7, 5.0, 8)], first_offset=100)
    assert next(iterator).rows[0].entity == {"user_id": "u1"}
    iterator.close()  # what a for loop's break does once the generator is dropped
    assert updates.active == 0


def test_a_new_registry_version_moves_the_subscription(shop: ServingProject) -> None:
    current = [shop.snapshot]
    online = OnlineService(lambda: current[0], shop.redis_url, clock_ms=lambda: AT)
    svc = UpdateService(lambda: current[0], shop.redis_url, online, poll_s=0.05)
    reader = Reader(svc.subscribe([{"user_id": "u1"}], ["user_orders:count_1h"]))
    raw: dict[str, Any] = shop.definition.model_dump(mode="json", exclude_defaults=True)
    raw["feature_views"][0]["features"][0]["window"] = "2h"  # breaking: user_orders v2
    shop.registry.apply(ProjectDefinition.model_validate(raw))
    current[0] = shop.registry.snapshot(shop.name)
    assert max(v.version for v in current[0].views if v.name == "user_orders") == 2
    client = redis.Redis.from_url(shop.redis_url)
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # until the subscription listens on v2
            if client.publish(updates_channel(shop.name, "user_orders", 2), "u1"):
                break
            time.sleep(0.05)
        else:
            pytest.fail("nobody subscribed to user_orders v2")
        rows = reader.next()
        assert rows.rows[0].entity == {"user_id": "u1"}
        assert rows.rows[0].values[0].status == "MISSING"  # v2 has no state yet
    finally:
        client.close()
        reader.stop()
        svc.close()
        online.close()


@pytest.mark.parametrize(
    ("entities", "features", "code", "message"),
    [
        ([{"user_id": "u1"}], ["nope:count_1h"], "INVALID_ARGUMENT", "unknown or retired feature view 'nope'"),
        ([{"user": "u1"}], ["user_orders"], "INVALID_ARGUMENT", "entity row 0: missing join key 'user_id'"),
        ([], ["user_orders"], "INVALID_ARGUMENT", "give at least one entity"),
        ([{"user_id": "u"}] * 4, ["user_orders"], "INVALID_ARGUMENT", "4 entities in one request; the limit is 3"),
    ],
)
def test_bad_subscriptions(
    shop: ServingProject, entities: list[dict[str, str]], features: list[str], code: str, message: str
) -> None:
    online = OnlineService(lambda: shop.snapshot, shop.redis_url, limits=ServingLimits(max_entities=3))
    svc = UpdateService(lambda: shop.snapshot, shop.redis_url, online)
    with pytest.raises(ServingError) as info:
        svc.subscribe(entities, features)
    assert (info.value.code, svc.active) == (code, 0)
    assert message in info.value.message
    svc.close()
    online.close()


def test_subscription_limit(shop: ServingProject, online: OnlineService) -> None:
    svc = UpdateService(lambda: shop.snapshot, shop.redis_url, online, max_subscriptions=2)
    first = svc.subscribe([{"user_id": "u1"}], ["user_orders"])
    svc.subscribe([{"user_id": "u2"}], ["user_orders"])
    with pytest.raises(ServingError) as info:
        svc.subscribe([{"user_id": "u3"}], ["user_orders"])
    assert info.value.code == "RESOURCE_EXHAUSTED"
    first.close()
    svc.subscribe([{"user_id": "u3"}], ["user_orders"]).close()
    svc.close()
    assert svc.active == 0


class DenyAll(OpenAccess):
    def authorize(self, principal: Principal, refs: list[FeatureRef], method: str) -> None:
        raise ServingError("PERMISSION_DENIED", f"{principal.name} may not read '{refs[0].name}' ({method})")


def test_access_is_checked_at_subscribe(shop: ServingProject, online: OnlineService) -> None:
    svc = UpdateService(lambda: shop.snapshot, shop.redis_url, online, access=DenyAll())
    with pytest.raises(ServingError, match=r"bob may not read 'user_orders:count_1h' \(updates\)") as info:
        svc.subscribe([{"user_id": "u1"}], ["user_orders:count_1h"], principal=Principal("bob"))
    assert info.value.code == "PERMISSION_DENIED"
    svc.close()


def test_redis_down_is_unavailable(shop: ServingProject, online: OnlineService) -> None:
    svc = UpdateService(lambda: shop.snapshot, "redis://127.0.0.1:1/0", online, redis_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(ServingError) as info:
        svc.subscribe([{"user_id": "u1"}], ["user_orders"])
    assert info.value.code == "UNAVAILABLE"
    assert time.monotonic() - started < 2.0
    assert svc.active == 0
    svc.close()


def test_without_an_online_service_it_reads_through_its_own(shop: ServingProject) -> None:
    svc = UpdateService(lambda: shop.snapshot, shop.redis_url, limits=ServingLimits(max_entities=1))
    with pytest.raises(ServingError, match="2 entities in one request; the limit is 1"):
        svc.subscribe([{"user_id": "u1"}, {"user_id": "u2"}], ["user_orders"])
    reader = Reader(svc.subscribe([{"user_id": "u1"}], ["user_orders:last_country"]))
    shop.write([order("u1", 7, 5.0, 8, "ES")], first_offset=100)
    assert values(reader.next()) == [({"user_id": "u1"}, {"user_orders:last_country": ("ES", "PRESENT")})]
    reader.stop()
    svc.close()
