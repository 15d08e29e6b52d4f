"""The gRPC front end on real Redis and PostgreSQL: every RPC, statuses, error codes, auth,
health, reflection, TLS, Redis outages, graceful shutdown, and the Python client."""

from __future__ import annotations

import ipaddress
import json
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from featurestream import Client
from featurestream.devstack.procs import free_port
from featurestream.devstack.services import StartedService, start_redis
from featurestream.registry.usage import UsageIncrement, record_feature_usage
from featurestream.serving.access import ANONYMOUS, OpenAccess, Principal
from featurestream.serving.asof import AsOfService
from featurestream.serving.catalog_api import RegistryCatalog
from featurestream.serving.client import ClientError
from featurestream.serving.context import ServingContext
from featurestream.serving.convert import decode_rows, encode_rows, rows_to_pb, timestamp, to_value
from featurestream.serving.grpc_server import SERVICE_NAME, GrpcServer, GrpcSettings
from featurestream.serving.push import PushService
from featurestream.serving.refs import FeatureRef, ServingError
from featurestream.serving.service import OnlineService, ServedRow, ServedRows, ServedValue, ServingLimits
from featurestream.serving.snapshots import SnapshotProvider
from featurestream.serving.updates import UpdateService
from featurestream.v1 import featurestream_pb2 as pb
from featurestream.v1 import featurestream_pb2_grpc
from tests.integration.serving.conftest import MIN, T0, ServingProject, order, shop_definition

NOW = T0 + 10 * MIN
Serve = Callable[..., GrpcServer]


# ---------------------------------------------------------------- fixtures and fakes


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``serve(context, **settings) -> GrpcServer`` started on a free port, stopped at the end."""
    started: list[GrpcServer] = []

    def start(context: ServingContext, **settings: Any) -> GrpcServer:
        server = GrpcServer(context, GrpcSettings(port=0, **{"grace_s": 2.0, **settings})).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(0)


def online_at(shop: ServingProject, at_ms: int = NOW, **kwargs: Any) -> OnlineService:
    return OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda: at_ms, **kwargs)


def stub_of(server: GrpcServer) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(server.address)
    return channel, featurestream_pb2_grpc.FeatureServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture
def stub(shop: ServingProject, serve: Serve) -> Iterator[Any]:
    channel, stub = stub_of(serve(ServingContext(online=online_at(shop))))
    yield stub
    channel.close()


def request(users: Sequence[str | dict[str, str]], features: Sequence[str] = (), service: str = "") -> pb.GetOnlineFeaturesRequest:
    entities = [pb.EntityKey(join_keys={"user_id": u} if isinstance(u, str) else u) for u in users]
    return pb.GetOnlineFeaturesRequest(entities=entities, features=list(features), feature_service=service)


def cells(message: pb.FeatureRows) -> list[dict[str, tuple[Any, str]]]:
    return [{name: (f["value"], f["status"]) for name, f in row["features"].items()} for row in decode_rows(message.SerializeToString())[1]]


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


class Tokens:
    """A tiny access policy: two tokens; 'intern' may not read personal data."""

    def authenticate(self, token: str | None) -> Principal:
        if token is None:
            raise ServingError("UNAUTHENTICATED", "send 'authorization: Bearer <token>'")
        if token == "t-admin":
            return Principal("admin", scopes=frozenset({"*"}))
        if token == "t-intern":
            return Principal("intern", scopes=frozenset({"read"}))
        raise ServingError("UNAUTHENTICATED", "unknown token")

    def authorize(self, principal: Principal, refs: list[FeatureRef], method: str) -> None:
        for ref in refs:
            if ref.feature.pii != "none" and "*" not in principal.scopes:
                raise ServingError("PERMISSION_DENIED", f"'{principal.name}' may not read '{ref.name}' (pii {ref.feature.pii})")

    def present(self, principal: Principal, rows: ServedRows, method: str) -> ServedRows:
        return rows


class SlowAsOf:
    """An as-of reader that takes its time (for the shutdown test) and records what it got."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.entered = threading.Event()
        self.calls: list[tuple[Any, ...]] = []

    def get_as_of(self, rows: Sequence[tuple[dict[str, str], int]], features: Sequence[str], feature_service: str = "",
                  principal: Principal = ANONYMOUS, as_of_arrival: bool = False) -> ServedRows:
        self.calls.append((list(rows), list(features), feature_service, principal.name, as_of_arrival))
        self.entered.set()
        time.sleep(self.delay_s)
        return ServedRows(["v:f"], [], [ServedRow(e, at, [ServedValue(1.5, "PRESENT", at - 1)]) for e, at in rows])


class FakeSubscription:
    def __init__(self) -> None:
        self.items: queue.Queue[ServedRows | None] = queue.Queue()
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[ServedRows]:
        while not self.closed.is_set():
            try:
                item = self.items.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                return
            yield item

    def close(self) -> None:
        self.closed.set()


