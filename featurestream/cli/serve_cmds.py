"""`featurestream serve` (the gRPC and REST servers) and `featurestream get` (a gRPC lookup)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from featurestream.cli.app import app
from featurestream.cli.registry_cmds import ProjectName, choose_project, console, fail, user_errors

if TYPE_CHECKING:
    from featurestream.registry.records import ProjectSnapshot
    from featurestream.registry.store import Registry
    from featurestream.serving.access import AccessPolicy
    from featurestream.serving.context import AsOfReader, EventPusher, UpdateFeed
    from featurestream.serving.service import OnlineService, ServingLimits

PANEL = "Serving"
log = logging.getLogger("featurestream.serve")


# ---------------------------------------------------------------- serve


def _policy(tokens: Path | None, registry: Registry, project: str) -> AccessPolicy:
    try:
        from featurestream.serving.auth import load_policy
    except ImportError:
        if tokens is not None:
            raise fail("--tokens needs featurestream.serving.auth, which this installation lacks") from None
        from featurestream.serving.access import OpenAccess

        return OpenAccess()
    return load_policy(tokens, registry=registry, project=project)


def _as_of(snapshot: Any, postgres_url: str, policy: AccessPolicy, limits: ServingLimits) -> AsOfReader | None:
    try:
        from featurestream.serving.asof import AsOfService
    except ImportError:
        return None
    service: AsOfReader = AsOfService(snapshot, postgres_url, access=policy, limits=limits)
    return service


def _push(snapshot: Any, policy: AccessPolicy) -> EventPusher | None:
    try:
        from featurestream.serving.push import PushService
    except ImportError:
        return None
    from featurestream.config import MissingServiceError, require

    try:
        bootstrap = require("kafka_bootstrap")
    except MissingServiceError:
        log.warning("no kafka_bootstrap configured: PushEvents answers UNIMPLEMENTED")
        return None
    pusher: EventPusher = PushService(snapshot, bootstrap, access=policy)
    return pusher


def _updates(snapshot: Any, redis_url: str, online: OnlineService, policy: AccessPolicy,
             limits: ServingLimits, max_streams: int) -> UpdateFeed | None:
    try:
        from featurestream.serving.updates import UpdateService
    except ImportError:
        return None
    feed: UpdateFeed = UpdateService(snapshot, redis_url, online, access=policy, limits=limits,
                                     max_subscriptions=max_streams)
    return feed


def _close(obj: object) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            log.exception("closing %s failed", type(obj).__name__)


@app.command(rich_help_panel=PANEL)
def serve(
    grpc_port: Annotated[int, typer.Option(help="gRPC port (0: any free port).")] = 6566,
    http_port: Annotated[int, typer.Option(help="REST port (-1: no REST server).")] = 6567,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    project: ProjectName = None,
    tokens: Annotated[Path | None, typer.Option(help="Tokens file (YAML); without it every caller may read "
                                                 "everything.", exists=True, dir_okay=False)] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate (chain) for TLS on both servers.",
                                                   exists=True, dir_okay=False)] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.", exists=True,
                                                  dir_okay=False)] = None,
    cache_ttl_ms: Annotated[int, typer.Option(help="Keep entity states read from Redis this long in memory "
                                              "(0: off). Bounds how late a new event shows.", min=0)] = 0,
    memo_entries: Annotated[int, typer.Option(help="Entity hashes kept decoded, reused while Redis returns the "
                                              "same bytes (every lookup still reads Redis; 0: off).",
                                              min=0)] = 4096,
    max_entities: Annotated[int, typer.Option(help="Most entities (or as-of rows) per request.", min=1)] = 1000,
    max_features: Annotated[int, typer.Option(help="Most features per request.", min=1)] = 1000,
    metrics_port: Annotated[int, typer.Option(help="Also serve Prometheus metrics on this port (0: off; "
                                              "the REST server has /metrics).", min=0)] = 0,
    registry_poll: Annotated[float, typer.Option(help="Check the registry for changes every this many "
                                                 "seconds.", min=0.1)] = 5.0,
    grace: Annotated[float, typer.Option(help="On SIGTERM/SIGINT, seconds in-flight calls get to finish.",
                                         min=0.0)] = 10.0,
    grpc_workers: Annotated[int, typer.Option(help="gRPC worker threads.", min=2)] = 64,
    max_streams: Annotated[int, typer.Option(help="Most open StreamFeatureUpdates calls (each holds a worker "
                                             "thread; must be below --grpc-workers).", min=1)] = 32,
    drain_delay: Annotated[float, typer.Option(help="On SIGTERM/SIGINT, report NOT_SERVING and keep answering "
                                               "this many seconds before refusing new calls.", min=0.0)] = 0.0,
    gc_tuning: Annotated[bool, typer.Option(help="Freeze start-up objects and raise the collector's "
                                            "thresholds once ready, then freeze what each request leaves "
                                            "(the read memo) so that full collections stay short.")] = True,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Serve the project's features over gRPC and REST until SIGTERM or SIGINT.

    Online lookups read Redis; as-of lookups the offline store (PostgreSQL); the registry is
    polled for new definitions. Stopping refuses new calls and lets in-flight ones finish.
    """
    from psycopg_pool import ConnectionPool

    from featurestream.config import require
    from featurestream.gc_tuning import tune_gc
    from featurestream.registry.store import Registry
    from featurestream.serving.catalog_api import RegistryCatalog
    from featurestream.serving.context import ServingContext
    from featurestream.serving.grpc_server import GrpcServer, GrpcSettings
    from featurestream.serving.service import OnlineService, ServingLimits
    from featurestream.serving.snapshots import SnapshotProvider

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (tls_cert is None) != (tls_key is None):
        raise fail("TLS needs both --tls-cert and --tls-key")
    if max_streams >= grpc_workers:
        raise fail(f"--max-streams ({max_streams}) must be below --grpc-workers ({grpc_workers}): "
                   "streams would leave no thread for lookups")
    with ExitStack() as cleanup:
        with user_errors():
            postgres_url = require("postgres_url")
            redis_url = require("redis_url")
            pool: ConnectionPool[Any] = ConnectionPool(postgres_url, min_size=1, max_size=4, open=True,
                                                       timeout=10.0, kwargs={"connect_timeout": 5})
            cleanup.callback(pool.close)
            registry = Registry(pool=pool)
            project = choose_project(registry, project)
            snapshots = SnapshotProvider(registry, project, poll_s=registry_poll)
        cleanup.callback(snapshots.close)
        snapshot: ProjectSnapshot = snapshots()
        try:
            policy = _policy(tokens, registry, project)
        except (ValueError, OSError) as exc:  # a refused tokens file lists its problems
            raise fail(str(exc)) from None
        cleanup.callback(_close, policy)
        limits = ServingLimits(max_entities=max_entities, max_features=max_features)
        online = OnlineService(snapshots, redis_url, limits=limits, cache_ttl_ms=cache_ttl_ms, access=policy,
                               memo_entries=memo_entries)
        cleanup.callback(online.close)
        as_of = _as_of(snapshots, postgres_url, policy, limits)
        push = _push(snapshots, policy)
        updates = _updates(snapshots, redis_url, online, policy, limits, max_streams)
        for part in (as_of, push, updates):
            if part is not None:
                cleanup.callback(_close, part)
        catalog = RegistryCatalog(registry, snapshots)
        snapshots.add_reload_listener(catalog.invalidate)
        context = ServingContext(online=online, access=policy, as_of=as_of, push=push, updates=updates, catalog=catalog)

        try:
            grpc_server = GrpcServer(context, GrpcSettings(
                host=host, port=grpc_port, max_workers=grpc_workers, max_streams=max_streams,
                tls_cert=tls_cert, tls_key=tls_key, grace_s=grace, drain_delay_s=drain_delay))
        except OSError as exc:
            raise fail(str(exc)) from None
        # REST first: gRPC health turns SERVING only once both front ends answer.
        rest = _start_rest(context, host, http_port, tls_cert, tls_key, grace, log_level) if http_port >= 0 else None
        if rest is not None:
            cleanup.callback(_stop_rest, rest, grace)
        grpc_server.start()
        cleanup.callback(grpc_server.stop)
        if metrics_port:
            from prometheus_client import start_http_server

            start_http_server(metrics_port, addr=host)
        if gc_tuning:
            tune_gc()

        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("%s: shutting down (grace %gs)", signal.Signals(signum).name, grace)
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        scheme = "https" if tls_cert else "http"
        missing = [name for name, part in (("as-of", as_of), ("push", push), ("updates", updates)) if part is None]
        typer.echo(
            f"serving project {project} (registry version {snapshot.registry_version}): "
            f"gRPC {host}:{grpc_server.port}{' (TLS)' if tls_cert else ''}"
            + (f", REST {scheme}://{host}:{rest[0].config.port}" if rest else "")
            + (f"; not available: {', '.join(missing)}" if missing else ""),
            err=True,
        )
        try:
            while not stop.wait(0.5):
                if rest is not None and not rest[1].is_alive():
                    log.error("the REST server stopped unexpectedly; shutting down")
                    break
        finally:
            started = time.monotonic()
            for sig, handler in previous.items():  # a second signal is not graceful any more
                signal.signal(sig, handler)
            if rest is not None:  # both front ends drain at once, after the drain delay
                threading.Timer(drain_delay, setattr, (rest[0], "should_exit", True)).start()
            grpc_server.stop()
            if rest is not None:
                _stop_rest(rest, grace)
            log.info("stopped in %.2fs", time.monotonic() - started)


