"""Loading project directories: the demo project, and every refusal path with file, line and field."""

from __future__ import annotations

import json
import shutil
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from featurestream.definitions.errors import DefinitionError, Problem
from featurestream.definitions.loader import load_project
from featurestream.definitions.models import HoppingWindow, SlidingWindow, TumblingWindow
from featurestream.definitions.yaml_source import MAX_NODES

DEMO = Path(__file__).resolve().parents[3] / "definitions"

BASE = """
project:
  name: shop
entities:
  - name: user
    join_keys: [user_id]
sources:
  - name: orders
    topic: orders
    event_time_field: ts
    fields:
      - {name: user_id, type: string}
      - {name: amount, type: float64, min: 0}
      - {name: shop, type: string}
      - {name: paid, type: bool}
      - {name: ts, type: timestamp}
"""


def write(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def problems_of(directory: Path) -> list[Problem]:
    with pytest.raises(DefinitionError) as info:
        load_project(directory)
    return info.value.problems


def view(features: str, extra: str = "") -> str:
    return (
        "feature_views:\n  - name: v\n    entity: user\n    source: orders\n"
        + textwrap.indent(textwrap.dedent(extra), "    ")
        + "    features:\n"
        + textwrap.indent(textwrap.dedent(features), "      ")
    )


def test_demo_project_loads_with_the_required_features() -> None:
    definition = load_project(DEMO)
    view = definition.feature_view("user_transactions")
    assert view is not None
    assert [f.name for f in view.features] == [
        "txn_count_1h",
        "txn_amount_sum_1h",
        "txn_amount_mean_1h",
        "txn_amount_max_24h",
        "distinct_merchants_24h",
        "last_country",
    ]
    by_name = {f.name: f for f in view.features}
    assert by_name["txn_count_1h"].window == SlidingWindow(duration=timedelta(hours=1))
    assert by_name["txn_amount_max_24h"].aggregation == "max"
    assert by_name["last_country"].window is None
    source = definition.source("transactions")
    assert source is not None and source.topic == "transactions"
    amount = source.field("amount")
    assert amount is not None and amount.min == 0
    assert any(len(v.features) >= 50 for v in definition.feature_views)


def test_window_forms(tmp_path: Path) -> None:
    features = """
    - {name: a, aggregation: count, window: 30m}
    - {name: b, aggregation: sum, field: amount, window: {type: tumbling, size: 1h}}
    - {name: c, aggregation: mean, field: amount, window: {type: hopping, size: 1h, hop: 15m}}
    - {name: d, aggregation: last, field: shop}
    """
    definition = load_project(write(tmp_path, **{"p.yaml": BASE + view(features)}))
    windows = [f.window for f in definition.feature_views[0].features]
    assert windows == [
        SlidingWindow(duration=timedelta(minutes=30)),
        TumblingWindow(size=timedelta(hours=1)),
        HoppingWindow(size=timedelta(hours=1), hop=timedelta(minutes=15)),
        None,
    ]


def test_unknown_key_names_file_line_and_field(tmp_path: Path) -> None:
    features = """
    - name: a
      aggregation: count
      colour: red
    """
    [problem] = problems_of(write(tmp_path, **{"p.yaml": BASE + view(features)}))
    assert problem.file.endswith("p.yaml")
    assert problem.field == "feature_views[v].features[a].colour"
    assert problem.message == "unknown key"
    assert (tmp_path / "p.yaml").read_text().splitlines()[problem.line - 1].strip() == "colour: red"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    features = """
    - {name: a, aggregation: sum, field: shop, window: 1h}
    - {name: b, aggregation: mean, field: nope, window: 1h}
    - {name: c, aggregation: median, field: amount}
    - {name: d, aggregation: count, window: 90s}
    - {name: e, aggregation: count, dtype: string}
    """
    problems = problems_of(write(tmp_path, **{"p.yaml": BASE + view(features)}))
    by_field = {p.field: p.message for p in problems}
    assert "sum cannot take string field 'shop'" in by_field["feature_views[v].features[a].field"]
    assert "has no field 'nope'" in by_field["feature_views[v].features[b].field"]
    assert "'count', 'sum'" in by_field["feature_views[v].features[c].aggregation"]
    assert "whole number of them" in by_field["feature_views[v].features[d].window"]
    assert "gives int64, not string" in by_field["feature_views[v].features[e].dtype"]
    assert len(problems) == 5


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ("0s", "at least 1m"),
        ("100d", "longest supported window is 90d"),
        ("61m", "whole number of them"),
        ("{type: hopping, size: 1h, hop: 7m}", "whole multiple of hop"),
        ("{type: hopping, size: 2d, hop: 1m}", "at most 1440"),
        ("{type: tumbling, size: 30s}", "whole number of minutes"),
        ("{type: rolling, size: 1h}", "window type must be sliding, tumbling or hopping"),
        ("soon", "expected a duration"),
        ("3600", "expected a duration with a unit"),
        ("1:00:00", "expected a duration with a unit"),
        ("99999999999d", "longer than the longest duration"),
        (".inf", "expected a duration"),
    ],
)
def test_windows_that_cannot_be_computed(tmp_path: Path, window: str, expected: str) -> None:
    features = f"- {{name: a, aggregation: count, window: {window}}}\n"
    [problem] = problems_of(write(tmp_path, **{"p.yaml": BASE + view(features)}))
    assert problem.field.startswith("feature_views[v].features[a].window")
    assert expected in problem.message


