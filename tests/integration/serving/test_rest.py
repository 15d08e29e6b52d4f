"""The REST front end on real Redis/PostgreSQL: same answers as the service, errors, auth, limits."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from featurestream.devstack.procs import free_port
from featurestream.serving.access import ANONYMOUS, Principal
from featurestream.serving.context import PushResult, ServingContext
from featurestream.serving.refs import FeatureRef, ServingError
from featurestream.serving.rest import build_app, iso_ms, rows_to_json
from featurestream.serving.service import OnlineService, ServedRow, ServedRows, ServedValue
from tests.integration.serving.conftest import MIN, T0, ServingProject

NOW = T0 + 10 * MIN


def service(shop: ServingProject, at_ms: int = NOW, **kwargs: Any) -> OnlineService:
    return OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda: at_ms, **kwargs)


@pytest.fixture
def online(shop: ServingProject) -> Iterator[OnlineService]:
    svc = service(shop)
    yield svc
    svc.close()


@pytest.fixture
def client(online: OnlineService) -> Iterator[TestClient]:
    with TestClient(build_app(ServingContext(online))) as c:
        yield c


def expected(rows: ServedRows) -> list[dict[str, Any]]:
    """What the service returns directly, in the REST shape."""
    return [
        {
            "entity": row.entity,
            "features": {
                name: {
                    "value": v.value,
                    "status": v.status,
                    "event_time": None if v.event_time_ms is None else iso_ms(v.event_time_ms),
                }
                for name, v in zip(rows.feature_names, row.values, strict=True)
            },
        }
        for row in rows.rows
    ]


# --- a test policy and fakes for the parts other modules provide -------------------------------


class TokenPolicy:
    """Requires a bearer token; only principals with the 'pii' scope may read sensitive features."""

    def __init__(self) -> None:
        self.tokens = {
            "alice-token": Principal("alice", "growth"),
            "root-token": Principal("root", scopes=frozenset({"pii"})),
        }
        self.seen: list[tuple[str, str]] = []

    def authenticate(self, token: str | None) -> Principal:
        if token is None:
            raise ServingError("UNAUTHENTICATED", "a bearer token is required")
        principal = self.tokens.get(token)
        if principal is None:
            raise ServingError("UNAUTHENTICATED", "unknown token")
        return principal

    def authorize(self, principal: Principal, refs: list[FeatureRef], method: str) -> None:
        self.seen.append((principal.name, method))
        for ref in refs:
            if ref.feature.pii == "sensitive" and "pii" not in principal.scopes:
                raise ServingError("PERMISSION_DENIED", f"{principal.name} may not read '{ref.name}'")

    def present(self, principal: Principal, rows: ServedRows, method: str) -> ServedRows:
        return rows


class ReplayAsOf:
    """Answers each row with the online service evaluated at the row's time (enough to test the plumbing)."""

    def __init__(self, shop: ServingProject) -> None:
        self.shop = shop
        self.calls: list[tuple[list[tuple[dict[str, str], int]], bool, str]] = []

    def get_as_of(
        self,
        rows: Sequence[tuple[dict[str, str], int]],
        features: Sequence[str],
        feature_service: str = "",
        principal: Principal = ANONYMOUS,
        as_of_arrival: bool = False,
    ) -> ServedRows:
        self.calls.append((list(rows), as_of_arrival, principal.name))
        out: list[ServedRow] = []
        names: list[str] = []
        refs: list[FeatureRef] = []
        for entity, at in rows:
            svc = service(self.shop, at)
            served = svc.get_online([entity], features, feature_service, principal)
            svc.close()
            names, refs = served.feature_names, served.refs
            out.extend(served.rows)
        return ServedRows(names, refs, out)


