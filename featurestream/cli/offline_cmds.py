"""`featurestream materialize|backfill|export|import|consistency`: the offline jobs over the event
archive (PostgreSQL) and the online store (Redis). See docs/offline.md."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from featurestream.cli.app import app
from featurestream.cli.registry_cmds import (
    AsJson,
    ProjectName,
    choose_project,
    console,
    emit_json,
    fail,
    user_errors,
)

if TYPE_CHECKING:
    from featurestream.offline.rebuild import OfflineView
    from featurestream.registry.store import Registry

PANEL = "Offline"
ViewRef = Annotated[str, typer.Argument(help="Feature view: NAME (its latest live version) or NAME@VERSION.",
                                        metavar="VIEW[@N]")]
FromTime = Annotated[str | None, typer.Option("--from", help="Events at or after this time: ISO-8601 "
                                              "(UTC when no offset) or epoch milliseconds.")]
ToTime = Annotated[str | None, typer.Option("--to", help="Events at or before this time (inclusive).")]


def redacted(url: str) -> str:
    """A service URL without its password, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparseable URL)"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


@contextmanager
def offline_errors(postgres_url: str | None = None, redis_url: str | None = None) -> Iterator[None]:
    """User-fixable failures as one message naming what failed and where."""
    import psycopg
    import redis

    from featurestream.offline.rebuild import OfflineError

    with user_errors():
        try:
            yield
        except OfflineError as exc:
            raise fail(str(exc)) from None
        except redis.RedisError as exc:
            where = f" at {redacted(redis_url)}" if redis_url else ""
            raise fail(f"the online store (Redis{where}) failed: {exc}") from None
        except psycopg.OperationalError as exc:
            where = f" at {redacted(postgres_url)}" if postgres_url else ""
            raise fail(f"the offline store (PostgreSQL{where}) failed: {str(exc).strip()}") from None


def parse_time(value: str | None, option: str) -> int | None:
    from featurestream.definitions.types import parse_timestamp

    if value is None:
        return None
    text = value.strip()
    try:
        return int(text) if text.lstrip("-").isdigit() else parse_timestamp(text, "iso8601")
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