def test_dangling_references_and_join_key_types(tmp_path: Path) -> None:
    text = BASE.replace("join_keys: [user_id]", "join_keys: [{name: user_id, type: int64}]") + """
feature_views:
  - name: v
    entity: user
    source: orders
    features: [{name: a, aggregation: count}]
  - name: w
    entity: ghost
    source: nowhere
    features: [{name: a, aggregation: count}]
feature_services:
  - name: s
    features: [v:a, v:zz, missing]
consumers:
  - name: m
    feature_services: [s, nope]
    features: [w]
"""
    problems = problems_of(write(tmp_path, **{"p.yaml": text}))
    messages = {(p.field, p.message) for p in problems}
    assert ("feature_views[v].entity", "join key 'user_id' is int64 but source field 'user_id' is string") in messages
    assert ("feature_views[w].entity", "no entity named 'ghost'") in messages
    assert ("feature_views[w].source", "no source named 'nowhere'") in messages
    assert ("feature_services[s].features[1]", "feature view 'v' has no feature 'zz'") in messages
    assert ("feature_services[s].features[2]", "no feature view named 'missing'") in messages
    assert ("consumers[m].feature_services[1]", "no feature service named 'nope'") in messages


def test_duplicates_across_files_name_both(tmp_path: Path) -> None:
    extra = "entities:\n  - name: user\n    join_keys: [user_id]\n"
    problems = problems_of(write(tmp_path, **{"a.yaml": BASE, "b.yaml": extra}))
    [problem] = problems
    assert problem.file.endswith("b.yaml")
    assert "duplicate name 'user'" in problem.message


def test_duplicate_features_and_fields(tmp_path: Path) -> None:
    text = BASE.replace("      - {name: paid, type: bool}", "      - {name: paid, type: bool}\n      - {name: paid, type: string}")
    features = "- {name: a, aggregation: count}\n- {name: a, aggregation: count, window: 1h}\n"
    problems = problems_of(write(tmp_path, **{"p.yaml": text + view(features)}))
    messages = sorted(p.message for p in problems)
    assert messages == ["duplicate feature 'a'", "duplicate field 'paid'"]


def test_filter_checks_fields_and_value_types(tmp_path: Path) -> None:
    extra = """
    filter:
      - {field: amount, op: gt, value: "ten"}
      - {field: shop, op: in, value: [a, b]}
      - {field: nope, value: 1}
      - {field: paid, op: lt, value: true}
      - {field: shop, op: in, value: notalist}
    """
    problems = problems_of(write(tmp_path, **{"p.yaml": BASE + view("- {name: a, aggregation: count}\n", extra)}))
    by_field = {p.field: p.message for p in problems}
    assert "'ten' is not a float64" in by_field["feature_views[v].filter[0].value"]
    assert "has no field 'nope'" in by_field["feature_views[v].filter[2].field"]
    assert "cannot compare bool" in by_field["feature_views[v].filter[3].op"]
    assert "needs a list value" in by_field["feature_views[v].filter[4]"]
    assert len(problems) == 4


def test_source_checks(tmp_path: Path) -> None:
    text = """
project: {name: shop}
sources:
  - name: a
    topic: "bad topic!"
    event_time_field: ts
    fields: [{name: ts, type: timestamp}]
  - name: a2
    topic: a2
    event_time_field: ts
    fields: [{name: ts, type: bool}]
  - name: b
    topic: b
    event_time_field: when
    fields: [{name: ts, type: timestamp}]
  - name: b2
    topic: b2
    event_time_field: ts
    fields: [{name: ts, type: timestamp}, {name: n, type: string, min: 3}]
  - name: c
    topic: c
    event_time_field: ts
    fields: []
"""
    problems = problems_of(write(tmp_path, **{"p.yaml": text}))
    by_field = {p.field: p.message for p in problems}
    assert "a topic name holds only" in by_field["sources[a].topic"]
    assert "must be timestamp, int64" in by_field["sources[a2].event_time_field"]
    assert "'when' is not one of the source's fields" in by_field["sources[b].event_time_field"]
    assert "min/max apply to int64 or float64" in by_field["sources[b2].fields[n]"]
    assert "must declare its fields" in by_field["sources[c]"]