class RecordingPusher:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[bytes], str]] = []

    def push(self, source: str, events: Sequence[bytes], principal: Principal = ANONYMOUS) -> PushResult:
        if source != "orders":
            raise ServingError("NOT_FOUND", f"no source '{source}'")
        self.calls.append((source, list(events), principal.name))
        decoded = [json.loads(e) for e in events]
        rejected = [(i, "missing field 'user_id'") for i, e in enumerate(decoded) if "user_id" not in e]
        return PushResult(len(events) - len(rejected), rejected)


class DefinitionCatalog:
    def __init__(self, shop: ServingProject) -> None:
        self.features: list[dict[str, Any]] = [
            {"name": f"{v.name}:{f.name}", "aggregation": f.aggregation, "window": f.window, "pii": f.pii}
            for v in shop.definition.feature_views
            for f in v.features
        ]

    def list_features(self, query: str = "") -> list[dict[str, Any]]:
        return [f for f in self.features if query in f["name"]]

    def describe_feature(self, name: str) -> dict[str, Any]:
        for f in self.features:
            if f["name"] == name:
                return f
        raise ServingError("NOT_FOUND", f"no feature '{name}'")


@pytest.fixture
def full(
    shop: ServingProject, online: OnlineService
) -> Iterator[tuple[TestClient, ReplayAsOf, RecordingPusher]]:
    as_of, pusher = ReplayAsOf(shop), RecordingPusher()
    context = ServingContext(online, as_of=as_of, push=pusher, catalog=DefinitionCatalog(shop))
    with TestClient(build_app(context)) as c:
        yield c, as_of, pusher


# --- online -------------------------------------------------------------------------------------


def test_online_values_equal_the_service(client: TestClient, online: OnlineService) -> None:
    entities = [{"user_id": "u1"}, {"user_id": "u2"}, {"user_id": "nobody"}]
    response = client.post("/v1/features/online", json={"entities": entities, "features": ["user_orders"]})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    results = response.json()["results"]
    assert results == expected(online.get_online(entities, ["user_orders"]))
    u1, u2, nobody = results
    assert u1["entity"] == {"user_id": "u1"}
    assert u1["features"]["user_orders:count_1h"] == {
        "value": 2,
        "status": "PRESENT",
        "event_time": "2026-11-27T10:05:00Z",
    }
    assert u1["features"]["user_orders:amount_mean_1h"]["value"] == 15.0
    assert u1["features"]["user_orders:last_country"]["value"] == "DE"
    assert u2["features"]["user_orders:count_1h"]["status"] == "INVALID"
    assert nobody["features"]["user_orders:amount_sum_1h"] == {
        "value": None,
        "status": "MISSING",
        "event_time": None,
    }


