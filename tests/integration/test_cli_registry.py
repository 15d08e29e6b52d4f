"""The registry and catalog commands end to end: YAML directory -> CLI -> real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from featurestream.cli.app import app
from featurestream.config import ENV_POSTGRES
from featurestream.definitions.export import export_definitions
from featurestream.definitions.loader import load_project
from featurestream.definitions.models import ProjectDefinition
from featurestream.registry.sample import sample_spec

Run = Callable[..., Result]


@pytest.fixture
def run(fresh_pg_url: str) -> Run:
    runner = CliRunner()

    def invoke(*args: str, code: int = 0, db: bool = True) -> Result:
        argv = [*args, "--postgres-url", fresh_pg_url] if db else list(args)
        result = runner.invoke(app, argv, env={"CI": "true", "COLUMNS": "200"})
        assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result

    return invoke


def write_project(directory: Path, edit: Callable[[dict[str, Any]], Any] | None = None,
                  project: str = "shop") -> Path:
    spec = sample_spec(project)
    if edit is not None:
        edit(spec)
    export_definitions(ProjectDefinition.model_validate(spec), directory, overwrite=True)
    return directory


def _breaking(spec: dict[str, Any]) -> None:
    spec["feature_views"][0]["features"][1]["window"] = "2h"


def test_plan_apply_history_and_retire(run: Run, tmp_path: Path) -> None:
    project = write_project(tmp_path / "defs")
    plan = run("plan", str(project))
    assert "+ feature_view user_txn  v1" in plan.stdout and "9 to add, 0 to change, 0 to remove" in plan.stdout
    run("plan", str(project), "--exit-code", code=2)
    data = json.loads(run("plan", str(project), "--json").stdout)
    assert data["registry_version"] == 0 and data["summary"]["add"] == 9

    applied = run("apply", str(project), "-m", "first", "--actor", "ana")
    assert "Applied: project 'shop' is at registry version 1." in applied.stdout
    assert "No changes" in run("apply", str(project)).stdout  # idempotent
    run("plan", str(project), "--exit-code")

    write_project(project, _breaking)
    plan = run("plan", str(project))
    assert "~ feature_view user_txn  v1 -> v2 (new version; v1 stays live until retired)  BREAKING" in plan.stdout
    assert "features[amount_sum_1h].window: sliding 1h -> sliding 2h  BREAKING" in plan.stdout
    result = json.loads(run("apply", str(project), "--json").stdout)
    assert result["applied"] and result["registry_version"] == 2
    assert result["changes"][0]["new_view_version"] is True

    history = json.loads(run("history", "user_txn", "--json").stdout)
    assert [(h["action"], h["version"]) for h in history["history"]] == [("add", 1), ("new_version", 2)]
    assert history["history"][0]["actor"] == "ana" and history["history"][0]["message"] == "first"
    text = run("history", "user_txn").stdout
    assert "new_version BREAKING" in text and "features[amount_sum_1h].window" in text
    one_feature = json.loads(run("history", "user_txn:txn_count_1h", "--json").stdout)
    assert [h["action"] for h in one_feature["history"]] == ["add"]  # the window change is another feature's

    err = run("retire", "user_txn", "--version", "2", code=1)
    assert "current version" in err.stderr and "Traceback" not in err.output
    assert "Retired user_txn@1" in run("retire", "user_txn", "--version", "1").stdout
    described = json.loads(run("describe", "user_txn", "--json").stdout)
    assert [(v["version"], v["status"]) for v in described["versions"]] == [(1, "retired"), (2, "live")]


def test_catalog_commands(run: Run, tmp_path: Path) -> None:
    project = write_project(tmp_path / "defs")
    run("apply", str(project))

    listed = json.loads(run("list", "--json").stdout)
    assert listed["project"] == "shop"
    assert {o["kind"] for o in listed["objects"]} == {"entity", "source", "view", "feature", "service", "consumer"}
    features = json.loads(run("list", "--kind", "feature", "--json").stdout)["objects"]
    assert len(features) == 5
    views = json.loads(run("list", "-k", "view", "-k", "service", "--json").stdout)["objects"]
    assert [(o["kind"], o["name"]) for o in views] == [("view", "user_txn"), ("view", "merchant_fr"),
                                                        ("service", "fraud")]
    table = run("list").stdout
    assert "user_txn:amount_sum_1h" in table and "sum(amount) sliding 1h -> float64" in table
    assert "unknown kind" in run("list", "--kind", "nope", code=1).stderr

    feature = json.loads(run("describe", "user_txn:amount_sum_1h", "--json").stdout)
    assert feature["owner"] == "fraud@example.com" and feature["usage"]["total_reads"] == 0
    assert feature["versions"][0]["status"] == "live"
    text = run("describe", "user_txn:amount_sum_1h").stdout
    assert "EUR spent in the last hour." in text and "total_reads" in text
    assert json.loads(run("describe", "transactions.amount", "--json").stdout)["type"] == "float64"
    assert "did you mean" in run("describe", "user_tx", code=1).stderr

    hits = json.loads(run("search", "amount", "--json").stdout)["results"]
    assert hits[0]["name"] == "transactions.amount" and hits[0]["score"] >= hits[-1]["score"]
    assert "Nothing matches" in run("search", "zzz").stdout

    lineage = json.loads(run("lineage", "user_txn:amount_sum_1h", "--format", "json").stdout)
    assert {n["id"] for n in lineage["downstream"]} == {"service:fraud", "consumer:fraud_model",
                                                        "consumer:dashboard"}
    assert run("lineage", "fraud", "-f", "mermaid").stdout.startswith("flowchart LR")
    assert run("lineage", "fraud", "-f", "dot").stdout.startswith("digraph lineage {")
    assert "upstream:" in run("lineage", "transactions.amount").stdout

    impact = json.loads(run("impact", "transactions.amount", "--json").stdout)
    assert {n["id"] for n in impact["impacted"]} == {
        "feature:user_txn:amount_sum_1h", "feature:user_txn:amount_max_1d", "service:fraud",
        "consumer:fraud_model", "consumer:dashboard"}
    assert "Impact of a change to source transactions" in run("impact", "transactions").stdout

    coverage = json.loads(run("docs-coverage", "--json").stdout)
    assert coverage["total_percent"] == 60.0 and coverage["ok"]
    assert "last_country: description, example" in run("docs-coverage").stdout
    run("docs-coverage", "--min", "60")
    below = run("docs-coverage", "--min", "95", code=1)
    assert "below the minimum 95%" in below.stderr


def test_catalog_reads_a_directory_without_a_database(run: Run, tmp_path: Path) -> None:
    project = write_project(tmp_path / "defs")
    coverage = json.loads(run("docs-coverage", "--project-dir", str(project), "--json", db=False).stdout)
    assert coverage["total_percent"] == 60.0
    listed = json.loads(run("list", "-d", str(project), "--json", db=False).stdout)
    assert len(listed["objects"]) == 13


def test_export_definitions_round_trip(run: Run, tmp_path: Path) -> None:
    project = write_project(tmp_path / "defs", lambda s: s["feature_views"][0].update(online_ttl="3d"))
    original = load_project(project)
    run("apply", str(project))
    out = tmp_path / "exported"
    written = run("export-definitions", str(out)).stdout
    assert "feature_views.yaml" in written
    assert load_project(out) == original
    assert "No changes" in run("plan", str(out)).stdout
    err = run("export-definitions", str(out), code=1)
    assert "--force" in err.stderr
    run("export-definitions", str(out), "--force")


def test_several_projects_need_project(run: Run, tmp_path: Path) -> None:
    run("apply", str(write_project(tmp_path / "a", project="shop")))
    run("apply", str(write_project(tmp_path / "b", project="bank")))
    err = run("list", code=1)
    assert "several projects (bank, shop): pass --project" in err.stderr
    assert json.loads(run("list", "--project", "bank", "--json").stdout)["project"] == "bank"
    assert "no project 'nope'" in run("list", "--project", "nope", code=1).stderr


def test_user_errors_are_clear(run: Run, tmp_path: Path) -> None:
    bad = write_project(tmp_path / "bad")
    text = (bad / "feature_views.yaml").read_text().replace("entity: user\n", "entity: nobody\n", 1)
    (bad / "feature_views.yaml").write_text(text)
    err = run("apply", str(bad), code=1)
    assert "feature_views.yaml:" in err.stderr and "no entity named 'nobody'" in err.stderr
    assert "Traceback" not in err.output
    assert "not a directory" in run("plan", str(tmp_path / "missing"), code=1).stderr
    assert "no projects yet" in run("list", code=1).stderr
    unreachable = run("plan", str(write_project(tmp_path / "ok")), "--postgres-url",
                      "postgresql://nobody@127.0.0.1:1/none", code=1, db=False)
    assert "cannot use the registry database" in unreachable.stderr


def test_postgres_url_from_the_environment(run: Run, tmp_path: Path, fresh_pg_url: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_POSTGRES, raising=False)
    err = run("plan", str(write_project(tmp_path / "defs")), code=1, db=False)
    assert "no postgres_url configured" in err.stderr
    monkeypatch.setenv(ENV_POSTGRES, fresh_pg_url)
    assert "Applied" in run("apply", str(tmp_path / "defs"), db=False).stdout