def _stop_rest(rest: tuple[Any, threading.Thread], grace: float) -> None:
    server, thread = rest
    server.should_exit = True
    thread.join(timeout=grace + 5.0)


def _start_rest(context: Any, host: str, port: int, tls_cert: Path | None, tls_key: Path | None,
                grace: float, log_level: str) -> tuple[Any, threading.Thread] | None:
    """uvicorn in a thread (one process, no worker recycling), or None when rest.py is absent."""
    try:
        from featurestream.serving.rest import build_app
    except ImportError as exc:
        log.warning("no REST server: %s", exc)
        return None
    import uvicorn

    config = uvicorn.Config(
        build_app(context), host=host, port=port, log_level=log_level.lower(), access_log=False,
        timeout_graceful_shutdown=max(1, int(grace)), lifespan="off",
        ssl_certfile=str(tls_cert) if tls_cert else None, ssl_keyfile=str(tls_key) if tls_key else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="rest", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15.0
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise fail(f"the REST server did not start on {host}:{port} (port in use?)")
        time.sleep(0.02)
    if port == 0 and server.servers:
        sockets = server.servers[0].sockets
        if sockets:
            config.port = sockets[0].getsockname()[1]
    return server, thread


# ---------------------------------------------------------------- get


def parse_entity(text: str) -> dict[str, str]:
    """``user_id=u1`` or ``a=1,b=2`` -> join keys."""
    keys: dict[str, str] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"'{text}': give join keys as key=value[,key=value]", param_hint="--entity")
        keys[name.strip()] = value.strip()
    return keys


