"""The diff and breaking-change rules, without a database."""

from __future__ import annotations

from typing import Any

import pytest

from featurestream.definitions.models import ProjectDefinition
from featurestream.registry.diff import (
    CurrentObject,
    Kind,
    Plan,
    compute_plan,
    desired_objects,
    diff_specs,
)
from featurestream.registry.sample import sample_spec


def _state(spec: dict[str, Any], version: int = 1, status: str = "live") -> dict[tuple[Kind, str], CurrentObject]:
    """The registry state right after applying ``spec``."""
    definition = ProjectDefinition.model_validate(spec)
    return {
        key: CurrentObject(key[0], key[1], version, status, obj_spec, upstream)  # type: ignore[arg-type]
        for key, (obj_spec, upstream) in desired_objects(definition).items()
    }


def _plan(old: dict[str, Any], new: dict[str, Any]) -> Plan:
    return compute_plan("shop", _state(old), ProjectDefinition.model_validate(new))


def _view_change(plan: Plan, name: str = "user_txn") -> Any:
    return next(c for c in plan.changes if c.kind == "feature_view" and c.name == name)


def _features(spec: dict[str, Any], view: int = 0) -> list[dict[str, Any]]:
    features: list[dict[str, Any]] = spec["feature_views"][view]["features"]
    return features


def test_first_plan_adds_everything_at_version_1() -> None:
    plan = compute_plan("shop", {}, ProjectDefinition.model_validate(sample_spec()))
    assert {(c.kind, c.name) for c in plan.changes} >= {("project", "shop"), ("feature_view", "user_txn")}
    assert all(c.action == "add" and c.new_version == 1 and not c.breaking for c in plan.changes)
    assert plan.summary()["new_view_versions"] == 2


def test_same_definition_plans_nothing() -> None:
    assert _plan(sample_spec(), sample_spec()).is_empty


def test_explicit_default_value_is_not_a_change() -> None:
    new = sample_spec()
    new["sources"][0]["format"] = "json"
    _features(new)[0]["pii"] = "none"
    assert _plan(sample_spec(), new).is_empty


@pytest.mark.parametrize(
    ("edit", "path"),
    [
        (lambda f: f[1].update(window="2h"), "features[amount_sum_1h].window"),
        (lambda f: f[1].update(aggregation="mean"), "features[amount_sum_1h].aggregation"),
        (lambda f: f[2].update(field="amount", aggregation="min"), "features[amount_max_1d].aggregation"),
        (lambda f: f[1].update(dtype="float64"), "features[amount_sum_1h].dtype"),
        (lambda f: f[0].update(window={"type": "tumbling", "size": "1h"}), "features[txn_count_1h].window"),
        (lambda f: f.pop(3), "features[last_country]"),
    ],
)
def test_breaking_feature_changes_create_a_new_view_version(edit: Any, path: str) -> None:
    new = sample_spec()
    edit(_features(new))
    change = _view_change(_plan(sample_spec(), new))
    assert change.action == "change" and change.breaking
    assert (change.old_version, change.new_version) == (1, 2) and change.creates_version
    assert any(f.path == path and f.breaking for f in change.fields)


@pytest.mark.parametrize(
    ("edit", "path"),
    [
        (lambda v: v.update(source="other"), "source"),
        (lambda v: v.update(entity="merchant"), "entity"),
        (lambda v: v.update(filter=[{"field": "country", "value": "DE"}]), "filter"),
    ],
)
def test_breaking_view_changes(edit: Any, path: str) -> None:
    old = sample_spec()
    old["sources"].append({**old["sources"][0], "name": "other", "topic": "other"})
    new = sample_spec()
    new["sources"].append({**new["sources"][0], "name": "other", "topic": "other"})
    edit(new["feature_views"][0])
    change = _view_change(_plan(old, new))
    assert change.breaking and change.new_version == 2
    assert [f.path for f in change.fields if f.breaking] == [path]


@pytest.mark.parametrize(
    "edit",
    [
        lambda v: v.update(description="new words"),
        lambda v: v.update(owner="someone@example.com", tags=["a", "b"]),
        lambda v: v.update(online_ttl="3d"),
        lambda v: v["features"][0].update(description="d", owner="o", tags=["t"], example=9, pii="sensitive"),
        lambda v: v["features"][1].update(max_age="2h"),
        lambda v: v["features"].append({"name": "amount_mean_1h", "aggregation": "mean", "field": "amount",
                                        "window": "1h"}),
    ],
)
def test_non_breaking_changes_update_in_place(edit: Any) -> None:
    new = sample_spec()
    edit(new["feature_views"][0])
    change = _view_change(_plan(sample_spec(), new))
    assert change.action == "change" and not change.breaking
    assert change.old_version == change.new_version == 1 and not change.creates_version
    assert change.fields and not any(f.breaking for f in change.fields)


def test_field_level_diff_names_the_feature_and_values() -> None:
    new = sample_spec()
    _features(new)[1]["window"] = "2h"
    _features(new)[1]["description"] = "EUR spent in the last two hours."
    change = _view_change(_plan(sample_spec(), new))
    by_path = {f.path: f for f in change.fields}
    assert by_path["features[amount_sum_1h].window"].old == {"type": "sliding", "duration": "1h"}
    assert by_path["features[amount_sum_1h].window"].new == {"type": "sliding", "duration": "2h"}
    assert not by_path["features[amount_sum_1h].description"].breaking


