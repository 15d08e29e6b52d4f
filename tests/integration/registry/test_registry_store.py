"""The registry against a real PostgreSQL: versions, diffs, retire, removal, concurrency, projects."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from featurestream.definitions.export import export_definitions
from featurestream.definitions.loader import load_project
from featurestream.definitions.models import ProjectDefinition
from featurestream.registry import Registry
from featurestream.registry.records import (
    InvalidDefinitionError,
    ObjectNotFoundError,
    ProjectNotFoundError,
    RetireError,
)
from featurestream.registry.sample import sample_definition, sample_spec
from featurestream.registry.schema import CURRENT_VERSION, SCHEMA, ensure_schema
from featurestream.registry.usage import UsageIncrement, record_feature_usage


@pytest.fixture
def registry(fresh_pg_url: str) -> Registry:
    return Registry(fresh_pg_url)


def _definition(edit: Any = None, project: str = "shop") -> ProjectDefinition:
    spec = sample_spec(project)
    if edit is not None:
        edit(spec)
    return ProjectDefinition.model_validate(spec)


def _breaking(spec: dict[str, Any]) -> None:
    spec["feature_views"][0]["features"][1]["window"] = "2h"


def _cosmetic(spec: dict[str, Any]) -> None:
    spec["feature_views"][0]["description"] = "Spending of a user, documented better."


def _both(spec: dict[str, Any]) -> None:
    _breaking(spec)
    _cosmetic(spec)


def _breaking_and_entity_owner(spec: dict[str, Any]) -> None:
    _breaking(spec)
    spec["entities"][0]["owner"] = "x"


def _rows(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def _count(url: str, table: str) -> int:
    return int(_rows(url, f"select count(*) from {SCHEMA}.{table}")[0][0])


# ---------------------------------------------------------------- versions


def test_first_apply_stores_version_1_of_everything(registry: Registry) -> None:
    result = registry.apply(sample_definition(), actor="ana", message="first")
    assert result.applied and result.registry_version == 1
    snapshot = registry.snapshot("shop")
    assert snapshot.registry_version == 1 and snapshot.definition == sample_definition()
    assert [v.key for v in snapshot.views] == ["merchant_fr@1", "user_txn@1"]
    assert snapshot.view("user_txn").spec == sample_definition().feature_view("user_txn")
    assert [v.key for v in registry.live_views("shop")] == ["merchant_fr@1", "user_txn@1"]
    assert registry.load_project("shop") == sample_definition()
    (record,) = registry.history("shop", "user_txn")
    assert (record.action, record.version, record.actor, record.message) == ("add", 1, "ana", "first")


def test_reapplying_the_same_definitions_is_a_no_op(registry: Registry, fresh_pg_url: str) -> None:
    registry.apply(sample_definition())
    changes = _count(fresh_pg_url, "changes")
    again = registry.apply(sample_definition())
    assert not again.applied and again.plan.is_empty and again.registry_version == 1
    assert _count(fresh_pg_url, "changes") == changes and _count(fresh_pg_url, "applies") == 1


def test_plan_changes_nothing(registry: Registry, fresh_pg_url: str) -> None:
    plan = registry.plan(sample_definition())
    assert len(plan.changes) == 9
    assert registry.projects() == [] and _count(fresh_pg_url, "objects") == 0
    registry.apply(sample_definition())
    assert registry.plan(_definition(_breaking)).breaking
    assert registry.registry_version("shop") == 1


def test_non_breaking_change_updates_the_current_version_in_place(registry: Registry) -> None:
    registry.apply(sample_definition())
    result = registry.apply(_definition(_cosmetic))
    assert result.applied and result.registry_version == 2
    assert [v.key for v in registry.live_views("shop")] == ["merchant_fr@1", "user_txn@1"]
    assert registry.view("shop", "user_txn").spec.description.endswith("better.")
    history = registry.history("shop", "user_txn")
    assert [(r.action, r.version, r.registry_version) for r in history] == [("add", 1, 1), ("change", 1, 2)]
    (change,) = history[1].changes
    assert change.path == "description" and not change.breaking and change.old == "Spending of a user."


def test_breaking_change_creates_a_second_live_version(registry: Registry) -> None:
    registry.apply(sample_definition())
    result = registry.apply(_definition(_breaking))
    (change,) = result.plan.changes
    assert change.breaking and (change.old_version, change.new_version) == (1, 2)
    live = registry.live_views("shop")
    assert [v.key for v in live] == ["merchant_fr@1", "user_txn@1", "user_txn@2"]
    old, new = registry.view("shop", "user_txn@1"), registry.view("shop", "user_txn")
    assert (old.version, new.version) == (1, 2) and old.status == new.status == "live"
    assert str(old.spec.features[1].window.span) == "1:00:00"  # type: ignore[union-attr]
    assert str(new.spec.features[1].window.span) == "2:00:00"  # type: ignore[union-attr]
    assert registry.snapshot("shop").view("user_txn@1").version == 1
    history = registry.history("shop", "user_txn")
    assert [(r.action, r.version, r.breaking) for r in history] == [("add", 1, False), ("new_version", 2, True)]
    assert history[1].changes[0].path == "features[amount_sum_1h].window"


def test_non_breaking_change_after_a_new_version_touches_only_the_latest(registry: Registry) -> None:
    registry.apply(sample_definition())
    registry.apply(_definition(_breaking))
    registry.apply(_definition(_both))
    assert registry.view("shop", "user_txn@1").spec.description == "Spending of a user."
    assert registry.view("shop", "user_txn@2").spec.description.endswith("better.")


def test_retire_an_old_version(registry: Registry) -> None:
    registry.apply(sample_definition())
    registry.apply(_definition(_breaking))
    with pytest.raises(RetireError, match="current version"):
        registry.retire("shop", "user_txn", 2)
    with pytest.raises(RetireError, match="no version 7"):
        registry.retire("shop", "user_txn", 7)
    with pytest.raises(ObjectNotFoundError):
        registry.retire("shop", "nope", 1)
    with pytest.raises(ProjectNotFoundError):
        registry.retire("nope", "user_txn", 1)
    assert registry.retire("shop", "user_txn", 1, actor="ana") == 3
    assert [v.key for v in registry.live_views("shop")] == ["merchant_fr@1", "user_txn@2"]
    assert registry.view("shop", "user_txn@1").status == "retired"  # still readable by version
    with pytest.raises(ObjectNotFoundError):
        registry.snapshot("shop").view("user_txn@1")  # but no longer live
    with pytest.raises(RetireError, match="already retired"):
        registry.retire("shop", "user_txn", 1)
    assert [r.action for r in registry.history("shop", "user_txn")] == ["add", "new_version", "retire"]
    assert registry.apply(_definition(_breaking)).plan.is_empty


def test_removing_and_readding_a_view(registry: Registry) -> None:
    registry.apply(sample_definition())

    def without_merchant(spec: dict[str, Any]) -> None:
        del spec["feature_views"][1]
        spec["feature_services"][0]["features"] = ["user_txn"]

    result = registry.apply(_definition(without_merchant))
    assert {(c.kind, c.name, c.action) for c in result.plan.changes} == {
        ("feature_view", "merchant_fr", "remove"), ("feature_service", "fraud", "change")}
    assert [v.key for v in registry.live_views("shop")] == ["user_txn@1"]
    assert registry.view("shop", "merchant_fr@1").status == "removed"
    assert registry.snapshot("shop").definition.feature_view("merchant_fr") is None
    result = registry.apply(sample_definition())
    readd = next(c for c in result.plan.changes if c.name == "merchant_fr")
    assert readd.readded and readd.new_version == 2
    assert [v.key for v in registry.live_views("shop")] == ["merchant_fr@2", "user_txn@1"]
    assert [r.action for r in registry.history("shop", "merchant_fr")] == ["add", "remove", "readd"]


def test_history_of_other_kinds(registry: Registry) -> None:
    registry.apply(sample_definition())
    registry.apply(_definition(lambda s: s["sources"][0].update(topic="shop.payments")))
    records = registry.history("shop", "transactions", "source")
    assert [(r.action, r.version) for r in records] == [("add", 1), ("change", 1)]
    assert records[1].changes[0].to_json() == {"path": "topic", "old": "shop.transactions",
                                               "new": "shop.payments", "breaking": False}
    assert registry.history("shop", "transactions", "entity") == []


def test_invalid_definitions_are_refused(registry: Registry) -> None:
    bad = _definition(lambda s: s["feature_views"][0].update(entity="nobody"))
    with pytest.raises(InvalidDefinitionError, match="no entity named 'nobody'"):
        registry.apply(bad)
    assert registry.projects() == []


def test_an_apply_that_fails_midway_writes_nothing(registry: Registry, fresh_pg_url: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    registry.apply(sample_definition())
    calls = {"n": 0}
    original = Registry._write

    def failing(self: Registry, *args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        original(self, *args)

    monkeypatch.setattr(Registry, "_write", failing)
    with pytest.raises(RuntimeError, match="boom"):
        registry.apply(_definition(_breaking_and_entity_owner))
    assert registry.registry_version("shop") == 1
    assert _count(fresh_pg_url, "applies") == 1
    assert [v.key for v in registry.live_views("shop")] == ["merchant_fr@1", "user_txn@1"]


# ---------------------------------------------------------------- projects, schema, usage


def test_projects_share_one_database(registry: Registry) -> None:
    registry.apply(sample_definition("shop"))
    registry.apply(_definition(_breaking, project="bank"))
    registry.apply(_definition(_breaking, project="bank"))  # no-op
    registry.apply(_definition(project="bank"))  # back to 1h: breaking again in bank only
    assert registry.projects() == ["bank", "shop"]
    assert [v.key for v in registry.live_views("shop")] == ["merchant_fr@1", "user_txn@1"]
    assert [v.key for v in registry.live_views("bank")] == ["merchant_fr@1", "user_txn@1", "user_txn@2"]
    assert (registry.registry_version("shop"), registry.registry_version("bank")) == (1, 2)
    with pytest.raises(ProjectNotFoundError):
        registry.snapshot("nope")


def test_schema_is_created_once_and_versioned(fresh_pg_url: str) -> None:
    errors: list[BaseException] = []

    def first_use() -> None:
        try:
            Registry(fresh_pg_url).projects()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _rows(fresh_pg_url, f"select version from {SCHEMA}.schema_version") == [(CURRENT_VERSION,)]
    with psycopg.connect(fresh_pg_url) as conn:
        assert ensure_schema(conn) == CURRENT_VERSION


def test_a_pool_can_back_the_registry(fresh_pg_url: str) -> None:
    with ConnectionPool(fresh_pg_url, min_size=1, max_size=2, open=True) as pool:
        registry = Registry(pool=pool)
        registry.apply(sample_definition())
        assert [v.key for v in registry.live_views("shop")] == ["merchant_fr@1", "user_txn@1"]


def test_usage_counts_show_in_the_catalog(registry: Registry) -> None:
    registry.apply(sample_definition())
    assert registry.catalog_data("shop").usage == {}
    at = datetime(2026, 1, 1, tzinfo=UTC)
    with registry.connection() as conn:
        record_feature_usage(conn, [
            UsageIncrement("shop", "user_txn", 1, "amount_sum_1h", "team-a", 3, at),
            UsageIncrement("shop", "user_txn", 1, "amount_sum_1h", "team-a", 2, at.replace(hour=5)),
            UsageIncrement("shop", "user_txn", 1, "amount_sum_1h", "team-b", 1, at),
        ])
    data = registry.catalog_data("shop")
    rows = data.usage["user_txn", "amount_sum_1h"]
    assert [(r.client, r.reads, r.last_read_at) for r in rows] == [
        ("team-a", 5, at.replace(hour=5)), ("team-b", 1, at)]
    assert data.registry_version == 1 and set(data.versions) == {"user_txn", "merchant_fr"}


def test_export_round_trip_through_the_registry(registry: Registry, tmp_path: Path) -> None:
    source = tmp_path / "src"
    export_definitions(_definition(_cosmetic), source)
    original = load_project(source)
    registry.apply(original)
    exported = tmp_path / "exported"
    export_definitions(registry.snapshot("shop").definition, exported)
    reloaded = load_project(exported)
    assert reloaded == original
    assert registry.plan(reloaded).is_empty


# ---------------------------------------------------------------- concurrency

VARIANTS = [None, _cosmetic, _breaking, _both,
            lambda s: s["feature_views"][1]["features"][0].update(window={"type": "tumbling", "size": "30m"})]


def _apply_many(url: str, worker: int, rounds: int) -> None:
    registry = Registry(url)
    for i in range(rounds):
        registry.apply(_definition(VARIANTS[(worker + i) % len(VARIANTS)]), actor=f"worker-{worker}")


def _check_consistent(url: str) -> None:
    head = _rows(url, f"select registry_version from {SCHEMA}.projects where project = 'shop'")[0][0]
    versions = [r[0] for r in _rows(url, f"select registry_version from {SCHEMA}.applies "
                                         "where project = 'shop' order by 1")]
    assert versions == list(range(1, head + 1)), "registry versions must be contiguous"
    for kind, name, revisions in _rows(
        url, f"select kind, name, array_agg(revision order by revision) from {SCHEMA}.changes "
             "group by kind, name"):
        assert revisions == list(range(1, len(revisions) + 1)), f"revisions of {kind} {name}"
    for name, view_versions in _rows(
        url, f"select name, array_agg(version order by version) from {SCHEMA}.objects "
             "where kind = 'feature_view' group by name"):
        assert view_versions == list(range(1, len(view_versions) + 1)), f"versions of {name}"
    new_versions = _rows(url, f"select name, array_agg(version order by version) from {SCHEMA}.changes "
                              "where action in ('add', 'new_version', 'readd') and kind = 'feature_view' "
                              "group by name")
    for name, created in new_versions:
        assert created == sorted(set(created)), f"a version of {name} was created twice"
    last = _rows(url, f"select definition from {SCHEMA}.applies where project = 'shop' "
                      "and operation = 'apply' order by registry_version desc limit 1")[0][0]
    current = ProjectDefinition.model_validate(last)
    assert Registry(url).load_project("shop") == current
    assert Registry(url).plan(current).is_empty


def test_concurrent_applies_in_threads_keep_the_registry_consistent(fresh_pg_url: str) -> None:
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            _apply_many(fresh_pg_url, worker, 6)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _check_consistent(fresh_pg_url)
    assert registry_has_several_versions(fresh_pg_url)


def registry_has_several_versions(url: str) -> bool:
    rows = _rows(url, f"select max(version) from {SCHEMA}.objects where name = 'user_txn'")
    return bool(rows[0][0] > 1)


def test_concurrent_applies_in_processes_keep_the_registry_consistent(fresh_pg_url: str) -> None:
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_apply_many, args=(fresh_pg_url, w, 4)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    _check_consistent(fresh_pg_url)


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = threading.active_count()
    yield
    assert threading.active_count() <= before
