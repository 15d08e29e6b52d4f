"""Catalog and lineage over a definition, without a database."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from featurestream.definitions.models import ProjectDefinition
from featurestream.registry import lineage as lin
from featurestream.registry.catalog import (
    CatalogData,
    coverage,
    describe,
    list_entries,
    search,
    total_percent,
)
from featurestream.registry.records import ObjectNotFoundError, VersionInfo
from featurestream.registry.sample import sample_definition, sample_spec
from featurestream.registry.usage import UsageRow


@pytest.fixture
def data() -> CatalogData:
    return CatalogData(definition=sample_definition())


@pytest.fixture
def graph() -> lin.LineageGraph:
    return lin.build_graph(sample_definition())


def _ids(nodes: list[lin.Node]) -> set[str]:
    return {n.id for n in nodes}


# ---------------------------------------------------------------- lineage


def test_resolve_names_of_every_kind(graph: lin.LineageGraph) -> None:
    assert graph.resolve("transactions").kind == "source"
    assert graph.resolve("transactions.amount").kind == "field"
    assert graph.resolve("user").kind == "entity"
    assert graph.resolve("user_txn").kind == "view"
    assert graph.resolve("user_txn:amount_sum_1h").kind == "feature"
    assert graph.resolve("amount_sum_1h").id == "feature:user_txn:amount_sum_1h"  # unique bare feature name
    assert graph.resolve("fraud").kind == "service"
    assert graph.resolve("fraud_model").kind == "consumer"


def test_resolve_errors_are_helpful(graph: lin.LineageGraph) -> None:
    with pytest.raises(ObjectNotFoundError, match="did you mean user_txn"):
        graph.resolve("user_tx")
    with pytest.raises(ObjectNotFoundError, match="of kind entity"):
        graph.resolve("user_txn", "entity")
    ambiguous = sample_spec()
    ambiguous["entities"][0]["name"] = "user_txn"
    ambiguous["feature_views"][0]["entity"] = "user_txn"
    ambiguous_graph = lin.build_graph(ProjectDefinition.model_validate(ambiguous))
    with pytest.raises(lin.AmbiguousNameError, match="entity user_txn, view user_txn"):
        ambiguous_graph.resolve("user_txn")
    assert ambiguous_graph.resolve("user_txn", "view").kind == "view"


def test_impact_of_a_source_field(graph: lin.LineageGraph) -> None:
    affected = _ids(lin.impact(graph, graph.resolve("transactions.amount")))
    assert affected == {
        "feature:user_txn:amount_sum_1h", "feature:user_txn:amount_max_1d",
        "service:fraud", "consumer:fraud_model", "consumer:dashboard",
    }


def test_impact_of_a_filter_field_reaches_the_whole_view(graph: lin.LineageGraph) -> None:
    affected = _ids(lin.impact(graph, graph.resolve("transactions.country")))
    assert {"view:merchant_fr", "feature:merchant_fr:txn_count_15m", "feature:user_txn:last_country"} <= affected


def test_impact_of_a_source_and_entity(graph: lin.LineageGraph) -> None:
    from_source = _ids(lin.impact(graph, graph.resolve("transactions")))
    assert not any(i.startswith("field:") for i in from_source)
    assert {"view:user_txn", "view:merchant_fr", "service:fraud", "consumer:dashboard"} <= from_source
    from_entity = _ids(lin.impact(graph, graph.resolve("merchant")))
    assert from_entity == {"view:merchant_fr", "feature:merchant_fr:txn_count_15m", "service:fraud",
                           "consumer:fraud_model"}


def test_lineage_of_a_feature(graph: lin.LineageGraph) -> None:
    result = lin.lineage(graph, graph.resolve("user_txn:amount_sum_1h"))
    assert _ids(result.upstream) == {"source:transactions", "field:transactions.amount", "field:transactions.ts",
                                     "entity:user", "view:user_txn"}
    assert _ids(result.downstream) == {"service:fraud", "consumer:fraud_model", "consumer:dashboard"}
    assert ("view:user_txn", "feature:user_txn:amount_sum_1h") in result.edges
    assert ("feature:user_txn:txn_count_1h", "service:fraud") not in result.edges  # not through the root


def test_lineage_renderings(graph: lin.LineageGraph) -> None:
    result = lin.lineage(graph, graph.resolve("fraud"))
    mermaid = lin.to_mermaid(result)
    assert mermaid.startswith("flowchart LR\n") and '{{"service: fraud"}}' in mermaid and " --> " in mermaid
    dot = lin.to_dot(result)
    assert dot.startswith("digraph lineage {") and '"feature:user_txn:amount_sum_1h" -> "service:fraud";' in dot
    data = json.loads(json.dumps(lin.to_json(result)))
    assert data["root"]["id"] == "service:fraud" and {"from": "service:fraud", "to": "consumer:fraud_model"} in data[
        "edges"]
    text = lin.to_text(result)
    assert text.startswith("service fraud\nupstream:") and "consumer  fraud_model" in text


# ---------------------------------------------------------------- catalog


def test_list_filters(data: CatalogData) -> None:
    kinds = {e.kind for e in list_entries(data)}
    assert kinds == {"entity", "source", "view", "feature", "service", "consumer"}
    features = list_entries(data, {"feature"})
    assert len(features) == 5
    owned = list_entries(data, {"feature"}, owner="risk@example.com")
    assert [e.name for e in owned] == ["merchant_fr:txn_count_15m"]
    # a feature without an owner shows its view's
    assert {e.owner for e in features if e.name.startswith("user_txn:")} == {"fraud@example.com"}
    assert [e.name for e in list_entries(data, tag="velocity")] == ["user_txn:amount_sum_1h"]
    assert [e.detail for e in list_entries(data, {"feature"}) if e.name.endswith("amount_sum_1h")] == [
        "sum(amount) sliding 1h -> float64"]


def test_search_ranks_names_above_descriptions(data: CatalogData) -> None:
    hits = search(data, "amount")
    names = [e.name for e, _ in hits]
    assert names[0] == "transactions.amount"  # exact own name
    assert set(names[1:3]) == {"user_txn:amount_sum_1h", "user_txn:amount_max_1d"}
    assert all(score > 0 for _, score in hits)
    assert [e.name for e, _ in search(data, "payments")][:1] == ["transactions"]  # tag + description
    assert [e.name for e, _ in search(data, "risk")] == ["merchant_fr:txn_count_15m"]  # owner
    assert search(data, "amount nosuchword") == []  # every word must match
    assert search(data, "  ") == []


def test_docs_coverage(data: CatalogData) -> None:
    report = {v.view: v for v in coverage(data.definition)}
    user = report["user_txn"]
    assert (user.features, user.described, user.owned, user.exampled, user.documented) == (4, 3, 4, 2, 2)
    assert user.missing == {"amount_max_1d": ["example"], "last_country": ["description", "example"]}
    assert report["merchant_fr"].percent == 100.0
    assert total_percent(list(report.values())) == pytest.approx(60.0)


def test_describe_feature(data: CatalogData) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    v1 = sample_spec()["feature_views"][0]
    v1["features"][1]["window"] = "2h"
    spec1 = ProjectDefinition.model_validate({**sample_spec(), "feature_views": [v1]}).feature_views[0]
    versions = {"user_txn": [
        VersionInfo("user_txn", 1, "live", spec1.model_dump(mode="json"), 1, now, 1),
        VersionInfo("user_txn", 2, "live", data.definition.feature_views[0].model_dump(mode="json"), 2, now, 2),
    ]}
    usage = {("user_txn", "amount_sum_1h"): [UsageRow("user_txn", 2, "amount_sum_1h", "team-a", 5, now)]}
    result = describe(CatalogData(data.definition, versions, usage, 2), "user_txn:amount_sum_1h")
    assert result["kind"] == "feature" and result["owner"] == "fraud@example.com" and result["owner_inherited"]
    assert result["definition"] == {"aggregation": "sum", "field": "amount", "window": "sliding 1h",
                                    "tile": "1m", "dtype": "float64"}
    assert [v["definition"]["window"] for v in result["versions"]] == ["sliding 2h", "sliding 1h"]
    assert result["usage"]["total_reads"] == 5
    assert "consumer:dashboard" in result["lineage"]["downstream"]
    json.dumps(result)


def test_describe_usage_is_zero_until_serving_records_reads(data: CatalogData) -> None:
    result = describe(data, "user_txn:txn_count_1h")
    assert result["usage"] == {"total_reads": 0, "last_read_at": None, "by_client": []}


def test_describe_other_kinds(data: CatalogData) -> None:
    assert describe(data, "shop")["kind"] == "project"
    assert describe(data, "shop")["counts"]["feature_views"] == 2
    source = describe(data, "transactions")
    assert source["topic"] == "shop.transactions" and source["dead_letter_topic"] == "shop.transactions.dlq"
    field = describe(data, "transactions.ts")
    assert field["type"] == "timestamp" and field["event_time"]
    assert describe(data, "user")["join_keys"] == [{"name": "user_id", "type": "string"}]
    assert describe(data, "fraud_model")["consumer_kind"] == "model"
    view = describe(data, "merchant_fr")
    assert view["filter"] == [{"field": "country", "op": "eq", "value": "FR"}]
    assert view["features"][0]["window"] == "tumbling 15m"
    with pytest.raises(ObjectNotFoundError):
        describe(data, "user_txn@3")
