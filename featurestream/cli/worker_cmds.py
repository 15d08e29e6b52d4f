"""`featurestream worker`: run the stream jobs of the applied project."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from featurestream.cli.app import app


@app.command()
def worker(
    project: Annotated[str | None, typer.Option("--project", "-p", help="Project (default: the only one).")] = None,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics on this port (0: off).")] = 9108,
    metrics_host: Annotated[str, typer.Option(help="Address the metrics server listens on.")] = "127.0.0.1",
    batch_size: Annotated[int, typer.Option(help="Most records per batch.")] = 2000,
    batch_within: Annotated[float, typer.Option(help="Longest wait to fill a batch, seconds.")] = 0.05,
    fetch_max_wait: Annotated[int, typer.Option(help="Longest time the broker may hold a fetch that has "
                                                "nothing new, milliseconds (bounds how late an event is seen).",
                                                min=1)] = 100,
    session_timeout: Annotated[float, typer.Option(help="Consumer group session timeout, seconds.")] = 30.0,
    heartbeat_interval: Annotated[float, typer.Option(help="Consumer group heartbeat interval, seconds.")] = 3.0,
    history: Annotated[bool, typer.Option(help="Write feature history rows to PostgreSQL.")] = True,
    child_process: Annotated[bool, typer.Option(help="Fold and store batches in a child process (a second core) "
                                                "while Faust reads the next; off: on a thread of this process.")] = True,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "warning",
) -> None:
    """Consume every source topic of the project and keep its feature views up to date.

    Several workers started with the same project share the topics' partitions.
    """
    import faust
    from prometheus_client import start_http_server

    from featurestream.config import require
    from featurestream.devstack.topics import create_topics
    from featurestream.registry import Registry
    from featurestream.stream_jobs.app import WorkerSettings, build_app, build_runtimes

    postgres_url = require("postgres_url")
    registry = Registry(postgres_url)
    projects = registry.projects()
    if project is None:
        if len(projects) != 1:
            raise typer.BadParameter(f"name the project with --project (registry holds: {', '.join(projects) or 'none'})")
        project = projects[0]
    snapshot = registry.snapshot(project)
    definition = snapshot.definition
    runtimes = build_runtimes(definition, [(v.spec, v.version) for v in snapshot.views])
    settings = WorkerSettings(
        kafka_bootstrap=require("kafka_bootstrap"),
        redis_url=require("redis_url"),
        postgres_url=postgres_url,
        batch_size=batch_size,
        batch_within_s=batch_within,
        fetch_max_wait_ms=fetch_max_wait,
        session_timeout_s=session_timeout,
        heartbeat_interval_s=heartbeat_interval,
        write_history=history,
        child_process=child_process,
    )
    create_topics(settings.kafka_bootstrap, {s.topic: s.partitions for s in definition.sources if s.name in runtimes})
    if metrics_port:
        start_http_server(metrics_port, addr=metrics_host)
    logging.basicConfig(level=log_level.upper())
    faust_app = build_app(definition, runtimes, settings)
    views = ", ".join(f"{r.view.name}@{r.version}" for rs in runtimes.values() for r in rs)
    typer.echo(f"worker for project {project}: {views}", err=True)
    faust.Worker(faust_app, loglevel=log_level.upper(), quiet=True).execute_from_commandline()