_STATUS_STYLE = {"PRESENT": "green", "STALE": "yellow", "INVALID": "red", "MISSING": "dim"}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


@app.command(rich_help_panel=PANEL)
def get(
    entity: Annotated[list[str], typer.Option("--entity", "-e", help="Join keys of one entity: key=value "
                                              "(several keys: a=1,b=2). Repeatable.")],
    feature: Annotated[list[str] | None, typer.Option("--feature", "-f", help="view:feature, or a view for all "
                                                       "its features. Repeatable.")] = None,
    feature_service: Annotated[str, typer.Option("--feature-service", "-s", help="A feature service.")] = "",
    server: Annotated[str, typer.Option(help="gRPC server host:port.", envvar="FEATURESTREAM_SERVER")] = "localhost:6566",
    token: Annotated[str | None, typer.Option(help="Bearer token.", envvar="FEATURESTREAM_TOKEN")] = None,
    tls: Annotated[bool, typer.Option(help="Connect with TLS (system root certificates).")] = False,
    tls_ca: Annotated[Path | None, typer.Option(help="Connect with TLS trusting this PEM root certificate.",
                                                exists=True, dir_okay=False)] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Look up fresh feature values on a running server (gRPC)."""
    from featurestream.serving.client import Client, ClientError

    entities = [parse_entity(e) for e in entity]
    if not feature and not feature_service:
        raise typer.BadParameter("name features with --feature or a --feature-service", param_hint="--feature")
    with Client(server, token=token, tls=tls_ca if tls_ca else tls, timeout=timeout) as client:
        try:
            result = client.get_online(entities, features=feature or [], feature_service=feature_service)
        except ClientError as exc:
            raise fail(f"{exc.code}: {exc.message}") from None
    if as_json:
        typer.echo(json.dumps({"results": result.results}))
        return
    table = Table("entity", "feature", "value", "status", "event time", box=None, pad_edge=False)
    for row in result.results:
        who = ",".join(f"{k}={v}" for k, v in row["entity"].items())
        for name in result.feature_names:
            cell = row["features"][name]
            status = cell["status"]
            table.add_row(who, name, _cell(cell["value"]), Text(status, style=_STATUS_STYLE.get(status, "")),
                          cell["event_time"] or "-")
    console().print(table)
    sys.stdout.flush()