def test_added_feature_is_reported_with_its_spec() -> None:
    new = sample_spec()
    _features(new).append({"name": "amount_mean_1h", "aggregation": "mean", "field": "amount", "window": "1h"})
    (added,) = _view_change(_plan(sample_spec(), new)).fields
    assert added.path == "features[amount_mean_1h]" and added.old is None and added.new["aggregation"] == "mean"


def test_reordering_features_is_a_non_breaking_change() -> None:
    new = sample_spec()
    _features(new).reverse()
    (change,) = _view_change(_plan(sample_spec(), new)).fields
    assert change.path == "features" and not change.breaking


def test_upstream_type_change_is_breaking_for_views_that_read_the_field() -> None:
    old, new = sample_spec(), sample_spec()
    for spec in (old, new):
        spec["sources"][0]["fields"].append({"name": "quantity", "type": "int64"})
        spec["feature_views"][1]["features"].append(
            {"name": "quantity_sum", "aggregation": "sum", "field": "quantity"})
    new["sources"][0]["fields"][-1]["type"] = "float64"
    plan = _plan(old, new)
    source = next(c for c in plan.changes if c.kind == "source")
    assert source.breaking and source.new_version == 1  # sources are updated in place
    merchant = _view_change(plan, "merchant_fr")
    assert merchant.breaking and merchant.new_version == 2
    assert [f.path for f in merchant.fields] == ["upstream.input_types.quantity"]
    assert all(c.name != "user_txn" for c in plan.changes)  # user_txn does not read it


def test_join_key_type_change_is_breaking_for_the_entitys_views() -> None:
    old, new = sample_spec(), sample_spec()
    for spec in (old, new):
        spec["sources"][0]["fields"].append({"name": "merchant_no", "type": "int64"})
    new["entities"][1]["join_keys"] = [{"name": "merchant_no", "type": "int64"}]
    plan = _plan(old, new)
    assert next(c for c in plan.changes if c.kind == "entity").breaking
    merchant = _view_change(plan, "merchant_fr")
    assert merchant.breaking and [f.path for f in merchant.fields] == ["upstream.join_keys"]


def test_removed_objects_are_marked_removed_and_breaking() -> None:
    new = sample_spec()
    del new["feature_views"][1]
    new["feature_services"][0]["features"] = ["user_txn"]
    plan = _plan(sample_spec(), new)
    removed = _view_change(plan, "merchant_fr")
    assert removed.action == "remove" and removed.breaking and removed.old_version == 1
    service = next(c for c in plan.changes if c.kind == "feature_service")
    assert service.breaking  # a reference was removed


def test_consumer_changes_are_never_breaking() -> None:
    new = sample_spec()
    new["consumers"][0]["feature_services"] = []
    del new["consumers"][1]
    plan = _plan(sample_spec(), new)
    assert [c.kind for c in plan.changes] == ["consumer", "consumer"]
    assert not any(c.breaking for c in plan.changes)


def test_readding_a_removed_view_gives_a_fresh_version() -> None:
    state = _state(sample_spec())
    state["feature_view", "user_txn"] = CurrentObject(
        "feature_view", "user_txn", 3, "removed", state["feature_view", "user_txn"].spec,
        state["feature_view", "user_txn"].upstream,
    )
    state["consumer", "dashboard"] = CurrentObject("consumer", "dashboard", 1, "removed",
                                                   state["consumer", "dashboard"].spec)
    plan = compute_plan("shop", state, ProjectDefinition.model_validate(sample_spec()))
    view = _view_change(plan)
    assert view.action == "add" and view.readded and (view.old_version, view.new_version) == (3, 4)
    consumer = next(c for c in plan.changes if c.kind == "consumer")
    assert consumer.readded and consumer.new_version == 1 and not consumer.creates_version


def test_service_gaining_a_reference_is_not_breaking() -> None:
    old = {"name": "s", "features": ["a"]}
    (change,) = diff_specs("feature_service", old, {"name": "s", "features": ["a", "b"]})
    assert not change.breaking
    (change,) = diff_specs("feature_service", old, {"name": "s", "features": ["b"]})
    assert change.breaking


def test_source_rules() -> None:
    spec = sample_spec()["sources"][0]
    fields = [dict(f) for f in spec["fields"]]
    fields[2]["description"] = "changed"
    fields.append({"name": "extra", "type": "string"})
    changes = diff_specs("source", spec, {**spec, "fields": fields, "topic": "renamed"})
    assert {c.path: c.breaking for c in changes} == {
        "topic": False, "fields[amount].description": False, "fields[extra]": False,
    }
    changes = diff_specs("source", spec, {**spec, "fields": spec["fields"][:-1], "event_time_field": "x"})
    assert {c.path: c.breaking for c in changes} == {"event_time_field": True, "fields[ts]": True}


def test_plan_json_is_serialisable() -> None:
    import json

    new = sample_spec()
    _features(new)[1]["window"] = "2h"
    data = json.loads(json.dumps(_plan(sample_spec(), new).to_json()))
    (change,) = data["changes"]
    assert change["new_view_version"] and change["changes"][0]["breaking"]
    assert data["summary"] == {"add": 0, "change": 1, "remove": 0, "breaking": 1, "new_view_versions": 1}