def test_feature_service_and_integer_join_keys(client: TestClient, online: OnlineService) -> None:
    body = {"entities": [{"user_id": "u2", "shop_id": 8}], "features": [], "feature_service": "checkout"}
    response = client.post("/v1/features/online", json=body)
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["entity"] == {"user_id": "u2", "shop_id": "8"}
    assert {k: (v["value"], v["status"]) for k, v in result["features"].items()} == {
        "user_orders:count_1h": (4, "INVALID"),
        "shop_orders:count_1h": (3, "PRESENT"),
    }
    assert response.json()["results"] == expected(
        online.get_online([{"user_id": "u2", "shop_id": "8"}], [], "checkout")
    )


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        (
            {"entities": [{"user_id": "u1"}], "features": ["nope:count_1h"]},
            400,
            "INVALID_ARGUMENT",
            "unknown or retired feature view 'nope'",
        ),
        (
            {"entities": [{"user_id": "u1"}], "features": ["Bad Ref"]},
            400,
            "INVALID_ARGUMENT",
            "is not 'view', 'view:feature'",
        ),
        (
            {"entities": [{"user": "u1"}], "features": ["user_orders"]},
            400,
            "INVALID_ARGUMENT",
            "entity row 0: missing join key 'user_id'",
        ),
        (
            {"entities": [{"shop_id": "x7"}], "features": ["shop_orders"]},
            400,
            "INVALID_ARGUMENT",
            "must be an integer, got 'x7'",
        ),
        ({"entities": [], "features": ["user_orders"]}, 400, "INVALID_ARGUMENT", "give at least one entity"),
        (
            {"entities": [{"user_id": "u1"}], "feature_service": "nope"},
            404,
            "NOT_FOUND",
            "no feature service 'nope'",
        ),
    ],
)
def test_service_errors_map_to_http(
    client: TestClient, body: dict[str, Any], status: int, code: str, message: str
) -> None:
    response = client.post("/v1/features/online", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert message in error["message"]


def test_redis_down_is_503_and_fast(shop: ServingProject) -> None:
    down = OnlineService(lambda: shop.snapshot, "redis://127.0.0.1:1/0", clock_ms=lambda: NOW)
    with TestClient(build_app(ServingContext(down))) as c:
        started = time.monotonic()
        response = c.post(
            "/v1/features/online", json={"entities": [{"user_id": "u1"}], "features": ["user_orders"]}
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "UNAVAILABLE"
        health = c.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/v1/features/online",
            {"entities": [{"user_id": "u1"}], "features": ["user_orders"], "extra": 1},
            "extra",
        ),
        ("/v1/features/online", {"features": ["user_orders"]}, "entities"),
        (
            "/v1/features/online",
            {"entities": [{"user_id": ["u1"]}], "features": ["user_orders"]},
            "entities.0.user_id",
        ),
        ("/v1/features/online", {"entities": [{"user_id": "u1"}], "features": "user_orders"}, "features"),
        (
            "/v1/features/as-of",
            {
                "rows": [{"entity": {"user_id": "u1"}, "timestamp": "2026-11-27T10:00:00"}],
                "features": ["user_orders"],
            },
            "rows.0.timestamp",
        ),
        (
            "/v1/features/as-of",
            {"rows": [{"entity": {"user_id": "u1"}, "timestamp": "yesterday"}]},
            "rows.0.timestamp",
        ),
        (
            "/v1/features/as-of",
            {"rows": [{"entity": {"user_id": "u1"}, "at": "2026-11-27T10:00:00Z"}]},
            "rows.0.at",
        ),
        ("/v1/sources/orders/events", {"events": [1, 2]}, "events.0"),
    ],
)
def test_bad_bodies_are_422_naming_the_field(
    full: tuple[TestClient, Any, Any], path: str, body: dict[str, Any], field: str
) -> None:
    client, _, _ = full
    response = client.post(path, json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert any(d["field"].startswith(field) for d in error["details"]), error
    assert field in error["message"]


def test_invalid_json_is_422(client: TestClient) -> None:
    response = client.post(
        "/v1/features/online", content=b'{"entities": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "INVALID_ARGUMENT"


def test_body_over_the_limit_is_413(online: OnlineService) -> None:
    with TestClient(build_app(ServingContext(online), max_body_bytes=1000)) as c:
        big = {"entities": [{"user_id": "u" * 50}] * 40, "features": ["user_orders"]}
        response = c.post("/v1/features/online", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
        # Without a Content-Length (chunked), counted while reading.
        payload = json.dumps(big).encode()
        chunks = iter([payload[:600], payload[600:]])
        chunked = c.post("/v1/features/online", content=chunks, headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        small = c.post(
            "/v1/features/online",
            json={"entities": [{"user_id": "u1"}], "features": ["user_orders:count_1h"]},
        )
        assert small.status_code == 200


def test_unknown_route_uses_the_error_shape(client: TestClient) -> None:
    response = client.get("/v1/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "NOT_FOUND"


# --- auth ---------------------------------------------------------------------------------------


def test_tokens_are_required_and_passed_to_the_service(shop: ServingProject) -> None:
    policy = TokenPolicy()
    svc = service(shop, access=policy)
    body = {"entities": [{"user_id": "u1"}], "features": ["user_orders:count_1h"]}
    with TestClient(build_app(ServingContext(svc, access=policy, catalog=DefinitionCatalog(shop)))) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic YWxpY2U6eA=="}):
            response = c.post("/v1/features/online", json=body, headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["error"]["code"] == "UNAUTHENTICATED"
            assert response.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/features").status_code == 401
        ok = c.post("/v1/features/online", json=body, headers={"Authorization": "Bearer alice-token"})
        assert ok.status_code == 200
        assert ok.json()["results"][0]["features"]["user_orders:count_1h"]["value"] == 2
        assert policy.seen == [("alice", "online")]
        card = {"entities": [{"user_id": "u1"}], "features": ["user_orders:last_card"]}
        denied = c.post("/v1/features/online", json=card, headers={"Authorization": "Bearer alice-token"})
        assert denied.status_code == 403
        assert denied.json()["error"] == {
            "code": "PERMISSION_DENIED",
            "message": "alice may not read 'user_orders:last_card'",
        }
        allowed = c.post("/v1/features/online", json=card, headers={"authorization": "bearer root-token"})
        assert allowed.json()["results"][0]["features"]["user_orders:last_card"]["value"] == "4111-u1"
        assert c.get("/healthz").status_code == 200  # health and metrics need no token
        assert c.get("/metrics").status_code == 200
    svc.close()


# --- as-of, push, catalog, and their absence ------------------------------------------------------


def test_as_of_rows_are_answered_at_their_timestamps(
    full: tuple[TestClient, ReplayAsOf, RecordingPusher],
) -> None:
    client, as_of, _ = full
    body = {
        "rows": [
            {"entity": {"user_id": "u2"}, "timestamp": "2026-11-27T10:03:00Z"},
            {"entity": {"user_id": "u2"}, "timestamp": "2026-11-27T11:10:00.250+01:00"},
        ],
        "features": ["user_orders:count_1h"],
        "as_of_arrival": True,
    }
    response = client.post("/v1/features/as-of", json=body)
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert first["timestamp"] == "2026-11-27T10:03:00Z"
    assert (
        first["features"]["user_orders:count_1h"]["value"],
        first["features"]["user_orders:count_1h"]["status"],
    ) == (2, "PRESENT")
    assert second["timestamp"] == "2026-11-27T10:10:00.250Z"
    assert second["features"]["user_orders:count_1h"]["value"] == 4
    assert as_of.calls == [
        ([({"user_id": "u2"}, T0 + 3 * MIN), ({"user_id": "u2"}, T0 + 10 * MIN + 250)], True, "anonymous")
    ]


def test_push_reencodes_json_events(full: tuple[TestClient, ReplayAsOf, RecordingPusher]) -> None:
    client, _, pusher = full
    events = [
        {"user_id": "u9", "shop_id": 1, "amount": 1.5, "country": "DE", "card": "c", "ts": T0},
        {"shop_id": 1},
    ]
    response = client.post("/v1/sources/orders/events", json={"events": events})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 1, "rejected": [{"index": 1, "reason": "missing field 'user_id'"}]}
    ((source, sent, who),) = pusher.calls
    assert (source, who) == ("orders", "anonymous")
    assert [json.loads(e) for e in sent] == events
    missing = client.post("/v1/sources/nope/events", json={"events": [{}]})
    assert missing.status_code == 404
    assert missing.json()["error"] == {"code": "NOT_FOUND", "message": "no source 'nope'"}


def test_catalog(full: tuple[TestClient, ReplayAsOf, RecordingPusher]) -> None:
    client, _, _ = full
    listed = client.get("/v1/features", params={"query": "shop"})
    assert listed.status_code == 200
    assert [f["name"] for f in listed.json()["features"]] == ["shop_orders:count_1h"]
    assert len(client.get("/v1/features").json()["features"]) == 6
    one = client.get("/v1/features/user_orders:count_1h")
    assert one.status_code == 200
    assert one.json()["aggregation"] == "count"
    missing = client.get("/v1/features/user_orders:nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "no feature 'user_orders:nope'"


def test_missing_parts_are_501(client: TestClient) -> None:
    as_of = {
        "rows": [{"entity": {"user_id": "u1"}, "timestamp": "2026-11-27T10:00:00Z"}],
        "features": ["user_orders"],
    }
    for method, path, body in [
        ("POST", "/v1/features/as-of", as_of),
        ("POST", "/v1/sources/orders/events", {"events": [{}]}),
        ("GET", "/v1/features", None),
        ("GET", "/v1/features/user_orders:count_1h", None),
    ]:
        response = client.request(method, path, json=body)
        assert response.status_code == 501, path
        assert response.json()["error"]["code"] == "UNIMPLEMENTED"


# --- operations ---------------------------------------------------------------------------------


def test_healthz_metrics_and_openapi(client: TestClient) -> None:
    health = client.get("/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "ok", "redis": "ok"})
    client.post("/v1/features/online", json={"entities": [{"user_id": "u1"}], "features": ["user_orders"]})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'featurestream_serving_seconds_bucket{le="0.0002",method="online"}' in metrics.text
    assert "featurestream_served_values_total" in metrics.text
    spec = client.get("/openapi.json").json()
    assert {
        "/v1/features/online",
        "/v1/features/as-of",
        "/v1/sources/{source}/events",
        "/v1/features",
        "/v1/features/{name}",
        "/healthz",
        "/metrics",
    } <= set(spec["paths"])
    assert "OnlineRequest" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_rows_to_json_formats_times() -> None:
    value = datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC)
    rows = ServedRows(
        ["v:last_ts", "v:n"],
        [],
        [
            ServedRow(
                {"id": "1"}, T0 + 1, [ServedValue(value, "PRESENT", T0), ServedValue(None, "MISSING", None)]
            )
        ],
    )
    assert rows_to_json(rows, with_timestamp=True) == {
        "results": [
            {
                "entity": {"id": "1"},
                "timestamp": "2026-11-27T10:00:00.001Z",
                "features": {
                    "v:last_ts": {
                        "value": "2026-11-27T10:00:00.123456Z",
                        "status": "PRESENT",
                        "event_time": "2026-11-27T10:00:00Z",
                    },
                    "v:n": {"value": None, "status": "MISSING", "event_time": None},
                },
            }
        ]
    }


def test_over_real_http_with_uvicorn(online: OnlineService) -> None:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(ServingContext(online)), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        entities = [{"user_id": "u1"}, {"user_id": "u2"}]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            response = http.post(
                "/v1/features/online", json={"entities": entities, "features": ["user_orders"]}
            )
            assert response.status_code == 200, response.text
            assert response.json()["results"] == expected(online.get_online(entities, ["user_orders"]))
            assert http.get("/healthz").json()["status"] == "ok"
            bad = http.post("/v1/features/online", json={"entities": entities, "features": ["nope"]})
            assert (bad.status_code, bad.json()["error"]["code"]) == (400, "INVALID_ARGUMENT")
            huge = http.post(
                "/v1/features/online", content=b" " * 5_000_000, headers={"content-type": "application/json"}
            )
            assert huge.status_code == 413
            assert http.get("/healthz").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_responses_encode_without_orjson(monkeypatch: pytest.MonkeyPatch, client: TestClient) -> None:
    from featurestream.serving import rest

    with_orjson = client.post(
        "/v1/features/online", json={"entities": [{"user_id": "u1"}], "features": ["user_orders"]}
    )
    monkeypatch.setattr(rest, "orjson", None)
    without = client.post(
        "/v1/features/online", json={"entities": [{"user_id": "u1"}], "features": ["user_orders"]}
    )
    assert without.status_code == 200
    assert without.json() == with_orjson.json()