class FakeFeed:
    def __init__(self, online: OnlineService) -> None:
        self.online = online
        self.subscriptions: list[FakeSubscription] = []
        self.requests: list[tuple[Any, ...]] = []

    def subscribe(self, entities: Sequence[dict[str, str]], features: Sequence[str], feature_service: str = "",
                  principal: Principal = ANONYMOUS) -> FakeSubscription:
        # Resolve like the real feed would, so bad requests fail before the stream starts.
        self.online.catalog.resolve(list(features), feature_service)
        self.requests.append((list(entities), list(features), feature_service, principal.name))
        sub = FakeSubscription()
        self.subscriptions.append(sub)
        return sub


# ---------------------------------------------------------------- GetOnlineFeatures


def test_online_values_statuses_and_event_times(stub: Any) -> None:
    reply = stub.GetOnlineFeatures(request(["u1", "u2", "nobody"], ["user_orders"]))
    assert list(reply.feature_names) == [
        "user_orders:count_1h", "user_orders:amount_sum_1h", "user_orders:amount_mean_1h",
        "user_orders:last_country", "user_orders:last_card",
    ]
    u1, u2, nobody = reply.rows
    assert dict(u1.entity.join_keys) == {"user_id": "u1"}
    assert u1.timestamp == timestamp(NOW)
    count = u1.values[0]
    assert count.value.int64_value == 2 and count.status == pb.PRESENT
    assert count.event_time == timestamp(T0 + 5 * MIN)
    assert u1.values[1].value.double_value == 30.0
    assert u1.values[2].value.WhichOneof("kind") == "double_value" and u1.values[2].value.double_value == 15.0
    assert u1.values[3].value.string_value == "DE"
    assert u2.values[0].status == pb.INVALID and u2.values[0].value.int64_value == 4  # validation: max 3
    for value in nobody.values:
        assert value.status == pb.MISSING
        assert not value.HasField("value") and not value.HasField("event_time")


def test_feature_service_versions_and_integer_keys(stub: Any) -> None:
    reply = stub.GetOnlineFeatures(request([{"user_id": "u2", "shop_id": "8"}], service="checkout"))
    assert cells(reply) == [{"user_orders:count_1h": (4, "INVALID"), "shop_orders:count_1h": (3, "PRESENT")}]
    versioned = stub.GetOnlineFeatures(request(["u1"], ["user_orders@1:count_1h"]))
    assert list(versioned.feature_names) == ["user_orders@1:count_1h"]
    assert cells(versioned) == [{"user_orders@1:count_1h": (2, "PRESENT")}]


def test_statuses_stale_and_decayed(shop: ServingProject, serve: Serve) -> None:
    channel, later = stub_of(serve(ServingContext(online=online_at(shop, T0 + 125 * MIN))))
    with channel:
        got = cells(later.GetOnlineFeatures(request(["u1"], ["user_orders"])))[0]
    assert got["user_orders:count_1h"] == (0, "STALE")  # the window decayed, older than max_age 30m
    assert got["user_orders:amount_mean_1h"] == (None, "MISSING")
    assert got["user_orders:last_country"] == ("DE", "PRESENT")


@pytest.mark.parametrize(
    ("users", "features", "service", "code", "message"),
    [
        (["u1"], ["nope:count_1h"], "", grpc.StatusCode.INVALID_ARGUMENT, "unknown or retired feature view 'nope'"),
        (["u1"], ["user_orders:nope"], "", grpc.StatusCode.INVALID_ARGUMENT, "unknown feature 'nope' of view 'user_orders'"),
        (["u1"], ["user_orders@9:count_1h"], "", grpc.StatusCode.INVALID_ARGUMENT, "has no live version 9"),
        (["u1"], ["Bad Ref"], "", grpc.StatusCode.INVALID_ARGUMENT, "'Bad Ref' is not 'view', 'view:feature'"),
        ([{"user": "u1"}], ["user_orders:count_1h"], "", grpc.StatusCode.INVALID_ARGUMENT,
         "entity row 0: missing join key 'user_id'"),
        ([{"shop_id": "x7"}], ["shop_orders"], "", grpc.StatusCode.INVALID_ARGUMENT,
         "join key 'shop_id' must be an integer, got 'x7'"),
        ([], ["user_orders"], "", grpc.StatusCode.INVALID_ARGUMENT, "give at least one entity"),
        (["u"] * 6, ["user_orders"], "", grpc.StatusCode.INVALID_ARGUMENT, "6 entities in one request; the limit is 5"),
        (["u1"], [], "", grpc.StatusCode.INVALID_ARGUMENT, "name at least one feature"),
        (["u1"], [], "nope", grpc.StatusCode.NOT_FOUND, "no feature service 'nope'"),
    ],
)
def test_errors_map_to_codes_naming_the_item(
    shop: ServingProject, serve: Serve, users: list[Any], features: list[str], service: str,
    code: grpc.StatusCode, message: str,
) -> None:
    channel, stub = stub_of(serve(ServingContext(online=online_at(shop, limits=ServingLimits(max_entities=5)))))
    with channel:
        error = rpc_error(lambda: stub.GetOnlineFeatures(request(users, features, service)))
    assert error.code() == code
    assert message in error.details()


