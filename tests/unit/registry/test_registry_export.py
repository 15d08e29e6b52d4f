"""Exported YAML loads back to the same model, and reads like something a person wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from featurestream.definitions.export import export_definitions, export_documents
from featurestream.definitions.loader import load_project
from featurestream.definitions.models import ProjectDefinition
from featurestream.registry.sample import sample_definition, sample_spec

REPO_DEFINITIONS = Path(__file__).resolve().parents[3] / "definitions"


def test_round_trip_of_the_sample(tmp_path: Path) -> None:
    original = sample_definition()
    export_definitions(original, tmp_path)
    assert load_project(tmp_path) == original


def test_round_trip_with_every_kind_of_value(tmp_path: Path) -> None:
    spec = sample_spec()
    spec["project"]["tags"] = ["a", "yes", "2024-01-01"]  # strings YAML would otherwise retype
    spec["entities"][0]["join_keys"] = [{"name": "user_id"}, {"name": "account", "type": "int64"}]
    spec["sources"][0]["fields"] += [
        {"name": "account", "type": "int64", "min": 0, "max": 10_000_000},
        {"name": "channel", "type": "string", "required": False, "allowed": ["web", "app"]},
        {"name": "note", "type": "string", "max_length": 20, "description": "multi\nline\ntext", "pii": "sensitive"},
    ]
    spec["sources"][0]["dead_letter_topic"] = "shop.bad"
    spec["sources"][0]["event_time_format"] = "iso8601"
    view = spec["feature_views"][0]
    view["online_ttl"] = "3d"
    view["filter"] = [{"field": "channel", "op": "in", "value": ["web", "app"]},
                      {"field": "amount", "op": "gt", "value": 0}]
    view["features"] += [
        {"name": "hopping", "aggregation": "mean", "field": "amount", "window": {"type": "hopping", "size": "1h",
                                                                                  "hop": "5m"}, "max_age": "90s"},
        {"name": "as_float", "aggregation": "count", "dtype": "float64", "example": {"nested": [1, 2]}},
    ]
    original = ProjectDefinition.model_validate(spec)
    export_definitions(original, tmp_path)
    assert load_project(tmp_path) == original


@pytest.mark.skipif(not REPO_DEFINITIONS.is_dir(), reason="no definitions/ directory in this checkout")
def test_round_trip_of_the_repository_definitions(tmp_path: Path) -> None:
    original = load_project(REPO_DEFINITIONS)
    export_definitions(original, tmp_path)
    assert load_project(tmp_path) == original


def test_layout_is_clean(tmp_path: Path) -> None:
    written = export_definitions(sample_definition(), tmp_path, header="made by a test")
    assert [p.name for p in written] == ["project.yaml", "entities.yaml", "sources.yaml", "feature_views.yaml",
                                         "feature_services.yaml", "consumers.yaml"]
    views = (tmp_path / "feature_views.yaml").read_text()
    assert views.startswith("# made by a test\nfeature_views:\n- name: user_txn\n  entity: user\n")
    assert "window: 1h\n" in views and "window: {type: tumbling, size: 15m}" in views
    assert "- {field: country, value: FR}" in views  # op: eq is the default
    assert "pii: none" not in views and "dtype" not in views and "null" not in views  # defaults left out
    assert "\n\n- name: merchant_fr\n" in views  # a blank line between objects
    entities = (tmp_path / "entities.yaml").read_text()
    assert "join_keys: [user_id]" in entities
    sources = (tmp_path / "sources.yaml").read_text()
    assert "- {name: user_id, type: string}" in sources and "format: json" not in sources


def test_empty_sections_are_not_written() -> None:
    spec = sample_spec()
    spec["consumers"] = []
    assert "consumers.yaml" not in export_documents(ProjectDefinition.model_validate(spec))


def test_refuses_a_directory_with_yaml_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({"entities": []}))
    (tmp_path / "keep.txt").write_text("not yaml")
    with pytest.raises(FileExistsError, match=r"old\.yaml"):
        export_definitions(sample_definition(), tmp_path)
    export_definitions(sample_definition(), tmp_path, overwrite=True)
    assert not (tmp_path / "old.yaml").exists() and (tmp_path / "keep.txt").exists()
    assert load_project(tmp_path) == sample_definition()
