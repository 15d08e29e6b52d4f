"""PushEvents against a real (tansu) broker: valid events land on the source topic keyed by
entity, invalid ones come back with index and reason and are never produced."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from featurestream.definitions.models import ProjectDefinition
from featurestream.registry.records import ProjectSnapshot
from featurestream.serving.access import OpenAccess, Principal
from featurestream.serving.push import PushLimits, PushService
from featurestream.serving.refs import FeatureRef, ServingError
from tests.conftest import CreateTopic
from tests.integration.serving.conftest import T0, order, shop_definition

PARTITIONS = 3


def snapshot_of(definition: ProjectDefinition) -> ProjectSnapshot:
    """Push reads only the definitions: no registry needed."""
    return ProjectSnapshot(definition.project.name, 1, definition, ())


@pytest.fixture
def project(create_topic: CreateTopic) -> ProjectSnapshot:
    snapshot = snapshot_of(shop_definition(f"push{uuid.uuid4().hex[:8]}"))
    create_topic(snapshot.definition.sources[0].topic, partitions=PARTITIONS)
    return snapshot


@pytest.fixture
def pusher(project: ProjectSnapshot, kafka_bootstrap: str) -> Iterator[PushService]:
    svc = PushService(lambda: project, kafka_bootstrap, clock_ms=lambda: T0 + 3_600_000)
    yield svc
    svc.close()


def read_topic(bootstrap: str, topic: str, expected: int, linger_s: float = 0.5) -> list[tuple[int, bytes | None, bytes]]:
    """(partition, key, value) of every message, in offset order per partition."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    out: list[tuple[int, bytes | None, bytes]] = []
    deadline = time.monotonic() + 10
    quiet_until: float | None = None
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(100, timeout=0.1):
                if msg.error() is None:
                    out.append((msg.partition() or 0, msg.key(), msg.value() or b""))
            if len(out) >= expected:
                quiet_until = quiet_until or time.monotonic() + linger_s  # anything beyond expected?
                if time.monotonic() >= quiet_until:
                    break
    finally:
        consumer.close()
    return out


def test_valid_events_arrive_keyed_by_user(pusher: PushService, project: ProjectSnapshot, kafka_bootstrap: str) -> None:
    events = [order("u1", 7, 1.0, 1), order("u2", 8, 2.0, 2), order("u1", 7, 3.0, 3), order("u3", 7, 4.0, 4), order("u2", 8, 5.0, 5)]
    result = pusher.push("orders", events)
    assert (result.accepted, result.rejected) == (5, [])
    got = read_topic(kafka_bootstrap, project.definition.sources[0].topic, 5)
    assert sorted(v for _, _, v in got) == sorted(events)
    assert {v: k for _, k, v in got} == {e: json.loads(e)["user_id"].encode() for e in events}
    partitions: dict[bytes | None, set[int]] = {}
    for p, k, _ in got:
        partitions.setdefault(k, set()).add(p)
    assert all(len(ps) == 1 for ps in partitions.values())  # an entity's events share a partition
    u1 = [v for _, k, v in got if k == b"u1"]
    assert u1 == [events[0], events[2]]  # and keep their order


def test_invalid_events_are_rejected_with_index_and_reason(
    pusher: PushService, project: ProjectSnapshot, kafka_bootstrap: str
) -> None:
    future = json.dumps({"user_id": "u1", "shop_id": 7, "amount": 1, "country": "DE", "card": "c", "ts": T0 + 30 * 3_600_000})
    events = [
        order("u1", 7, 1.0, 1),
        b"{not json",
        order("u2", 7, -1.0, 2),
        json.dumps({"shop_id": 7, "amount": 1, "country": "DE", "card": "c", "ts": T0}).encode(),
        future.encode(),
        b"[1, 2]",
        order("u2", 8, 2.0, 3),
    ]
    result = pusher.push("orders", events)
    assert result.accepted == 2
    assert [i for i, _ in result.rejected] == [1, 2, 3, 4, 5]
    reasons = dict(result.rejected)
    assert reasons[1].startswith("not valid JSON")
    assert reasons[2] == "field 'amount': -1.0 is below the minimum 0"
    assert reasons[3] == "missing required field 'user_id'"
    assert "more than a day in the future" in reasons[4]
    assert reasons[5] == "expected a JSON object, got list"
    got = read_topic(kafka_bootstrap, project.definition.sources[0].topic, 2)
    assert sorted(v for _, _, v in got) == sorted([events[0], events[6]])