def test_bearer_tokens_authenticate_and_authorize(shop: ServingProject, serve: Serve) -> None:
    policy = Tokens()
    channel, stub = stub_of(serve(ServingContext(online=online_at(shop, access=policy), access=policy)))
    with channel:
        missing = rpc_error(lambda: stub.GetOnlineFeatures(request(["u1"], ["user_orders:count_1h"])))
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in missing.details()
        wrong = rpc_error(lambda: stub.GetOnlineFeatures(request(["u1"], ["user_orders:count_1h"]),
                                                         metadata=[("authorization", "Bearer t-nope")]))
        assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED and wrong.details() == "unknown token"
        intern = [("authorization", "Bearer t-intern")]
        ok = stub.GetOnlineFeatures(request(["u1"], ["user_orders:count_1h"]), metadata=intern)
        assert cells(ok) == [{"user_orders:count_1h": (2, "PRESENT")}]
        denied = rpc_error(lambda: stub.GetOnlineFeatures(request(["u1"], ["user_orders"]), metadata=intern))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'user_orders:last_country'" in denied.details()
        admin = stub.GetOnlineFeatures(request(["u1"], ["user_orders"]), metadata=[("authorization", "bearer t-admin")])
        assert cells(admin)[0]["user_orders:last_card"] == ("4111-u1", "PRESENT")
        # Catalog calls need a valid token too.
        catalog_call = rpc_error(lambda: stub.ListFeatures(pb.ListFeaturesRequest()))
        assert catalog_call.code() == grpc.StatusCode.UNAUTHENTICATED


def test_missing_parts_are_unimplemented(stub: Any) -> None:
    calls = {
        "as-of": lambda: stub.GetFeaturesAsOf(pb.GetFeaturesAsOfRequest(features=["user_orders"])),
        "pushed events": lambda: stub.PushEvents(pb.PushEventsRequest(source="orders")),
        "catalog": lambda: stub.ListFeatures(pb.ListFeaturesRequest()),
        "has no catalog": lambda: stub.DescribeFeature(pb.DescribeFeatureRequest(name="user_orders:count_1h")),
        "feature updates": lambda: next(iter(stub.StreamFeatureUpdates(pb.StreamFeatureUpdatesRequest(features=["user_orders"])))),
    }
    for words, call in calls.items():
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED, words
        assert words in error.details()


def test_unexpected_errors_are_internal_with_the_exception(shop: ServingProject, serve: Serve) -> None:
    class Broken:
        def list_features(self, query: str = "") -> list[dict[str, Any]]:
            raise KeyError("boom")

        def describe_feature(self, name: str) -> dict[str, Any]:
            raise AssertionError

    channel, stub = stub_of(serve(ServingContext(online=online_at(shop), catalog=Broken())))
    with channel:
        error = rpc_error(lambda: stub.ListFeatures(pb.ListFeaturesRequest()))
    assert error.code() == grpc.StatusCode.INTERNAL and "KeyError" in error.details() and "ListFeatures" in error.details()


# ---------------------------------------------------------------- the wire encoding


def test_encoded_rows_equal_the_generated_classes() -> None:
    at = T0 + 123
    when = datetime(2026, 11, 27, 9, 59, 58, 250_000, tzinfo=UTC)
    values = [
        ServedValue(2, "PRESENT", T0), ServedValue(0, "PRESENT", T0), ServedValue(-3, "STALE", T0 - 1),
        ServedValue(2**62, "PRESENT", 0), ServedValue(1.5, "PRESENT", T0), ServedValue(-0.0, "INVALID", T0),
        ServedValue(math.inf, "PRESENT", None), ServedValue(True, "PRESENT", T0), ServedValue(False, "PRESENT", T0),
        ServedValue("Zürich ✓", "PRESENT", T0 + 999), ServedValue("x" * 300, "PRESENT", T0), ServedValue(when, "PRESENT", T0),
        ServedValue(None, "MISSING", None), ServedValue(None, "MISSING", T0), ServedValue(1.0, "PRESENT", -1500),
    ]
    names = [f"v:f{i}" for i in range(len(values))]
    rows = ServedRows(names, [], [ServedRow({"user_id": "u1", "shop_id": "7"}, at, values), ServedRow({"k": "é"}, 0, values)])

    expected = pb.FeatureRows(feature_names=names)
    for row in rows.rows:
        message = expected.rows.add(entity=pb.EntityKey(join_keys=row.entity), timestamp=timestamp(row.at_ms))
        for v in row.values:
            fv = message.values.add(status=getattr(pb, v.status))
            value = to_value(v.value)
            if value is not None:
                fv.value.CopyFrom(value)
            if v.event_time_ms is not None:
                fv.event_time.CopyFrom(timestamp(v.event_time_ms))
    assert rows_to_pb(rows) == expected
    assert pb.FeatureRows.FromString(encode_rows(rows)) == pb.FeatureRows.FromString(expected.SerializeToString())
    names_back, decoded = decode_rows(encode_rows(rows), with_timestamp=True)
    assert names_back == names
    assert decode_rows(expected.SerializeToString(), with_timestamp=True)[1] == decoded  # either encoder's bytes
    assert decoded[0]["entity"] == {"user_id": "u1", "shop_id": "7"} and decoded[1]["entity"] == {"k": "é"}
    assert decoded[0]["timestamp"] == "2026-11-27T10:00:00.123Z" and decoded[1]["timestamp"] == "1970-01-01T00:00:00Z"
    assert [decoded[0]["features"][n]["value"] for n in names[:11]] == [
        2, 0, -3, 2**62, 1.5, -0.0, math.inf, True, False, "Zürich ✓", "x" * 300]
    assert [decoded[0]["features"][n]["status"] for n in names[:3]] == ["PRESENT", "PRESENT", "STALE"]
    assert decoded[0]["features"]["v:f5"]["status"] == "INVALID" and decoded[0]["features"]["v:f6"]["event_time"] is None
    got = decoded[0]["features"]
    assert got["v:f11"] == {"value": "2026-11-27T09:59:58.250000Z", "status": "PRESENT", "event_time": "2026-11-27T10:00:00Z"}
    assert got["v:f13"] == {"value": None, "status": "MISSING", "event_time": "2026-11-27T10:00:00Z"}
    assert got["v:f9"]["event_time"] == "2026-11-27T10:00:00.999Z"
    assert got["v:f14"]["event_time"] == "1969-12-31T23:59:58.500Z"


