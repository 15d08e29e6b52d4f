"""`featurestream list|describe|search|lineage|impact|docs-coverage`: the feature catalog.

Each reads the registry (the applied definitions, view versions and read counts) or, with
``--project-dir``, a directory of YAML definitions (no database needed, e.g. in CI before apply).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.table import Table
from rich.text import Text

from featurestream.cli.app import app
from featurestream.cli.registry_cmds import (
    AsJson,
    PostgresUrl,
    ProjectName,
    choose_project,
    console,
    emit_json,
    fail,
    load_dir,
    open_registry,
    user_errors,
)

if TYPE_CHECKING:
    from featurestream.registry.catalog import CatalogData

ProjectDir = Annotated[
    Path | None,
    typer.Option("--project-dir", "-d", help="Read YAML definitions from this directory instead of the registry."),
]
Kind = Annotated[str | None, typer.Option("--kind", "-k", help="entity, source, field, view, feature, "
                                          "service or consumer (when a name is ambiguous).")]
PANEL = "Catalog"


def _data(project: str | None, project_dir: Path | None, postgres_url: str | None) -> CatalogData:
    from featurestream.registry.catalog import CatalogData

    if project_dir is not None:
        return CatalogData(definition=load_dir(project_dir))
    registry = open_registry(postgres_url)
    return registry.catalog_data(choose_project(registry, project))


def _cell(value: Any) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(v if isinstance(v, str) else json.dumps(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


@app.command("list", rich_help_panel=PANEL)
def list_cmd(
    kind: Annotated[list[str] | None, typer.Option("--kind", "-k", help="Only these kinds (repeatable): "
                                                   "entity, source, field, view, feature, service, consumer.")] = None,
    owner: Annotated[str | None, typer.Option(help="Only objects with this owner.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only objects with this tag.")] = None,
    project: ProjectName = None,
    project_dir: ProjectDir = None,
    postgres_url: PostgresUrl = None,
    as_json: AsJson = False,
) -> None:
    """List entities, sources, feature views, features, services and consumers."""
    from featurestream.registry.catalog import list_entries
    from featurestream.registry.lineage import KIND_ALIASES
    from featurestream.registry.records import RegistryError

    with user_errors():
        unknown = [k for k in kind or [] if k not in KIND_ALIASES]
        if unknown:
            raise RegistryError(f"unknown kind {', '.join(unknown)} (expected entity, source, field, view, "
                                "feature, service or consumer)")
        data = _data(project, project_dir, postgres_url)
        found = list_entries(data, {KIND_ALIASES[k] for k in kind} if kind else None, owner, tag)
    if as_json:
        emit_json({"project": data.definition.project.name, "objects": [e.to_json() for e in found]})
        return
    table = Table("kind", "owner", "tags", "detail", "description",
                  title=f"Project '{data.definition.project.name}': {len(found)} objects")
    table.add_column("name", no_wrap=True)
    table.columns.insert(1, table.columns.pop())
    for e in found:
        table.add_row(e.kind, e.name, _cell(e.owner), _cell(list(e.tags)), e.detail, _cell(e.description))
    console().print(table)


def _render_description(result: dict[str, Any]) -> None:
    out = console()
    out.print(Text(f"{result['kind']} {result['name']}", style="bold"))
    table = Table(show_header=False, box=None, padding=(0, 2))
    sections: list[tuple[str, Any]] = []
    for key, value in result.items():
        if key in ("kind", "name"):
            continue
        if isinstance(value, list) and value and isinstance(value[0], dict):
            sections.append((key, value))
        elif isinstance(value, dict) and key in ("lineage", "usage", "definition", "counts"):
            sections.append((key, value))
        else:
            table.add_row(key, _cell(value))
    out.print(table)
    for key, value in sections:
        out.print(Text(key, style="bold"))
        if isinstance(value, dict):
            sub = Table(show_header=False, box=None, padding=(0, 2))
            for k, v in value.items():
                sub.add_row(f"  {k}", _cell(v) if not isinstance(v, list) or not v or not isinstance(v[0], dict)
                            else f"{len(v)} rows")
            out.print(sub)
        else:
            columns = list(dict.fromkeys(k for row in value for k in row))
            sub = Table(*columns)
            for row in value:
                sub.add_row(*(_cell(row.get(c)) for c in columns))
            out.print(sub)


@app.command("describe", rich_help_panel=PANEL)
def describe_cmd(
    name: Annotated[str, typer.Argument(help="Any object: 'user_txn', 'user_txn@2', 'user_txn:amount_sum_1h', "
                                        "'transactions.amount', an entity, service, consumer or the project.")],
    kind: Kind = None,
    project: ProjectName = None,
    project_dir: ProjectDir = None,
    postgres_url: PostgresUrl = None,
    as_json: AsJson = False,
) -> None:
    """Show an object's definition, documentation, versions, lineage and read usage."""
    from featurestream.registry.catalog import describe

    with user_errors():
        result = describe(_data(project, project_dir, postgres_url), name, kind)
    if as_json:
        emit_json(result)
    else:
        _render_description(result)