def test_first_entity_the_event_carries_is_the_key(create_topic: CreateTopic, kafka_bootstrap: str) -> None:
    raw: dict[str, Any] = shop_definition(f"push{uuid.uuid4().hex[:8]}").model_dump(mode="json", exclude_defaults=True)
    next(f for f in raw["sources"][0]["fields"] if f["name"] == "user_id")["required"] = False
    snapshot = snapshot_of(ProjectDefinition.model_validate(raw))
    topic = snapshot.definition.sources[0].topic
    create_topic(topic, partitions=PARTITIONS)
    svc = PushService(lambda: snapshot, kafka_bootstrap, clock_ms=lambda: T0)
    no_user = json.dumps({"shop_id": 42, "amount": 1, "country": "DE", "card": "c", "ts": T0}).encode()
    try:
        assert svc.push("orders", [no_user, order("u9", 42, 1.0, 0)]).accepted == 2
    finally:
        svc.close()
    assert sorted(k or b"" for _, k, _ in read_topic(kafka_bootstrap, topic, 2)) == [b"42", b"u9"]


@pytest.mark.parametrize(
    ("source", "events", "code", "message"),
    [
        ("nope", [b"{}"], "NOT_FOUND", "no source 'nope'"),
        ("orders", [], "INVALID_ARGUMENT", "give at least one event"),
        ("orders", [b"{}"] * 4, "INVALID_ARGUMENT", "4 events in one request; the limit is 3"),
        ("orders", [b"x" * 600, b"x" * 500], "INVALID_ARGUMENT", "1100 bytes of events in one request; the limit is 1000"),
    ],
)
def test_bad_requests(
    project: ProjectSnapshot, kafka_bootstrap: str, source: str, events: list[bytes], code: str, message: str
) -> None:
    svc = PushService(lambda: project, kafka_bootstrap, limits=PushLimits(max_events=3, max_request_bytes=1000))
    try:
        with pytest.raises(ServingError) as info:
            svc.push(source, events)
    finally:
        svc.close()
    assert info.value.code == code
    assert message in info.value.message
    assert read_topic(kafka_bootstrap, project.definition.sources[0].topic, 0, linger_s=0.3) == []


class DenyPush(OpenAccess):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def authorize(self, principal: Principal, refs: list[FeatureRef], method: str) -> None:
        self.calls.append((principal.name, method, len(refs)))
        if principal.name != "writer":
            raise ServingError("PERMISSION_DENIED", f"{principal.name} may not push events")


def test_access_policy_decides_who_may_push(project: ProjectSnapshot, kafka_bootstrap: str) -> None:
    policy = DenyPush()
    svc = PushService(lambda: project, kafka_bootstrap, access=policy, clock_ms=lambda: T0)
    try:
        with pytest.raises(ServingError) as info:
            svc.push("orders", [order("u1", 7, 1.0, 1)], Principal("reader"))
        assert info.value.code == "PERMISSION_DENIED"
        assert svc.push("orders", [order("u1", 7, 1.0, 1)], Principal("writer")).accepted == 1
    finally:
        svc.close()
    assert policy.calls == [("reader", "push", 0), ("writer", "push", 0)]
    assert len(read_topic(kafka_bootstrap, project.definition.sources[0].topic, 1)) == 1


def test_broker_down_is_unavailable_within_the_delivery_timeout(project: ProjectSnapshot) -> None:
    svc = PushService(lambda: project, "127.0.0.1:1", delivery_timeout_s=1.0, clock_ms=lambda: T0)
    started = time.monotonic()
    try:
        with pytest.raises(ServingError) as info:
            svc.push("orders", [order("u1", 7, 1.0, 1), b"nope"])
    finally:
        svc.close()
    assert info.value.code == "UNAVAILABLE"
    assert "orders-" in info.value.message
    assert time.monotonic() - started < 4.0


def test_concurrent_pushes_each_get_their_own_outcome(
    pusher: PushService, project: ProjectSnapshot, kafka_bootstrap: str
) -> None:
    results: dict[int, tuple[int, list[tuple[int, str]]]] = {}

    def run(n: int, make: Callable[[int], bytes]) -> None:
        r = pusher.push("orders", [make(i) for i in range(50)])
        results[n] = (r.accepted, r.rejected)

    threads = [
        threading.Thread(target=run, args=(n, (lambda i, n=n: order(f"u{n}", 7, float(i), 1) if i % 10 else b"bad")))
        for n in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for accepted, rejected in results.values():
        assert accepted == 45
        assert [i for i, _ in rejected] == [0, 10, 20, 30, 40]
        assert all(reason.startswith("not valid JSON") for _, reason in rejected)
    assert len(read_topic(kafka_bootstrap, project.definition.sources[0].topic, 180)) == 180