def test_decoded_cells_are_the_callers_own_and_unknown_fields_are_skipped() -> None:
    values = [ServedValue(7, "PRESENT", T0), ServedValue(7, "PRESENT", T0), ServedValue(None, "MISSING", None)]
    rows = ServedRows(["v:a", "v:b", "v:c"], [], [ServedRow({"user_id": "u1"}, T0, values)])
    data = encode_rows(rows)
    first = decode_rows(data)[1]
    assert first[0]["features"]["v:a"] == first[0]["features"]["v:b"] == {"value": 7, "status": "PRESENT", "event_time": "2026-11-27T10:00:00Z"}
    first[0]["features"]["v:a"]["value"] = 8  # the memo of decoded cells must not hand this out again
    assert decode_rows(data)[1][0]["features"]["v:a"]["value"] == 7
    assert first[0]["features"]["v:b"]["value"] == 7

    # A newer server's fields this client does not know: a varint (15), a fixed64 (13) and a
    # string (14) at the top level, and a varint field (9) inside a FeatureValue.
    message = pb.FeatureRows.FromString(data)
    extended = bytearray(b"\x78\x05" + b"\x69" + bytes(8) + b"\x72\x03abc")
    extended += message.SerializeToString()
    row = message.rows[0]
    value_bytes = row.values[0].SerializeToString() + b"\x48\x01"
    row_bytes = row.SerializeToString().replace(row.values[0].SerializeToString(), value_bytes, 1)
    head = pb.FeatureRows(feature_names=message.feature_names).SerializeToString()
    mangled = head + b"\x12" + bytes([len(row_bytes)]) + row_bytes
    assert decode_rows(bytes(extended)) == decode_rows(data)
    assert decode_rows(mangled) == decode_rows(data)


# ---------------------------------------------------------------- the other RPCs


def test_as_of_from_history(shop: ServingProject, serve: Serve) -> None:
    asof = AsOfService(lambda: shop.snapshot, shop.postgres_url)
    channel, stub = stub_of(serve(ServingContext(online=online_at(shop), as_of=asof)))
    try:
        rows = [pb.AsOfRow(entity=pb.EntityKey(join_keys={"user_id": "u2"}), timestamp=timestamp(T0 + t * MIN)) for t in (3, 6)]
        reply = stub.GetFeaturesAsOf(pb.GetFeaturesAsOfRequest(rows=rows, features=["user_orders:count_1h"]))
        assert [r.timestamp for r in reply.rows] == [timestamp(T0 + 3 * MIN), timestamp(T0 + 6 * MIN)]
        assert cells(reply) == [{"user_orders:count_1h": (2, "PRESENT")}, {"user_orders:count_1h": (4, "INVALID")}]
        assert reply.rows[0].values[0].event_time == timestamp(T0 + 3 * MIN)
        no_time = pb.GetFeaturesAsOfRequest(rows=[pb.AsOfRow(entity=pb.EntityKey(join_keys={"user_id": "u2"}))],
                                            features=["user_orders"])
        error = rpc_error(lambda: stub.GetFeaturesAsOf(no_time))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "row 0: give the timestamp" in error.details()
        unknown = rpc_error(lambda: stub.GetFeaturesAsOf(pb.GetFeaturesAsOfRequest(rows=rows, features=["nope"])))
        assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT and "'nope'" in unknown.details()
    finally:
        channel.close()
        asof.close()