class Bar:
    """A progress bar on stderr: rich's when stderr is a terminal, else a plain line every
    ``every`` seconds and at the end (logs and CI keep a readable trace)."""

    def __init__(self, label: str, unit: str, *, enabled: bool = True, every: float = 10.0) -> None:
        self.label, self.unit, self.enabled, self.every = label, unit, enabled, every
        self.err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
        self.done = 0
        self.total: int | None = None
        self.started = self.last = time.monotonic()
        self.rich: Progress | None = None
        self.task: Any = None

    def __enter__(self) -> Bar:
        if self.enabled and self.err.is_terminal:
            self.rich = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(self.unit), TimeElapsedColumn(), TimeRemainingColumn(), console=self.err, transient=True,
            )
            self.rich.start()
            self.task = self.rich.add_task(self.label, total=None)
        return self

    def set_total(self, total: int) -> None:
        self.total = total
        if self.rich is not None:
            self.rich.update(self.task, total=total)

    def advance(self, n: int) -> None:
        self.done += n
        if self.rich is not None:
            self.rich.advance(self.task, n)
        elif self.enabled and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self._line()

    def _line(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        of = f"/{self.total:,}" if self.total is not None else ""
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        self.err.print(f"{self.label}: {self.done:,}{of} {self.unit}{share}, {self.done / elapsed:,.0f}/s")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.rich is not None:
            self.rich.stop()
        elif self.enabled and self.done and kind is None:
            self._line()


def _address(name: str) -> str:
    """``postgres_url`` (registry and offline store) or ``redis_url``, or a clear error."""
    from featurestream.config import require

    with offline_errors():
        return require(name)


def _open(postgres_url: str, project: str | None) -> tuple[Registry, str]:
    from featurestream.registry.store import Registry

    registry = Registry(postgres_url)
    return registry, choose_project(registry, project)


def _view(registry: Registry, project: str, ref: str) -> OfflineView:
    from featurestream.offline.rebuild import OfflineView

    return OfflineView.from_registry(registry, project, ref)


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s" if seconds > 0 else "-"


# ---------------------------------------------------------------- materialize


@app.command("materialize", rich_help_panel=PANEL)
def materialize_cmd(
    view_ref: ViewRef,
    project: ProjectName = None,
    threads: Annotated[int, typer.Option(help="Threads writing to Redis.", min=1, max=64)] = 4,
    as_json: AsJson = False,
    progress: Annotated[bool, typer.Option(help="Show progress on stderr.")] = True,
) -> None:
    """Rebuild the online store (Redis) of a feature view version from the event archive.

    Every entity in the archive gets its state rebuilt exactly as the worker builds it and
    written in one step; entities whose Redis key would have expired (no event within the
    view's online TTL; views of lifetime features only never expire) are not written. Run it with
    no worker writing this view version (stop the worker, or before it first runs the version).
    """
    from featurestream.offline.rebuild import count_entities, materialize, require_archive
    from featurestream.storage.offline.postgres import PostgresOfflineStore
    from featurestream.storage.online.redis_store import RedisOnlineStore

    postgres_url, redis_url = _address("postgres_url"), _address("redis_url")
    with offline_errors(postgres_url, redis_url):
        registry, chosen = _open(postgres_url, project)
        view = _view(registry, chosen, view_ref)
        store = PostgresOfflineStore(postgres_url, use_timescale=False)
        online = RedisOnlineStore(redis_url, chosen, socket_timeout=10.0)
        try:
            online.client.ping()
            require_archive(store, view.source)
            with Bar(f"materialize {view.ref}", "entities", enabled=progress) as bar:
                bar.set_total(count_entities(store, view.source, view.key_fields))
                stats = materialize(view, store, online, progress=bar.advance, threads=threads)
        finally:
            online.close()
            store.close()
    if as_json:
        emit_json({"project": chosen, "status": view.status, **stats.to_json()})
        return
    out = console()
    out.print(
        f"Materialized {view.ref} (project '{chosen}') into {redacted(redis_url)}: {stats.written:,} entities "
        f"written, {stats.expired:,} not written (key expired), from {stats.events:,} archived events in "
        f"{stats.seconds:.1f} s ({_rate(stats.entities, stats.seconds)} entities, {_rate(stats.events, stats.seconds)} events)."
    )
    if view.status != "live":
        out.print(Text(f"note: {view.ref} is {view.status}: serving does not read it", style="yellow"))


# ---------------------------------------------------------------- backfill


@app.command("backfill", rich_help_panel=PANEL)
def backfill_cmd(
    view_ref: ViewRef,
    start: FromTime = None,
    end: ToTime = None,
    project: ProjectName = None,
    chunk: Annotated[int, typer.Option(help="Entities per committed chunk.", min=1)] = 500,
    restart: Annotated[bool, typer.Option(help="Forget the recorded progress of this range and start "
                                          "over (rows already stored stay).")] = False,
    as_json: AsJson = False,
    progress: Annotated[bool, typer.Option(help="Show progress on stderr.")] = True,
) -> None:
    """Compute the feature history of a feature view version from the event archive.

    One history row per archived event in the range: the values right after it. Commits a
    chunk of entities at a time with its progress, so an interrupted run resumes where it
    stopped; rows already stored are left as they are, so running it twice changes nothing.
    """
    from featurestream.offline.backfill import backfill
    from featurestream.storage.offline.postgres import PostgresOfflineStore

    start_ms, end_ms = parse_time(start, "--from"), parse_time(end, "--to")
    if start_ms is not None and end_ms is not None and start_ms > end_ms:
        raise typer.BadParameter("--from is after --to", param_hint="--from")
    postgres_url = _address("postgres_url")
    with offline_errors(postgres_url):
        registry, chosen = _open(postgres_url, project)
        view = _view(registry, chosen, view_ref)
        reader = PostgresOfflineStore(postgres_url, use_timescale=False)
        writer = PostgresOfflineStore(postgres_url)
        try:
            with Bar(f"backfill {view.ref}", "entities", enabled=progress) as bar:
                stats = backfill(view, reader, writer, start_ms=start_ms, end_ms=end_ms, chunk_entities=chunk,
                                 restart=restart, progress=bar.advance, on_total=bar.set_total)
        finally:
            reader.close()
            writer.close()
    if as_json:
        emit_json({"project": chosen, **stats.to_json()})
        return
    out = console()
    if stats.already_done:
        out.print(f"{view.ref}: range '{stats.range}' was backfilled already ({stats.total_entities:,} entities); "
                  "pass --restart to compute it again.")
        return
    resumed = f" (resumed after entity {stats.resumed_after})" if stats.resumed_after else ""
    out.print(
        f"Backfilled {view.ref} (project '{chosen}', range '{stats.range}'){resumed}: {stats.entities:,} entities, "
        f"{stats.rows:,} rows computed, {stats.written:,} new ({stats.rows - stats.written:,} stored already), "
        f"in {stats.seconds:.1f} s ({_rate(stats.rows, stats.seconds)} rows)."
    )


# ---------------------------------------------------------------- export / import


@app.command("export", rich_help_panel=PANEL)
def export_cmd(
    view_ref: ViewRef,
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write (replaced when it exists).",
                                      dir_okay=False)],
    fmt: Annotated[str | None, typer.Option("--format", "-f", help="parquet, avro or csv (default: from the "
                                            "--out file name).")] = None,
    start: FromTime = None,
    end: ToTime = None,
    project: ProjectName = None,
    as_json: AsJson = False,
    progress: Annotated[bool, typer.Option(help="Show progress on stderr.")] = True,
) -> None:
    """Write the feature history of a feature view version to a Parquet, Avro or CSV file."""
    from featurestream.offline.export import (
        FORMATS,
        count_history,
        export_history,
        format_of,
        require_history,
    )
    from featurestream.storage.offline.postgres import PostgresOfflineStore

    if fmt is not None and fmt not in FORMATS:
        raise typer.BadParameter(f"'{fmt}': expected one of {', '.join(FORMATS)}", param_hint="--format")
    with offline_errors():
        kind = format_of(out, fmt)
    start_ms, end_ms = parse_time(start, "--from"), parse_time(end, "--to")
    postgres_url = _address("postgres_url")
    with offline_errors(postgres_url):
        registry, chosen = _open(postgres_url, project)
        view = _view(registry, chosen, view_ref)
        store = PostgresOfflineStore(postgres_url, use_timescale=False)
        try:
            require_history(store, view)
            with Bar(f"export {view.ref}", "rows", enabled=progress) as bar:
                bar.set_total(count_history(store, view, start_ms, end_ms))
                stats = export_history(view, store, out, kind, start_ms=start_ms, end_ms=end_ms,
                                       progress=bar.advance)
        except OSError as exc:
            raise fail(f"cannot write {out}: {exc.strerror or exc}") from None
        finally:
            store.close()
    if as_json:
        emit_json({"project": chosen, **stats.to_json()})
        return
    console().print(f"Exported {stats.rows:,} rows of {view.ref} to {out} ({fmt}) in {stats.seconds:.1f} s.")


