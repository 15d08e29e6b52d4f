"""Tokens, PII rules, the audit log and usage counts through OnlineService on real Redis and PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from featurestream.cli.app import app
from featurestream.registry.usage import feature_usage
from featurestream.serving.access import ANONYMOUS
from featurestream.serving.auth import TokenPolicy, close_policy, hash_token, hash_value, load_policy
from featurestream.serving.refs import ServingError
from featurestream.serving.service import OnlineService, ServedRows
from tests.integration.serving.conftest import MIN, T0, ServingProject

SALT = "integration-test-salt-0123456789"
TOKENS = {
    "risk-model": ("risk", ["read", "pii:personal"]),
    "growth-dash": ("growth", ["read", "pii:personal"]),
    "card-check": ("payments", ["read", "pii:personal", "pii:sensitive"]),
    "reader": ("analytics", ["read"]),
}


def token(name: str) -> str:
    return f"fst_integration-{name}-0000000000000000000000"


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump({
        "tokens": [{"name": n, "team": t, "scopes": s, "hash": hash_token(token(n))} for n, (t, s) in TOKENS.items()],
        "hash_personal": ["growth"],
        "salt": SALT,
        "audit_log": "audit/pii.jsonl",
        "usage_flush_seconds": 0.2,
    }))
    return path


@pytest.fixture
def policy(shop: ServingProject, tokens_file: Path) -> Iterator[TokenPolicy]:
    loaded = load_policy(tokens_file, registry=shop.registry, project=shop.name)
    assert isinstance(loaded, TokenPolicy)
    yield loaded
    close_policy(loaded)


@pytest.fixture
def svc(shop: ServingProject, policy: TokenPolicy) -> Iterator[OnlineService]:
    service = OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda: T0 + 10 * MIN, access=policy)
    yield service
    service.close()


def read(svc: OnlineService, name: str | None, features: list[str], users: tuple[str, ...] = ("u1",)) -> ServedRows:
    principal = svc.access.authenticate(token(name) if name else None)
    return svc.get_online([{"user_id": u} for u in users], features, principal=principal)


def values(rows: ServedRows) -> list[dict[str, Any]]:
    return [{n: v.value for n, v in zip(rows.feature_names, row.values, strict=True)} for row in rows.rows]


def audit_lines(tokens_file: Path) -> list[dict[str, Any]]:
    path = tokens_file.parent / "audit" / "pii.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_no_token_or_an_unknown_one_is_unauthenticated(svc: OnlineService) -> None:
    for presented in (None, "", "fst_not-a-known-token"):
        with pytest.raises(ServingError) as info:
            svc.access.authenticate(presented)
        assert info.value.code == "UNAUTHENTICATED"
    # A front end that forgot to authenticate gets nothing either.
    with pytest.raises(ServingError) as info:
        svc.get_online([{"user_id": "u1"}], ["user_orders:count_1h"])
    assert info.value.code == "UNAUTHENTICATED"
    assert svc.get_online([{"user_id": "u1"}], ["user_orders:count_1h"], principal=svc.access.authenticate(
        token("reader"))).rows[0].values[0].value == 2
    assert ANONYMOUS.name == "anonymous"


@pytest.mark.parametrize(("name", "features"), [
    ("reader", ["user_orders:last_card"]),
    ("risk-model", ["user_orders:last_card"]),
    ("growth-dash", ["user_orders"]),  # the whole view includes last_card
])
def test_sensitive_without_scope_is_denied(svc: OnlineService, tokens_file: Path, name: str, features: list[str]) -> None:
    with pytest.raises(ServingError) as info:
        read(svc, name, features)
    assert info.value.code == "PERMISSION_DENIED"
    assert "'user_orders:last_card'" in info.value.message and "pii:sensitive" in info.value.message
    assert audit_lines(tokens_file) == []  # nothing was read


def test_personal_without_scope_is_denied(svc: OnlineService) -> None:
    with pytest.raises(ServingError) as info:
        read(svc, "reader", ["user_orders:last_country"])
    assert info.value.code == "PERMISSION_DENIED"
    assert "'user_orders:last_country'" in info.value.message and "pii:personal" in info.value.message


def test_personal_values_hashed_for_a_hashing_team_and_raw_for_an_allowed_one(svc: OnlineService) -> None:
    features = ["user_orders:count_1h", "user_orders:last_country"]
    raw = values(read(svc, "risk-model", features, ("u1", "u2", "nobody")))
    hashed_rows = read(svc, "growth-dash", features, ("u1", "u2", "nobody"))
    hashed = values(hashed_rows)
    assert [r["user_orders:last_country"] for r in raw] == ["DE", "DE", None]
    assert [r["user_orders:last_country"] for r in hashed] == [hash_value(SALT.encode(), "DE")] * 2 + [None]
    assert [r["user_orders:count_1h"] for r in hashed] == [r["user_orders:count_1h"] for r in raw]
    assert [v.status for v in hashed_rows.rows[0].values] == ["PRESENT", "PRESENT"]
    # Sensitive values are never hashed: they are raw for a principal allowed to read them.
    assert values(read(svc, "card-check", ["user_orders:last_card"]))[0]["user_orders:last_card"] == "4111-u1"


def test_pii_reads_are_audited_with_who_what_when(svc: OnlineService, tokens_file: Path) -> None:
    before = datetime.now(UTC)
    read(svc, "risk-model", ["user_orders:count_1h"])  # no PII: no record
    read(svc, "card-check", ["user_orders"], ("u1", "u2"))
    read(svc, "growth-dash", ["user_orders:last_country"], ("u2",))
    lines = audit_lines(tokens_file)
    assert len(lines) == 2
    first, second = lines
    assert before <= datetime.fromisoformat(first["time"]) <= datetime.now(UTC)
    assert {k: first[k] for k in ("principal", "team", "method", "features", "hashed", "entities")} == {
        "principal": "card-check", "team": "payments", "method": "online",
        "features": {"user_orders:last_country": "personal", "user_orders:last_card": "sensitive"},
        "hashed": [], "entities": [{"user_id": "u1"}, {"user_id": "u2"}],
    }
    assert (second["principal"], second["team"], second["hashed"], second["entities"]) == (
        "growth-dash", "growth", ["user_orders:last_country"], [{"user_id": "u2"}])
    assert "DE" not in json.dumps(lines) and "4111" not in json.dumps(lines)  # no values in the log


def test_usage_counts_reach_the_registry_and_describe(shop: ServingProject, svc: OnlineService, policy: TokenPolicy) -> None:
    read(svc, "risk-model", ["user_orders:count_1h"], ("u1", "u2"))
    read(svc, "risk-model", ["user_orders:count_1h"])
    read(svc, "reader", ["user_orders:count_1h"])
    # The background thread flushes every 0.2 s: wait for it rather than calling flush.
    deadline = time.monotonic() + 10
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        with shop.registry.connection() as conn:
            rows = feature_usage(conn, shop.name).get(("user_orders", "count_1h"), [])
        counts = {r.client: r.reads for r in rows}
        if counts == {"risk-model": 3, "reader": 1}:
            break
        time.sleep(0.1)
    assert counts == {"risk-model": 3, "reader": 1}

    read(svc, "reader", ["user_orders:count_1h"])
    close_policy(policy)  # flushes what is left
    result = CliRunner().invoke(
        app, ["describe", "user_orders:count_1h", "--json", "--project", shop.name, "--postgres-url", shop.postgres_url]
    )
    assert result.exit_code == 0, result.output
    usage = json.loads(result.stdout)["usage"]
    assert usage["total_reads"] == 5
    assert {c["client"]: c["reads"] for c in usage["by_client"]} == {"risk-model": 3, "reader": 2}
    assert all(c["version"] == 1 and c["last_read_at"] for c in usage["by_client"])


def test_open_access_with_a_registry_counts_reads_as_anonymous(shop: ServingProject) -> None:
    open_policy = load_policy(None, registry=shop.registry, project=shop.name)
    service = OnlineService(lambda: shop.snapshot, shop.redis_url, clock_ms=lambda: T0 + 10 * MIN, access=open_policy)
    service.get_online([{"user_id": "u1"}], ["user_orders:last_country"])
    close_policy(open_policy)
    service.close()
    with shop.registry.connection() as conn:
        rows = feature_usage(conn, shop.name)[("user_orders", "last_country")]
    assert [(r.client, r.reads) for r in rows] == [("anonymous", 1)]