def test_avro_schema_file_and_derived_fields(tmp_path: Path) -> None:
    schema = {
        "type": "record",
        "name": "Order",
        "fields": [
            {"name": "user_id", "type": "string"},
            {"name": "amount", "type": "double"},
            {"name": "note", "type": ["null", "string"]},
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        ],
    }
    (tmp_path / "order.avsc").write_text(json.dumps(schema))
    text = """
project: {name: shop}
sources:
  - name: orders
    topic: orders
    format: avro
    avro_schema_file: order.avsc
    event_time_field: ts
"""
    definition = load_project(write(tmp_path, **{"p.yaml": text}))
    source = definition.sources[0]
    assert source.avro_schema == schema
    assert [(f.name, f.type, f.required) for f in source.fields] == [
        ("user_id", "string", True),
        ("amount", "float64", True),
        ("note", "string", False),
        ("ts", "timestamp", True),
    ]


def test_avro_declared_fields_must_match_the_schema(tmp_path: Path) -> None:
    text = """
project: {name: shop}
sources:
  - name: orders
    topic: orders
    format: avro
    avro_schema: {type: record, name: O, fields: [{name: ts, type: long}, {name: amount, type: [null, double]}]}
    event_time_field: ts
    fields:
      - {name: ts, type: timestamp}
      - {name: amount, type: float64}
      - {name: shop, type: string}
  - name: broken
    topic: broken
    format: avro
    avro_schema: {type: record, name: B, fields: [{name: x, type: nosuchtype}]}
    event_time_field: x
  - name: missing
    topic: missing
    format: avro
    avro_schema_file: nowhere.avsc
    event_time_field: x
"""
    problems = problems_of(write(tmp_path, **{"p.yaml": text}))
    by_field = {p.field: p.message for p in problems}
    assert "declare required: false" in by_field["sources[orders].fields[amount].required"]
    assert "'shop' is not in the Avro schema" in by_field["sources[orders].fields[shop].name"]
    assert "invalid Avro schema" in by_field["sources[broken].avro_schema"]
    assert "cannot read" in by_field["sources[missing].avro_schema_file"]


def test_file_level_problems(tmp_path: Path) -> None:
    write(tmp_path, **{"a.yaml": BASE, "b.yaml": "- just\n- a list\n", "c.yaml": "views: []\n", "d.yml": "key: [unclosed\n"})
    problems = problems_of(tmp_path)
    by_file = {Path(p.file).name: p for p in problems}
    assert "expected a mapping" in by_file["b.yaml"].message
    assert "unknown top-level key" in by_file["c.yaml"].message
    assert by_file["c.yaml"].field == "views"
    assert "invalid YAML" in by_file["d.yml"].message and by_file["d.yml"].line is not None


def test_missing_and_duplicate_project(tmp_path: Path) -> None:
    assert "no file declares the project" in problems_of(write(tmp_path, **{"a.yaml": "entities: []\n"}))[0].message
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    [problem] = problems_of(write(tmp_path, **{"a.yaml": BASE, "b.yaml": "project: {name: other}\n"}))
    assert "already declared at" in problem.message


def test_not_a_directory_and_empty(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "nope")[0].message == "not a directory"
    assert "no .yaml or .yml files" in problems_of(tmp_path)[0].message


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    problems = problems_of(tmp_path)
    assert [p.message for p in problems] == [f"more than {MAX_NODES} values (after expanding aliases)"]


def test_huge_and_deep_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "huge.yaml").write_text("x: '" + "a" * (3 * 1024 * 1024) + "'\n")
    (tmp_path / "deep.yaml").write_text("x: " + "[" * 200 + "]" * 200 + "\n")
    problems = problems_of(tmp_path)
    by_file = {Path(p.file).name: p.message for p in problems}
    assert "limited to" in by_file["huge.yaml"]
    assert "nesting" in by_file["deep.yaml"]