@app.command("search", rich_help_panel=PANEL)
def search_cmd(
    text: Annotated[str, typer.Argument(help="Words to find in names, descriptions, tags and owners.")],
    limit: Annotated[int, typer.Option(help="At most this many results.", min=1)] = 20,
    project: ProjectName = None,
    project_dir: ProjectDir = None,
    postgres_url: PostgresUrl = None,
    as_json: AsJson = False,
) -> None:
    """Find objects by name, description, tag or owner; best matches first."""
    from featurestream.registry.catalog import search

    with user_errors():
        hits = search(_data(project, project_dir, postgres_url), text, limit)
    if as_json:
        emit_json({"query": text, "results": [{**e.to_json(), "score": score} for e, score in hits]})
        return
    if not hits:
        console().print(f"Nothing matches '{text}'.")
        return
    table = Table("score", "kind", "owner", "tags", "description", title=f"Search: {text}")
    table.add_column("name", no_wrap=True)
    table.columns.insert(2, table.columns.pop())
    for e, score in hits:
        table.add_row(str(score), e.kind, e.name, _cell(e.owner), _cell(list(e.tags)), _cell(e.description))
    console().print(table)


@app.command("lineage", rich_help_panel=PANEL)
def lineage_cmd(
    name: Annotated[str, typer.Argument(help="Source, source field, entity, view, feature, service or consumer.")],
    kind: Kind = None,
    fmt: Annotated[Literal["text", "mermaid", "dot", "json"],
                   typer.Option("--format", "-f", help="text, mermaid, dot or json.")] = "text",
    project: ProjectName = None,
    project_dir: ProjectDir = None,
    postgres_url: PostgresUrl = None,
) -> None:
    """Show what feeds an object (upstream) and what it feeds (downstream)."""
    from featurestream.registry import lineage as lin

    with user_errors():
        graph = lin.build_graph(_data(project, project_dir, postgres_url).definition)
        result = lin.lineage(graph, graph.resolve(name, kind))
    if fmt == "json":
        emit_json(lin.to_json(result))
    else:
        render = {"text": lin.to_text, "mermaid": lin.to_mermaid, "dot": lin.to_dot}[fmt]
        typer.echo(render(result), nl=False)


@app.command("impact", rich_help_panel=PANEL)
def impact_cmd(
    name: Annotated[str, typer.Argument(help="What would change: e.g. 'transactions.amount' (a source field), "
                                        "a source, entity, view or feature.")],
    kind: Kind = None,
    project: ProjectName = None,
    project_dir: ProjectDir = None,
    postgres_url: PostgresUrl = None,
    as_json: AsJson = False,
) -> None:
    """List everything transitively downstream of an object: what a change to it can affect."""
    from featurestream.registry import lineage as lin

    with user_errors():
        graph = lin.build_graph(_data(project, project_dir, postgres_url).definition)
        node = graph.resolve(name, kind)
        affected = lin.impact(graph, node)
    if as_json:
        emit_json({"root": node.to_json(), "impacted": [n.to_json() for n in affected]})
        return
    out = console()
    if not affected:
        out.print(f"Nothing downstream of {node.kind} {node.name}.")
        return
    out.print(f"Impact of a change to {node.kind} {node.name}: {len(affected)} objects downstream")
    table = Table("kind", "name")
    for n in affected:
        table.add_row(n.kind, n.name)
    out.print(table)


@app.command("docs-coverage", rich_help_panel=PANEL)
def docs_coverage_cmd(
    minimum: Annotated[float | None, typer.Option("--min", help="Exit 1 when total coverage (percent) is "
                                                  "below this.", min=0, max=100)] = None,
    project: ProjectName = None,
    project_dir: ProjectDir = None,
    postgres_url: PostgresUrl = None,
    as_json: AsJson = False,
) -> None:
    """Share of features with a description, an owner (a view's owner counts) and an example."""
    from featurestream.registry.catalog import coverage, total_percent

    with user_errors():
        report = coverage(_data(project, project_dir, postgres_url).definition)
    total = total_percent(report)
    ok = minimum is None or total >= minimum
    if as_json:
        emit_json({"total_percent": round(total, 2), "minimum": minimum, "ok": ok,
                   "views": [v.to_json() for v in report]})
    else:
        table = Table("view", "features", "description", "owner", "example", "documented", "coverage",
                      "missing", title="Documentation coverage")
        for v in report:
            missing = "; ".join(f"{f}: {', '.join(what)}" for f, what in v.missing.items())
            table.add_row(v.view, str(v.features), str(v.described), str(v.owned), str(v.exampled),
                          str(v.documented), f"{v.percent:.1f}%", missing or "-")
        out = console()
        out.print(table)
        out.print(f"Total: {total:.1f}% of features fully documented"
                  + (f" (minimum {minimum:g}%)" if minimum is not None else "") + ".")
    if not ok:
        raise fail(f"documentation coverage {total:.1f}% is below the minimum {minimum:g}%")
