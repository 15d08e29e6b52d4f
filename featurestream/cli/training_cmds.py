"""`featurestream training-set`: labels in, point-in-time correct features out. See docs/training_sets.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from featurestream.cli.app import app
from featurestream.cli.registry_cmds import (
    AsJson,
    PostgresUrl,
    ProjectName,
    console,
    emit_json,
    fail,
    user_errors,
)


@app.command("training-set", rich_help_panel="Offline")
def training_set_cmd(
    labels: Annotated[
        Path,
        typer.Option(
            "--labels",
            help="Label rows: CSV or Parquet with the join keys, a timestamp and any label columns.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the training set: .parquet or .csv.")],
    feature: Annotated[
        list[str] | None,
        typer.Option(
            "--feature",
            "-f",
            help="VIEW (all its features), VIEW:FEATURE, or VIEW@N:FEATURE for a live version. Repeatable.",
            metavar="VIEW[:FEATURE]",
        ),
    ] = None,
    feature_service: Annotated[
        list[str] | None,
        typer.Option("--feature-service", help="Every feature of this feature service. Repeatable."),
    ] = None,
    timestamp_column: Annotated[
        str, typer.Option("--timestamp-column", help="Column holding each row's point in time.")
    ] = "event_timestamp",
    as_of_arrival: Annotated[
        bool,
        typer.Option(
            "--as-of-arrival", help="Count only events that had also arrived (archived arrival time) by then."
        ),
    ] = False,
    status: Annotated[
        bool, typer.Option("--status/--no-status", help="Add a <feature>__status column per feature.")
    ] = True,
    workers: Annotated[
        int,
        typer.Option("--workers", min=1, help="Processes evaluating entities in parallel (each ~200 MB)."),
    ] = 1,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show progress on stderr.")
    ] = True,
    spill_dir: Annotated[
        Path | None,
        typer.Option("--spill-dir", help="Directory for temporary files (default: the system's)."),
    ] = None,
    project: ProjectName = None,
    postgres_url: PostgresUrl = None,
    as_json: AsJson = False,
) -> None:
    """Build a training set: every label row with its features as served at the row's timestamp.

    Windows end at the row's timestamp and nothing after it counts; a value older than its
    max_age is null with status STALE; unknown entities get nulls (MISSING). Input columns and
    row order are kept as given. The file appears only when complete.
    """
    from featurestream.offline.features import TrainingSetError
    from featurestream.offline.labels import file_format
    from featurestream.offline.progress import reporter
    from featurestream.offline.training import write_training_set

    if not feature and not feature_service:
        raise fail("name at least one --feature VIEW[:FEATURE] or --feature-service")
    try:
        file_format(out)
    except TrainingSetError as exc:
        raise fail(str(exc)) from None
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")
    report = reporter(progress)
    done = False
    with user_errors():
        try:
            summary = write_training_set(
                labels,
                partial,
                feature or [],
                project=project,
                postgres_url=postgres_url,
                timestamp_column=timestamp_column,
                as_of_arrival=as_of_arrival,
                feature_services=feature_service or [],
                status_columns=status,
                workers=workers,
                progress=report,
                spill_dir=spill_dir,
            )
            done = True
        except TrainingSetError as exc:
            raise fail(str(exc)) from None
        finally:
            report.close()
            if not done:  # never leave half a file behind
                partial.unlink(missing_ok=True)
        partial.replace(out)
    if as_json:
        emit_json(
            {
                "out": str(out),
                "rows": summary.rows,
                "features": summary.features,
                "seconds": round(summary.seconds, 3),
                "statuses": summary.statuses,
            }
        )
        return
    con = console()
    con.print(
        f"wrote {summary.rows:,} rows x {len(summary.features)} features to {out} in {summary.seconds:.1f} s",
        highlight=False,
    )
    if summary.statuses and summary.rows:
        table = Table("feature", "PRESENT", "MISSING", "STALE", "INVALID", title="statuses (share of rows)")
        for name, counts in summary.statuses.items():
            table.add_row(
                name, *(f"{counts[s] / summary.rows:.1%}" for s in ("PRESENT", "MISSING", "STALE", "INVALID"))
            )
        con.print(table)