def test_push_events_to_kafka(shop: ServingProject, serve: Serve, kafka_bootstrap: str, create_topic: Callable[..., str]) -> None:
    create_topic(shop.definition.sources[0].topic, 1)
    push = PushService(lambda: shop.snapshot, kafka_bootstrap)
    channel, stub = stub_of(serve(ServingContext(online=online_at(shop), push=push)))
    try:
        events = [order("u9", 7, 3.0, 20), b'{"user_id": "u9", "amount": -1}', order("u9", 7, 4.0, 21)]
        reply = stub.PushEvents(pb.PushEventsRequest(source="orders", events=events), timeout=20)
        assert reply.accepted == 2
        assert [r.index for r in reply.rejected] == [1] and reply.rejected[0].reason
        unknown = rpc_error(lambda: stub.PushEvents(pb.PushEventsRequest(source="nope", events=events)))
        assert unknown.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert "'nope'" in unknown.details()
        nameless = rpc_error(lambda: stub.PushEvents(pb.PushEventsRequest(events=events)))
        assert nameless.code() == grpc.StatusCode.INVALID_ARGUMENT and "source" in nameless.details()
    finally:
        channel.close()
        push.close()


def test_stream_updates_until_the_client_cancels(shop: ServingProject, serve: Serve) -> None:
    online = online_at(shop)
    feed = FakeFeed(online)
    server = serve(ServingContext(online=online, updates=feed))
    channel, stub = stub_of(server)
    with channel:
        call = stub.StreamFeatureUpdates(pb.StreamFeatureUpdatesRequest(
            entities=[pb.EntityKey(join_keys={"user_id": "u1"})], features=["user_orders:count_1h"]))
        first = online.get_online([{"user_id": "u1"}], ["user_orders:count_1h"])
        deadline = time.monotonic() + 5
        while not feed.subscriptions and time.monotonic() < deadline:
            time.sleep(0.01)
        sub = feed.subscriptions[0]
        sub.items.put(first)
        sub.items.put(first)
        got = [next(call), next(call)]
        assert cells(got[0]) == [{"user_orders:count_1h": (2, "PRESENT")}] and got[1] == got[0]
        assert feed.requests == [([{"user_id": "u1"}], ["user_orders:count_1h"], "", "anonymous")]
        call.cancel()
        assert sub.closed.wait(2.0), "the subscription was not closed when the client cancelled"

        bad = stub.StreamFeatureUpdates(pb.StreamFeatureUpdatesRequest(features=["nope:x"]))
        error = rpc_error(lambda: next(bad))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "'nope'" in error.details()

        # Shutting down ends open streams with UNAVAILABLE instead of holding the grace period.
        open_call = stub.StreamFeatureUpdates(pb.StreamFeatureUpdatesRequest(features=["user_orders:count_1h"]))
        feed.subscriptions.clear()
        threading.Timer(0.2, lambda: server.stop(5.0)).start()
        started = time.monotonic()
        error = rpc_error(lambda: next(open_call))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 3.0


def test_stream_updates_from_the_stream_jobs(shop: ServingProject, serve: Serve) -> None:
    online = online_at(shop)
    feed = UpdateService(lambda: shop.snapshot, shop.redis_url, online, poll_s=0.1)
    channel, stub = stub_of(serve(ServingContext(online=online, updates=feed)))
    try:
        call = stub.StreamFeatureUpdates(pb.StreamFeatureUpdatesRequest(
            entities=[pb.EntityKey(join_keys={"user_id": "u1"})], features=["user_orders:count_1h", "user_orders:last_country"]))
        deadline = time.monotonic() + 5
        while feed.active == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert feed.active == 1
        shop.write([order("u2", 7, 1.0, 7)], first_offset=100)  # not subscribed
        shop.write([order("u1", 7, 2.0, 8, "IT")], first_offset=101)
        update = next(call)
        assert cells(update) == [{"user_orders:count_1h": (3, "PRESENT"), "user_orders:last_country": ("IT", "PRESENT")}]
        assert update.rows[0].values[0].event_time == timestamp(T0 + 8 * MIN)
        call.cancel()
        deadline = time.monotonic() + 3
        while feed.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert feed.active == 0, "the subscription was not closed when the client cancelled"
    finally:
        channel.close()
        feed.close()


def test_open_streams_are_limited(shop: ServingProject, serve: Serve) -> None:
    online = online_at(shop)
    feed = FakeFeed(online)
    channel, stub = stub_of(serve(ServingContext(online=online, updates=feed), max_workers=4, max_streams=2))
    with channel:
        ask = pb.StreamFeatureUpdatesRequest(entities=[pb.EntityKey(join_keys={"user_id": "u1"})], features=["user_orders"])
        calls = [stub.StreamFeatureUpdates(ask), stub.StreamFeatureUpdates(ask)]
        deadline = time.monotonic() + 5
        while len(feed.subscriptions) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        third = stub.StreamFeatureUpdates(ask)
        error = rpc_error(lambda: next(third))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is 2" in error.details()
        # Lookups still get threads.
        assert cells(stub.GetOnlineFeatures(request(["u1"], ["user_orders:count_1h"]))) == [{"user_orders:count_1h": (2, "PRESENT")}]
        for call in calls:
            call.cancel()
        for sub in feed.subscriptions:
            assert sub.closed.wait(2.0)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # the places free up once the handlers return
            fourth = stub.StreamFeatureUpdates(ask)
            time.sleep(0.1)
            if len(feed.subscriptions) == 3:
                break
            fourth.cancel()
        assert len(feed.subscriptions) == 3
        fourth.cancel()