@app.command("import", rich_help_panel=PANEL)
def import_cmd(
    view_ref: ViewRef,
    file: Annotated[Path, typer.Argument(help="Parquet, Avro or CSV file (as 'export' writes it).")],
    fmt: Annotated[str | None, typer.Option("--format", "-f", help="parquet, avro or csv "
                                            "(default: from the file name).")] = None,
    project: ProjectName = None,
    show: Annotated[int, typer.Option(help="Bad rows to list (all with --json).", min=0)] = 20,
    as_json: AsJson = False,
    progress: Annotated[bool, typer.Option(help="Show progress on stderr.")] = True,
) -> None:
    """Load feature history rows from a file into a feature view version's history table.

    Every row is validated; good rows are stored (rows already stored are left as they are),
    bad ones are listed with their row number and reason. Exit code 2 when some were bad.
    """
    from featurestream.offline.export import format_of, import_history
    from featurestream.storage.offline.postgres import PostgresOfflineStore

    with offline_errors():
        kind = format_of(file, fmt)
    postgres_url = _address("postgres_url")
    with offline_errors(postgres_url):
        registry, chosen = _open(postgres_url, project)
        view = _view(registry, chosen, view_ref)
        store = PostgresOfflineStore(postgres_url)
        try:
            with Bar(f"import {view.ref}", "rows", enabled=progress) as bar:
                stats = import_history(view, store, file, kind, progress=bar.advance)
        finally:
            store.close()
    if as_json:
        emit_json({"project": chosen, **stats.to_json()})
    else:
        out = console()
        out.print(
            f"Imported {file} into {view.ref}: {stats.rows:,} rows, {stats.imported:,} new, "
            f"{stats.duplicates:,} stored already, {len(stats.rejected):,} rejected."
        )
        if stats.missing_features:
            out.print(Text(f"note: the file has no column for {', '.join(stats.missing_features)}: stored as null",
                           style="yellow"))
        for number, reason in stats.rejected[:show]:
            out.print(Text(f"  row {number}: ", style="red") + Text(reason))
        if len(stats.rejected) > show:
            out.print(f"  ... and {len(stats.rejected) - show:,} more (--json lists them all)")
    if stats.rejected:
        raise typer.Exit(2)


