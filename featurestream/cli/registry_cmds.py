"""`featurestream plan|apply|retire|history|export-definitions`: the versioned registry.

Also the helpers the catalog commands share: registry connection, project choice, error handling.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from featurestream.cli.app import app

if TYPE_CHECKING:
    from featurestream.definitions.models import ProjectDefinition
    from featurestream.registry.diff import FieldChange, Plan
    from featurestream.registry.store import Registry

PostgresUrl = Annotated[
    str | None,
    typer.Option("--postgres-url", help="Registry database (default: FEATURESTREAM_POSTGRES_URL, "
                 "featurestream.yaml or the dev stack)."),
]
ProjectName = Annotated[
    str | None, typer.Option("--project", "-p", help="Project name (default: the only one in the registry).")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
DefinitionsDir = Annotated[Path, typer.Argument(help="Project directory of YAML definitions.")]


def console() -> Console:
    # Without a terminal (CI, pipes) rich would wrap at 80 columns; a wide fixed width keeps rows whole.
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def fail(message: str, code: int = 1) -> typer.Exit:
    Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160).print(
        Text("error: ", style="bold red") + Text(message)
    )
    return typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one clear message and exit code 1 (no traceback)."""
    import psycopg

    from featurestream.config import MissingServiceError
    from featurestream.registry.records import RegistryError

    try:
        from featurestream.definitions.errors import DefinitionError
    except ImportError:  # pragma: no cover - the loader always ships with the package
        DefinitionError = RegistryError  # type: ignore[misc,assignment]
    try:
        yield
    except (RegistryError, MissingServiceError, DefinitionError, FileExistsError) as exc:
        raise fail(str(exc)) from None
    except psycopg.OperationalError as exc:
        raise fail(f"cannot use the registry database: {str(exc).strip()}") from None


def open_registry(postgres_url: str | None) -> Registry:
    from featurestream.config import require
    from featurestream.registry.store import Registry

    return Registry(postgres_url or require("postgres_url"))


def choose_project(registry: Registry, project: str | None) -> str:
    from featurestream.registry.records import ProjectNotFoundError

    known = registry.projects()
    if project is not None:
        if project not in known:
            listed = ", ".join(known) or "none yet"
            raise ProjectNotFoundError(f"no project '{project}' in the registry (projects: {listed})")
        return project
    if len(known) == 1:
        return known[0]
    if not known:
        raise ProjectNotFoundError("the registry has no projects yet: run 'featurestream apply DIR' first")
    raise ProjectNotFoundError(f"the registry holds several projects ({', '.join(known)}): pass --project")


def load_dir(directory: Path) -> ProjectDefinition:
    from featurestream.definitions.loader import load_project

    return load_project(directory)


# ---------------------------------------------------------------- rendering


def _value(value: Any) -> str:
    if isinstance(value, dict) and value.get("type") in ("sliding", "tumbling", "hopping"):
        size = value.get("duration") or value.get("size")
        return f"{value['type']} {size}" + (f" every {value['hop']}" if "hop" in value else "")
    text = "(none)" if value is None else json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= 100 else text[:97] + "..."


def _field_line(change: FieldChange, indent: str = "      ") -> Text:
    line = Text(indent) + Text(change.path, style="bold")
    line += Text(f": {_value(change.old)} -> {_value(change.new)}")
    if change.breaking:
        line += Text("  BREAKING", style="red")
    return line


_MARKS = {"add": ("+", "green"), "change": ("~", "yellow"), "remove": ("-", "red")}


def render_plan(out: Console, plan: Plan, registry_version: int | None = None) -> None:
    if plan.is_empty:
        out.print(f"No changes: the registry already matches project '{plan.project}'.")
        return
    at = f" (registry version {registry_version})" if registry_version is not None else ""
    out.print(Text(f"Changes to project '{plan.project}'{at}:", style="bold"))
    for change in plan.changes:
        mark, style = _MARKS[change.action]
        line = Text(f"  {mark} ", style=style) + Text(f"{change.kind} {change.name}")
        if change.kind == "feature_view" and change.creates_version and change.old_version is not None:
            line += Text(f"  v{change.old_version} -> v{change.new_version}")
            if not change.readded:
                line += Text(f" (new version; v{change.old_version} stays live until retired)")
        elif change.kind == "feature_view" and change.new_version is not None:
            line += Text(f"  v{change.new_version}")
        if change.readded:
            line += Text("  re-added")
        if change.breaking:
            line += Text("  BREAKING", style="bold red")
        out.print(line)
        for field_change in change.fields:
            out.print(_field_line(field_change))
    counts = plan.summary()
    out.print(
        f"{counts['add']} to add, {counts['change']} to change, {counts['remove']} to remove "
        f"({counts['breaking']} breaking, {counts['new_view_versions']} new feature view versions)."
    )


# ---------------------------------------------------------------- commands


@app.command("plan", rich_help_panel="Registry")
def plan_cmd(
    directory: DefinitionsDir = Path("."),
    postgres_url: PostgresUrl = None,
    as_json: AsJson = False,
    exit_code: Annotated[bool, typer.Option("--exit-code", help="Exit 2 when there are changes.")] = False,
) -> None:
    """Show what `apply` would change (added, changed, removed; breaking or not), changing nothing."""
    with user_errors():
        definition = load_dir(directory)
        registry = open_registry(postgres_url)
        plan = registry.plan(definition)
        head = registry.registry_version(definition.project.name)
    if as_json:
        emit_json({"registry_version": head, **plan.to_json()})
    else:
        render_plan(console(), plan, head)
    if exit_code and not plan.is_empty:
        raise typer.Exit(2)