# ---------------------------------------------------------------- catalog


def test_list_and_describe_features_with_read_counts(shop: ServingProject, serve: Serve) -> None:
    with shop.registry.connection() as conn:
        record_feature_usage(conn, [UsageIncrement(shop.name, "user_orders", 1, "count_1h", "team-a", 7, datetime.now(UTC)),
                                    UsageIncrement(shop.name, "user_orders", 1, "count_1h", "team-b", 5, datetime.now(UTC))])
    catalog = RegistryCatalog(shop.registry, lambda: shop.snapshot)
    channel, stub = stub_of(serve(ServingContext(online=online_at(shop), catalog=catalog)))
    with channel:
        listed = stub.ListFeatures(pb.ListFeaturesRequest())
        assert [f.name for f in listed.features] == [
            "shop_orders:count_1h", "user_orders:amount_mean_1h", "user_orders:amount_sum_1h", "user_orders:count_1h",
            "user_orders:last_card", "user_orders:last_country",
        ]
        found = stub.ListFeatures(pb.ListFeaturesRequest(query="amount"))
        assert {f.name for f in found.features} == {"user_orders:amount_mean_1h", "user_orders:amount_sum_1h"}
        info = stub.DescribeFeature(pb.DescribeFeatureRequest(name="user_orders:count_1h"))
        assert (info.name, info.view_version, info.reads) == ("user_orders:count_1h", 1, 12)
        assert (info.dtype, info.aggregation, info.window, info.max_age) == ("int64", "count", "sliding 1h", "30m")
        assert (info.entity, list(info.join_keys), info.source, info.pii) == ("user", ["user_id"], "orders", "none")
        card = stub.DescribeFeature(pb.DescribeFeatureRequest(name="user_orders@1:last_card"))
        assert (card.pii, card.dtype, card.reads) == ("sensitive", "string", 0)
        for name, code, words in [
            ("user_orders:nope", grpc.StatusCode.NOT_FOUND, "no feature 'nope'"),
            ("nope:x", grpc.StatusCode.NOT_FOUND, "no live feature view 'nope'"),
            ("user_orders@4:count_1h", grpc.StatusCode.NOT_FOUND, "no live version 4"),
            ("user_orders", grpc.StatusCode.INVALID_ARGUMENT, "'user_orders' is not a feature name"),
            ("", grpc.StatusCode.INVALID_ARGUMENT, "name the feature"),
        ]:
            error = rpc_error(lambda n=name: stub.DescribeFeature(pb.DescribeFeatureRequest(name=n)))  # type: ignore[misc]
            assert error.code() == code and words in error.details(), name


def test_snapshot_provider_reloads_when_the_registry_changes(shop: ServingProject, serve: Serve) -> None:
    provider = SnapshotProvider(shop.registry, shop.name, poll_s=0.1)
    try:
        online = OnlineService(provider, shop.redis_url, clock_ms=lambda: NOW)
        channel, stub = stub_of(serve(ServingContext(online=online)))
        with channel:
            error = rpc_error(lambda: stub.GetOnlineFeatures(request(["u1"], ["user_big_orders"])))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "'user_big_orders'" in error.details()
            spec = shop_definition(shop.name).model_dump(mode="json", exclude_defaults=True)
            spec["feature_views"].append({
                "name": "user_big_orders", "entity": "user", "source": "orders",
                "filter": [{"field": "amount", "op": "gt", "value": 100}],
                "features": [{"name": "count_1h", "aggregation": "count", "window": "1h"}],
            })
            shop.registry.apply(type(shop.definition).model_validate(spec))
            deadline = time.monotonic() + 5
            while provider.reloads == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert provider.reloads == 1 and provider.registry_version == shop.registry.registry_version(shop.name)
            reply = stub.GetOnlineFeatures(request(["u1"], ["user_orders:count_1h", "user_big_orders"]))
            assert cells(reply) == [{"user_orders:count_1h": (2, "PRESENT"), "user_big_orders:count_1h": (None, "MISSING")}]
            assert provider.refresh() is False
    finally:
        provider.close()


# ---------------------------------------------------------------- health, reflection, TLS