def test_unsafe_tags_are_refused(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("project: !!python/object/apply:os.system ['echo hi']\n")
    [problem] = problems_of(tmp_path)
    assert "invalid YAML" in problem.message


def test_rendered_error_lists_everything() -> None:
    error = DefinitionError([Problem("b.yaml", 3, "x", "bad"), Problem("a.yaml", 9, "y", "worse")])
    assert error.render().splitlines() == ["2 problems in the definitions:", "  a.yaml:9: y: worse", "  b.yaml:3: x: bad"]


def test_missing_key_is_named(tmp_path: Path) -> None:
    features = "- {name: a, window: 1h}\n"
    [problem] = problems_of(write(tmp_path, **{"p.yaml": BASE + view(features)}))
    assert (problem.field, problem.message) == ("feature_views[v].features[a].aggregation", "required key is missing")


def test_bad_names_get_a_plain_message(tmp_path: Path) -> None:
    [problem] = problems_of(write(tmp_path, **{"p.yaml": BASE + view("- {name: Bad-Name, aggregation: count}\n")}))
    assert "must start with a lower-case letter" in problem.message


def test_online_ttl_must_cover_the_windows(tmp_path: Path) -> None:
    features = "- {name: a, aggregation: count, window: 1h}\n"
    [problem] = problems_of(write(tmp_path, **{"p.yaml": BASE + view(features, "online_ttl: 30m\n")}))
    assert problem.message == "online_ttl must be at least the longest window of the view (1h)"
    definition = load_project(write(tmp_path, **{"p.yaml": BASE + view(features)}))
    assert definition.feature_views[0].effective_online_ttl == timedelta(hours=25)


def test_filter_values_and_source_consistency(tmp_path: Path) -> None:
    text = BASE.replace("{name: shop, type: string}", "{name: shop, type: string, allowed: [a, 3]}")
    extra = """
    filter:
      - {field: ts, op: gt, value: yesterday}
      - {field: shop, op: eq, value: null}
      - {field: shop, op: in, value: []}
    """
    problems = problems_of(write(tmp_path, **{"p.yaml": text + view("- {name: a, aggregation: count}\n", extra)}))
    messages = sorted(p.message for p in problems)
    assert any("'yesterday' is not a timestamp" in m for m in messages)
    assert any("null never matches" in m for m in messages)
    assert any("needs at least one value" in m for m in messages)
    assert any("allowed value 3 is not a string" in m for m in messages)
    assert len(messages) == 4


def test_avro_schema_given_twice_or_on_json(tmp_path: Path) -> None:
    (tmp_path / "x.avsc").write_text('{"type": "record", "name": "X", "fields": [{"name": "ts", "type": "long"}]}')
    text = """
project: {name: shop}
sources:
  - {name: a, topic: a, event_time_field: ts, avro_schema_file: x.avsc, fields: [{name: ts, type: int64}]}
  - {name: b, topic: b, format: avro, event_time_field: ts, avro_schema_file: x.avsc, avro_schema: {type: record, name: Y, fields: []}}
"""
    problems = problems_of(write(tmp_path, **{"p.yaml": text}))
    assert sorted(p.message for p in problems) == [
        "avro_schema only applies to format: avro",
        "give avro_schema or avro_schema_file, not both",
    ]


def test_time_format_must_fit_the_field(tmp_path: Path) -> None:
    text = BASE.replace("{name: ts, type: timestamp}", "{name: ts, type: string}").replace(
        "    event_time_field: ts\n", "    event_time_field: ts\n    event_time_format: epoch_millis\n", 1
    )
    [problem] = problems_of(write(tmp_path, **{"p.yaml": text}))
    assert problem.message == "epoch_millis cannot be read from a string field"


def test_value_features_inherit_pii(tmp_path: Path) -> None:
    text = BASE.replace("{name: shop, type: string}", "{name: shop, type: string, pii: sensitive}")
    features = "- {name: a, aggregation: last, field: shop, pii: personal}\n- {name: b, aggregation: approx_count_distinct, field: shop}\n"
    [problem] = problems_of(write(tmp_path, **{"p.yaml": text + view(features)}))
    assert problem.field == "feature_views[v].features[a].pii"
    assert "declare pii: sensitive" in problem.message


def test_one_bad_source_field_gives_one_problem(tmp_path: Path) -> None:
    text = BASE.replace("{name: shop, type: string}", "{name: shop, type: text}")
    features = "- {name: a, aggregation: last, field: shop}\n- {name: b, aggregation: sum, field: amount}\n"
    problems = problems_of(write(tmp_path, **{"p.yaml": text + view(features)}))
    assert [(p.field, p.line) for p in problems] == [("sources[orders].fields[shop].type", 14)]


def test_hidden_directories_are_skipped(tmp_path: Path) -> None:
    (tmp_path / ".github").mkdir()
    (tmp_path / ".github" / "ci.yml").write_text("jobs: {}\n")
    (tmp_path / "P.YAML").write_text(BASE)
    assert load_project(tmp_path).project.name == "shop"