@app.command("apply", rich_help_panel="Registry")
def apply_cmd(
    directory: DefinitionsDir = Path("."),
    postgres_url: PostgresUrl = None,
    message: Annotated[str, typer.Option("--message", "-m", help="Why; kept in the history.")] = "",
    actor: Annotated[str | None, typer.Option(help="Who applies (default: the OS user).")] = None,
    as_json: AsJson = False,
) -> None:
    """Store the definitions as a new registry version (one transaction); a no-op when nothing changed."""
    with user_errors():
        definition = load_dir(directory)
        result = open_registry(postgres_url).apply(definition, actor=actor, message=message)
    if as_json:
        emit_json(result.to_json())
        return
    out = console()
    render_plan(out, result.plan)
    if result.applied:
        out.print(f"Applied: project '{result.project}' is at registry version {result.registry_version}.")


@app.command("retire", rich_help_panel="Registry")
def retire_cmd(
    view: Annotated[str, typer.Argument(help="Feature view name.")],
    version: Annotated[int, typer.Option("--version", "-v", help="The version to retire.", min=1)],
    project: ProjectName = None,
    postgres_url: PostgresUrl = None,
    message: Annotated[str, typer.Option("--message", "-m", help="Why; kept in the history.")] = "",
    actor: Annotated[str | None, typer.Option(help="Who retires (default: the OS user).")] = None,
) -> None:
    """Retire an old version of a feature view: it is no longer live (servable); its history stays."""
    with user_errors():
        registry = open_registry(postgres_url)
        name = choose_project(registry, project)
        head = registry.retire(name, view, version, actor=actor, message=message)
    console().print(f"Retired {view}@{version} in project '{name}' (registry version {head}).")


@app.command("history", rich_help_panel="Registry")
def history_cmd(
    name: Annotated[str, typer.Argument(help="Object name; 'view:feature' shows one feature's changes.")],
    kind: Annotated[str | None, typer.Option(help="project, entity, source, feature_view, "
                                             "feature_service or consumer.")] = None,
    project: ProjectName = None,
    postgres_url: PostgresUrl = None,
    as_json: AsJson = False,
) -> None:
    """List the versions of an object, oldest first, with what each changed."""
    from featurestream.registry.diff import KINDS
    from featurestream.registry.records import ObjectNotFoundError, RegistryError

    view_name, _, feature = name.partition(":")
    with user_errors():
        if kind is not None and kind not in KINDS:
            raise RegistryError(f"unknown kind '{kind}' (expected one of {', '.join(KINDS)})")
        registry = open_registry(postgres_url)
        chosen = choose_project(registry, project)
        wanted = "feature_view" if feature else next((k for k in KINDS if k == kind), None)
        records = registry.history(chosen, view_name, wanted)
        if feature:
            prefix = f"features[{feature}]"
            records = [r for r in records if r.action not in ("change", "new_version")
                       or any(c.path.startswith(prefix) for c in r.changes)]
            records = [
                replace(r, changes=tuple(c for c in r.changes if c.path.startswith(prefix))) for r in records
            ]
        if not records:
            hint = "" if feature else " (for one feature, name it view:feature)"
            raise ObjectNotFoundError(f"no history for '{name}' in project '{chosen}'{hint}")
    if as_json:
        emit_json({"project": chosen, "name": name, "history": [r.to_json() for r in records]})
        return
    table = Table("registry version", "kind", "version", "action", "when", "by", "changes",
                  title=f"History of {name} in project '{chosen}'")
    for record in records:
        changes = Text("\n").join(_field_line(c, indent="") for c in record.changes)
        if record.message:
            note = Text(f"“{record.message}”", style="italic")
            changes = note + Text("\n") + changes if record.changes else note
        action = Text(record.action) + (Text(" BREAKING", style="red") if record.breaking else Text(""))
        table.add_row(str(record.registry_version), record.kind, f"v{record.version}", action,
                      record.created_at.strftime("%Y-%m-%d %H:%M:%S %Z"), record.actor, changes)
    console().print(table)


@app.command("export-definitions", rich_help_panel="Registry")
def export_cmd(
    directory: Annotated[Path, typer.Argument(help="Directory to write the YAML files to.")],
    project: ProjectName = None,
    postgres_url: PostgresUrl = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the YAML files already in DIRECTORY "
                                        "(every *.yaml/*.yml under it).")] = False,
) -> None:
    """Write the registry's current definitions as YAML that `apply` accepts unchanged."""
    from featurestream.definitions.export import export_definitions

    with user_errors():
        registry = open_registry(postgres_url)
        chosen = choose_project(registry, project)
        snapshot = registry.snapshot(chosen)
        header = (f"Exported from the featurestream registry: project {chosen}, "
                  f"registry version {snapshot.registry_version}.")
        try:
            written = export_definitions(snapshot.definition, directory, overwrite=force, header=header)
        except FileExistsError as exc:
            raise fail(f"{exc}: 'apply' would read them too; pass --force to replace them") from None
    out = console()
    for path in written:
        out.print(f"wrote {path}")