def test_health_and_reflection(stub: Any, shop: ServingProject, serve: Serve) -> None:
    server = serve(ServingContext(online=online_at(shop)))
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        unknown = rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope")))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in listing.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
        symbol = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)])))
        assert symbol.file_descriptor_response.file_descriptor_proto

        server.stop(0)
        # After shutdown the port refuses calls.
        error = rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=1))
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls(shop: ServingProject, serve: Serve, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = serve(ServingContext(online=online_at(shop)), host="localhost", tls_cert=cert, tls_key=key)
    with Client(f"localhost:{server.port}", tls=cert) as client:
        got = client.get_online([{"user_id": "u1"}], "user_orders:count_1h")
        assert got["results"][0]["features"]["user_orders:count_1h"]["value"] == 2
    with Client(f"localhost:{server.port}", timeout=2) as plain, pytest.raises(ClientError) as info:
        plain.get_online([{"user_id": "u1"}], "user_orders:count_1h")
    assert info.value.code == "UNAVAILABLE"


# ---------------------------------------------------------------- Redis outage, shutdown


def _copy_keys(source_url: str, target: redis.Redis, pattern: str) -> int:
    source = redis.Redis.from_url(source_url)
    try:
        # Field by field: DUMP payloads do not move between Redis 7 and the embedded 6.2.
        keys = list(source.scan_iter(match=pattern, _type="hash"))
        for key in keys:
            target.delete(key)
            target.hset(key, mapping=source.hgetall(key))
            ttl = source.pttl(key)
            if ttl > 0:
                target.pexpire(key, ttl)
        return len(keys)
    finally:
        source.close()


def test_redis_down_is_unavailable_fast_and_recovers(shop: ServingProject, serve: Serve, tmp_path: Path) -> None:
    port = free_port()

    def start() -> tuple[StartedService, redis.Redis]:
        service = start_redis(port, tmp_path / "redis.log", tmp_path / "redis")
        client = redis.Redis(port=port)
        assert _copy_keys(shop.redis_url, client, f"*{shop.name}*") > 0
        return service, client

    service, client = start()
    online = OnlineService(lambda: shop.snapshot, f"redis://127.0.0.1:{port}/0", clock_ms=lambda: NOW)
    channel, stub = stub_of(serve(ServingContext(online=online)))
    try:
        ask = request(["u1"], ["user_orders:count_1h"])
        assert cells(stub.GetOnlineFeatures(ask)) == [{"user_orders:count_1h": (2, "PRESENT")}]
        client.close()
        service.stop()
        for _ in range(3):
            started = time.monotonic()
            error = rpc_error(lambda: stub.GetOnlineFeatures(ask))
            assert time.monotonic() - started < 1.0
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "online store is unreachable" in error.details()
        service, client = start()
        assert cells(stub.GetOnlineFeatures(ask)) == [{"user_orders:count_1h": (2, "PRESENT")}]
    finally:
        channel.close()
        client.close()
        service.stop()


def test_graceful_shutdown_drains_in_flight_calls(shop: ServingProject, serve: Serve) -> None:
    slow = SlowAsOf(1.0)
    server = serve(ServingContext(online=online_at(shop), as_of=slow), grace_s=5.0)
    channel, stub = stub_of(server)
    row = pb.AsOfRow(entity=pb.EntityKey(join_keys={"user_id": "u1"}), timestamp=timestamp(T0))
    with channel, ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(stub.GetFeaturesAsOf, pb.GetFeaturesAsOfRequest(rows=[row], features=["v:f"]), timeout=10)
        assert slow.entered.wait(5)
        stopping = pool.submit(server.stop)
        time.sleep(0.2)
        refused = rpc_error(lambda: stub.GetOnlineFeatures(request(["u1"], ["user_orders:count_1h"]), timeout=2))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        reply = in_flight.result(timeout=10)  # finished, not cut off
        assert cells(reply) == [{"v:f": (1.5, "PRESENT")}]
        stopping.result(timeout=10)
    assert slow.calls == [([({"user_id": "u1"}, T0)], ["v:f"], "", "anonymous", False)]


def test_drain_delay_reports_not_serving_while_still_answering(shop: ServingProject, serve: Serve) -> None:
    server = serve(ServingContext(online=online_at(shop)), drain_delay_s=1.0)
    channel, stub = stub_of(server)
    health = health_pb2_grpc.HealthStub(channel)
    with channel, ThreadPoolExecutor(1) as pool:
        stopping = pool.submit(server.stop)
        time.sleep(0.3)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert cells(stub.GetOnlineFeatures(request(["u1"], ["user_orders:count_1h"]))) == [{"user_orders:count_1h": (2, "PRESENT")}]
        stopping.result(timeout=10)
        refused = rpc_error(lambda: stub.GetOnlineFeatures(request(["u1"], ["user_orders:count_1h"]), timeout=2))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE


def test_graceful_shutdown_cuts_calls_longer_than_the_grace(shop: ServingProject, serve: Serve) -> None:
    slow = SlowAsOf(3.0)
    server = serve(ServingContext(online=online_at(shop), as_of=slow), grace_s=0.3)
    channel, stub = stub_of(server)
    row = pb.AsOfRow(entity=pb.EntityKey(join_keys={"user_id": "u1"}), timestamp=timestamp(T0))
    with channel, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(stub.GetFeaturesAsOf, pb.GetFeaturesAsOfRequest(rows=[row], features=["v:f"]), timeout=10)
        assert slow.entered.wait(5)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2.0
        with pytest.raises(grpc.RpcError) as info:
            in_flight.result(timeout=10)
    assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


# ---------------------------------------------------------------- the Python client


def test_python_client_dicts_frames_and_errors(shop: ServingProject, serve: Serve) -> None:
    policy = Tokens()
    catalog = RegistryCatalog(shop.registry, lambda: shop.snapshot)
    asof = SlowAsOf(0.0)
    server = serve(ServingContext(online=online_at(shop, access=policy), access=policy, catalog=catalog, as_of=asof))
    with Client(server.address, token="t-admin") as client:
        client.wait_ready(5)
        got = client.get_online([{"user_id": "u1"}, {"user_id": "nobody"}], features=["user_orders:count_1h", "user_orders:amount_sum_1h"])
        assert isinstance(got, dict)
        assert json.loads(json.dumps(got)) == {"results": [
            {"entity": {"user_id": "u1"}, "features": {
                "user_orders:count_1h": {"value": 2, "status": "PRESENT", "event_time": "2026-11-27T10:05:00Z"},
                "user_orders:amount_sum_1h": {"value": 30.0, "status": "PRESENT", "event_time": "2026-11-27T10:05:00Z"}}},
            {"entity": {"user_id": "nobody"}, "features": {
                "user_orders:count_1h": {"value": None, "status": "MISSING", "event_time": None},
                "user_orders:amount_sum_1h": {"value": None, "status": "MISSING", "event_time": None}}},
        ]}
        frame = got.to_pandas(statuses=True)
        assert list(frame.columns) == ["user_id", "user_orders:count_1h", "user_orders:count_1h__status",
                                       "user_orders:amount_sum_1h", "user_orders:amount_sum_1h__status"]
        assert frame["user_id"].tolist() == ["u1", "nobody"]
        assert frame.loc[0, "user_orders:count_1h"] == 2 and frame.loc[1, "user_orders:count_1h__status"] == "MISSING"

        wide = client.get_online([{"user_id": "u1", "shop_id": 8}, {"user_id": "u2", "shop_id": 8}], feature_service="checkout",
                                 as_frame=True)
        assert list(wide.columns) == ["user_id", "shop_id", "user_orders:count_1h", "shop_orders:count_1h"]
        assert wide["user_orders:count_1h"].tolist() == [2, 4] and wide["shop_orders:count_1h"].tolist() == [3, 3]

        past = client.get_as_of([({"user_id": "u1"}, datetime(2026, 11, 27, 10, 0, tzinfo=UTC)), ({"user_id": "u2"}, T0 + 1)], "v:f")
        assert isinstance(past, dict)
        assert [r["timestamp"] for r in past["results"]] == ["2026-11-27T10:00:00Z", "2026-11-27T10:00:00.001Z"]
        assert asof.calls[0][0] == [({"user_id": "u1"}, T0), ({"user_id": "u2"}, T0 + 1)]
        past_frame = client.get_as_of([({"user_id": "u1"}, T0)], ["v:f"], as_frame=True)
        assert list(past_frame.columns) == ["user_id", "timestamp", "v:f"]

        assert [f["name"] for f in client.list_features("country")] == ["user_orders:last_country"]
        described = client.describe_feature("user_orders:amount_sum_1h")
        assert described["dtype"] == "float64" and described["window"] == "sliding 1h" and described["max_age"] is None

        with pytest.raises(ClientError) as info:
            client.get_online([{"user_id": "u1"}], ["user_orders:nope"])
        assert info.value.code == "INVALID_ARGUMENT" and "unknown feature 'nope'" in info.value.message
        with pytest.raises(ClientError) as unimplemented:
            client.push_events("orders", [{"user_id": "u1"}])
        assert unimplemented.value.code == "UNIMPLEMENTED"
    with Client(server.address) as anonymous, pytest.raises(ClientError) as info:
        anonymous.get_online([{"user_id": "u1"}], "user_orders:count_1h")
    assert info.value.code == "UNAUTHENTICATED"


def test_python_client_streams_updates(shop: ServingProject, serve: Serve) -> None:
    online = online_at(shop)
    feed = FakeFeed(online)
    server = serve(ServingContext(online=online, updates=feed))
    rows = online.get_online([{"user_id": "u2"}], ["user_orders:count_1h"])
    with Client(server.address) as client, client.stream_updates([{"user_id": "u2"}], "user_orders:count_1h") as stream:
        updates = iter(stream)
        threading.Timer(0.3, lambda: feed.subscriptions[0].items.put(rows)).start()
        first = next(updates)
        assert first["results"][0]["features"]["user_orders:count_1h"]["value"] == 4
        stream.cancel()
        assert list(updates) == []
    assert feed.subscriptions[0].closed.wait(2.0)


def test_client_reports_an_unreachable_server() -> None:
    with Client(f"127.0.0.1:{free_port()}", timeout=1) as client:
        with pytest.raises(ClientError) as info:
            client.get_online([{"user_id": "u1"}], "user_orders")
        assert info.value.code == "UNAVAILABLE"
        with pytest.raises(ClientError):
            client.wait_ready(0.2)


def test_open_access_without_tokens_is_anonymous(shop: ServingProject, serve: Serve) -> None:
    feed = FakeFeed(online_at(shop))
    server = serve(ServingContext(online=online_at(shop), access=OpenAccess(), updates=feed))
    with Client(server.address, token=f"ignored-{uuid.uuid4().hex}") as client:
        assert client.get_online([{"user_id": "u1"}], "user_orders:count_1h")["results"][0]["features"]
