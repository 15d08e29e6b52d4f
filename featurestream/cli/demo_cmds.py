"""`featurestream produce-demo`: send realistic demo transactions to the demo project's topic."""

from __future__ import annotations

import json
import secrets
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from featurestream.cli.app import app

if TYPE_CHECKING:
    from featurestream.demo.producer import ProduceOptions, ProduceSummary


def _console(stderr: bool = False) -> Console:
    # Without a terminal (CI, pipes) rich would wrap at 80 columns; a wide fixed width keeps rows whole.
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160, highlight=False)


def _share(value: float) -> float:
    if not 0 <= value <= 1:
        raise typer.BadParameter("must be between 0 and 1")
    return value


def _now(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"not an ISO-8601 time: {value!r}") from exc
    if parsed.tzinfo is None:
        raise typer.BadParameter("give a UTC offset, e.g. 2026-01-01T12:00:00Z")
    return parsed


@app.command("produce-demo")
def produce_demo_cmd(
    rate: float = typer.Option(100.0, "--rate", min=0, help="Events per second; 0 = as fast as possible."),
    count: int = typer.Option(10_000, "--count", min=0, help="Number of events to send."),
    bootstrap: str | None = typer.Option(
        None, "--bootstrap", help="Kafka HOST:PORT; default: the configured kafka_bootstrap."
    ),
    topic: str = typer.Option("transactions", "--topic", help="Topic to send to."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed; default: a fresh one, printed."),
    users: int = typer.Option(3000, "--users", min=1, help="Number of distinct users."),
    malformed_share: float = typer.Option(0.002, "--malformed-share", callback=_share),
    late_share: float = typer.Option(
        0.02, "--late-share", callback=_share, help="Share beyond the 1h window."
    ),
    out_of_order_share: float = typer.Option(
        0.05, "--out-of-order-share", callback=_share, help="Share 5s-15min behind."
    ),
    create_topic: bool = typer.Option(
        True,
        "--create-topic/--no-create-topic",
        help="Create the topic with the declared partitions if missing.",
    ),
    definitions: str | None = typer.Option(
        None, "--definitions", help="Project directory declaring the topic's partition count (default 4)."
    ),
    now: str | None = typer.Option(None, "--now", help="Event-time anchor (ISO-8601); default: start time."),
    flush_timeout: float = typer.Option(30.0, "--flush-timeout", min=0, help="Seconds to wait for delivery."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Send demo card transactions (valid, out-of-order, late and malformed) keyed by user id."""
    from featurestream.config import MissingServiceError, require
    from featurestream.definitions.errors import DefinitionError
    from featurestream.demo.producer import (
        DEFAULT_PARTITIONS,
        ProduceError,
        ProduceOptions,
        partitions_from_definitions,
    )

    err = _console(stderr=True)
    if malformed_share + late_share + out_of_order_share > 1:
        err.print("[red]The shares add up to more than 1.[/red]")
        raise typer.Exit(2)
    try:
        address = bootstrap or require("kafka_bootstrap")
    except MissingServiceError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    partitions = DEFAULT_PARTITIONS
    if definitions is not None:
        try:
            partitions = partitions_from_definitions(Path(definitions), topic)
        except DefinitionError as exc:
            err.print(exc.render(), markup=False)
            raise typer.Exit(2) from exc
    options = ProduceOptions(
        bootstrap=address,
        count=count,
        rate=rate,
        topic=topic,
        seed=seed if seed is not None else secrets.randbelow(2**31),
        users=users,
        malformed_share=malformed_share,
        late_share=late_share,
        out_of_order_share=out_of_order_share,
        partitions=partitions,
        create_topic=create_topic,
        now=_now(now),
        flush_timeout_s=flush_timeout,
    )
    try:
        summary = _run(options, err if progress else None)
    except ProduceError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(summary.to_json(), indent=2))
    else:
        _print_summary(_console(), summary)
    if summary.failed or summary.interrupted:
        raise typer.Exit(1)


def _run(options: ProduceOptions, console: Console | None) -> ProduceSummary:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from featurestream.demo.producer import prepare_topic, send_demo

    created, partitions = prepare_topic(options)
    if console is None:
        return send_demo(options, created, partitions)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>9} ev/s"),
        TimeElapsedColumn(),
    )
    # On a terminal the bar redraws in place; without one (CI, pipes) rich prints it once at the end.
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"produce → {options.topic}", total=options.count, rate="-")
        started = bar.get_time()

        def report(sent: int) -> None:
            elapsed = bar.get_time() - started
            bar.update(task, completed=sent, rate=f"{sent / elapsed:,.0f}" if elapsed > 0 else "-")

        return send_demo(options, created, partitions, on_progress=report)


def _print_summary(console: Console, summary: ProduceSummary) -> None:
    table = Table(title=f"produce-demo → {summary.topic} @ {summary.bootstrap}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    created = " (created)" if summary.topic_created else ""
    table.add_row("partitions", f"{summary.partitions}{created}")
    table.add_row("sent", f"{summary.sent:,} of {summary.requested:,}")
    table.add_row("delivered", f"{summary.delivered:,}")
    table.add_row("failed", f"[red]{summary.failed:,}[/red]" if summary.failed else "0")
    for kind, n in summary.kinds.items():
        if not kind.startswith("malformed:"):
            table.add_row(f"  {kind}", f"{n:,}")
    table.add_row("  malformed", f"{sum(summary.malformed.values()):,}")
    for reason, n in summary.malformed.items():
        table.add_row(f"    {reason}", f"{n:,}")
    requested = f"{summary.rate:,.0f}/s" if summary.rate else "unpaced"
    table.add_row("achieved rate", f"{summary.achieved_rate:,.0f} ev/s (requested {requested})")
    table.add_row("elapsed", f"{summary.elapsed_s:.2f} s")
    table.add_row("seed / now", f"{summary.seed} / {summary.now}")
    console.print(table)
    for error in summary.errors:
        console.print(error, style="yellow", markup=False)
    if summary.interrupted:
        console.print("[yellow]Interrupted: the summary covers what was sent before.[/yellow]")