# ---------------------------------------------------------------- consistency


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.12g}"
    return str(value)


@app.command("consistency", rich_help_panel=PANEL)
def consistency_cmd(
    view_ref: ViewRef,
    sample: Annotated[int, typer.Option(help="Entities to sample from the archive.", min=1)] = 1000,
    seed: Annotated[float | None, typer.Option(help="Sampling seed in [-1, 1] (repeatable samples).")] = None,
    top: Annotated[int, typer.Option(help="Worst differences to show.", min=0)] = 10,
    min_score: Annotated[float | None, typer.Option(help="Exit 2 when the score is below this (0..1).",
                                                    min=0.0, max=1.0)] = None,
    project: ProjectName = None,
    as_json: AsJson = False,
    progress: Annotated[bool, typer.Option(help="Show progress on stderr.")] = True,
) -> None:
    """Compare what online serving returns now with what the archive computes for the same instant.

    Prints the share of equal values (floats within a relative 1e-9, everything else exactly),
    per feature, and the worst differences. Under a live stream each side counts the same events: per partition,
    those up to the offset Redis has applied.
    """
    from featurestream.offline.consistency import check_consistency
    from featurestream.storage.offline.postgres import PostgresOfflineStore

    postgres_url, redis_url = _address("postgres_url"), _address("redis_url")
    with offline_errors(postgres_url, redis_url):
        registry, chosen = _open(postgres_url, project)
        view = _view(registry, chosen, view_ref)
        snapshot = registry.snapshot(chosen)
        store = PostgresOfflineStore(postgres_url, use_timescale=False)
        try:
            with Bar(f"consistency {view.ref}", "entities", enabled=progress) as bar:
                report = check_consistency(view, lambda: snapshot, redis_url, store, sample=sample, seed=seed,
                                           progress=bar.advance, on_total=bar.set_total)
        finally:
            store.close()
    below = min_score is not None and report.score < min_score
    if as_json:
        emit_json({"project": chosen, **report.to_json(top)})
        if below:
            raise typer.Exit(2)
        return
    out = console()
    style = "green" if report.score == 1.0 else "yellow" if report.score >= 0.99 else "red"
    out.print(Text(f"Consistency of {view.ref} (project '{chosen}'): ") + Text(f"{report.score:.4%}", style=f"bold {style}")
              + Text(f" of {report.values:,} values equal over {report.entities:,} entities"
                     f" ({report.seconds:.1f} s)"))
    notes = []
    if report.expired:
        notes.append(f"{report.expired:,} entities expired online (consistent)")
    if report.missing_online:
        notes.append(f"{report.missing_online:,} entities missing online")
    if report.pending_events:
        notes.append(f"{report.pending_events:,} archived events not applied online yet (left out)")
    if report.unstable:
        notes.append(f"{report.unstable:,} entities changing during every read (left out)")
    if notes:
        out.print("; ".join(notes) + ".")
    features = Table("feature", "equal", "values", "score", box=None, pad_edge=False)
    for name, (equal, total) in report.per_feature.items():
        features.add_row(name, f"{equal:,}", f"{total:,}", f"{equal / total:.4%}" if total else "-")
    out.print(features)
    worst = report.worst(top)
    if worst:
        table = Table("entity", "feature", "online", "offline", "online status", "rel. diff",
                      title=f"Worst differences ({len(report.differences):,} in "
                            f"{len(report.differing_entities):,} entities)")
        for d in worst:
            table.add_row(d.entity, d.feature, _cell(d.online), _cell(d.offline), d.status,
                          "-" if math.isinf(d.distance) else f"{d.distance:.3g}")
        out.print(table)
    if below:
        raise typer.Exit(2)
