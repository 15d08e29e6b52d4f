"""Services and data for the serving benchmark (``bench/serving.py``).

Services (no Kafka: the events go through ``SourceProcessor`` in this process):

* PostgreSQL: a throwaway database ``fs_servebench_<pid>_<random>`` (dropped at the end) on the
  server of ``FEATURESTREAM_POSTGRES_URL``, else ``postgresql://postgres@127.0.0.1:5432/postgres``.
  It holds the registry and the raw-event archive the processor writes.
* Redis: ``FEATURESTREAM_REDIS_URL``, else database ``redis_db`` (6 by default; the test suite flushes 9-15) of 127.0.0.1:6379.
  The project name is unique per run (``servebench<hex>``), so its keys (``fs:{project}:*``)
  never meet anyone else's; they are deleted at the end.

Data: ``generate_transactions`` spread evenly over the day before now (so a 24 h window spans
288 five-minute tiles and a 7 d window 24-25 hour tiles for the active users), fed in event-time
order, in batches of 2000 records with partitions and offsets as the worker would see them, to
the real ``SourceProcessor`` (history rows off: serving never reads them; the archive is written).
"""

from __future__ import annotations

import os
import random
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
from _stack import MACHINE_POSTGRES, MACHINE_REDIS, run_cleanups, with_path
from psycopg import sql

from featurestream.config import ENV_POSTGRES, ENV_REDIS
from featurestream.definitions.loader import load_project
from featurestream.definitions.models import ProjectDefinition
from featurestream.demo.generator import generate_transactions
from featurestream.registry import Registry
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.storage.online.redis_store import RedisOnlineStore
from featurestream.stream_jobs.app import build_runtimes
from featurestream.stream_jobs.processor import Record, SourceProcessor

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "definitions"
VIEWS = ("user_transactions", "user_spending_profile")
DAY_S = 86_400


def log(message: str) -> None:
    import sys

    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Services:
    postgres_url: str
    redis_url: str
    described: dict[str, str]
    _cleanups: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        run_cleanups(self._cleanups)


def start_services(redis_db: int) -> Services:
    services = Services("", "", {})
    try:
        admin = os.environ.get(ENV_POSTGRES) or MACHINE_POSTGRES
        origin = ENV_POSTGRES if os.environ.get(ENV_POSTGRES) else "machine server"
        name = f"fs_servebench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))

        def drop() -> None:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))

        services._cleanups.append(drop)
        services.postgres_url = with_path(admin, f"/{name}") if "://" in admin else f"{admin} dbname={name}"
        services.described["postgres"] = f"database {name} on the {origin}"

        url = os.environ.get(ENV_REDIS)
        if url:
            services.described["redis"] = f"{url} (from {ENV_REDIS})"
        else:
            url = with_path(MACHINE_REDIS, f"/{redis_db}")
            services.described["redis"] = f"{url} (machine server, database {redis_db})"
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        services.redis_url = url
    except BaseException:
        services.close()
        raise
    return services


def bench_definition(project: str) -> ProjectDefinition:
    """The demo definitions under project name ``project``, with the user views only (the
    merchant view would only slow the load down; feature services and consumers name it)."""
    demo = load_project(DEMO)
    return demo.model_copy(
        update={
            "project": demo.project.model_copy(update={"name": project}),
            "feature_views": tuple(v for v in demo.feature_views if v.name in VIEWS),
            "feature_services": (),
            "consumers": (),
        }
    )


@dataclass
class Dataset:
    project: str
    events: int
    valid: int
    users_with_events: int
    traffic_users: list[str]
    """User ids of the valid events, in event order: sampling it picks users as often as they pay
    (the fraud scorer scores every transaction)."""
    active_users: list[str]
    load_seconds: float
    view_versions: dict[str, int]
    span_hours: float


def apply_definitions(services: Services, project: str) -> dict[str, int]:
    """Apply the benchmark's definitions to the registry; the live version of each view."""
    Registry(services.postgres_url).apply(bench_definition(project), message="serving benchmark")
    snapshot = Registry(services.postgres_url).snapshot(project)
    return {v.spec.name: v.version for v in snapshot.views}


def load(services: Services, project: str, versions: dict[str, int], events_n: int, users: int, seed: int,
         batch: int = 2000, progress: Callable[[str], None] = log) -> Dataset:
    definition = bench_definition(project)
    source = definition.source("transactions")
    assert source is not None
    runtimes = build_runtimes(definition, [(v, versions[v.name]) for v in definition.feature_views])[source.name]

    now = time.time()
    rate = events_n / DAY_S
    anchor = datetime.fromtimestamp(now - DAY_S, tz=UTC)
    events = list(generate_transactions(events_n, seed=seed, users=users, rate=rate, now=anchor))
    offsets: dict[int, int] = defaultdict(int)
    records = []
    arrival = int(now * 1000)
    for event in events:
        p = zlib.crc32(event.key) % source.partitions
        records.append(Record(p, offsets[p], arrival, event.value))
        offsets[p] += 1

    online = RedisOnlineStore(services.redis_url, project)
    offline = PostgresOfflineStore(services.postgres_url)
    processor = SourceProcessor(source, runtimes, online, offline, write_history=False)
    started = time.perf_counter()
    valid = 0
    last_note = started
    try:
        for i in range(0, len(records), batch):
            valid += processor.process(records[i : i + batch]).valid
            if time.perf_counter() - last_note > 10:
                last_note = time.perf_counter()
                progress(f"  loaded {i + batch:,} of {len(records):,} events")
    finally:
        processor.close()
        online.close()
        offline.close()
    seconds = time.perf_counter() - started
    traffic = [e.user_id for e in events if e.well_formed]
    active = sorted(set(traffic))
    return Dataset(project, events_n, valid, len(active), traffic, active, seconds, versions, DAY_S / 3600)


def state_sizes(redis_url: str, project: str, view: str, version: int, users: list[str]) -> dict[str, Any]:
    """Hash fields and bytes per entity of ``view`` for these users (how heavy a read is)."""
    client = redis.Redis.from_url(redis_url)
    try:
        pipe = client.pipeline(transaction=False)
        for u in users:
            key = f"fs:{project}:{view}:v{version}:{u}"
            pipe.hlen(key)
            pipe.memory_usage(key)
        replies = pipe.execute()
    finally:
        client.close()
    fields = sorted(int(x or 0) for x in replies[0::2])
    size = sorted(int(x or 0) for x in replies[1::2])

    def q(xs: list[int], p: float) -> int:
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else 0

    return {
        "fields_p50": q(fields, 0.5), "fields_p90": q(fields, 0.9), "fields_p99": q(fields, 0.99), "fields_max": q(fields, 1.0),
        "bytes_p50": q(size, 0.5), "bytes_p90": q(size, 0.9), "bytes_p99": q(size, 0.99), "bytes_max": q(size, 1.0),
    }


def sample_users(dataset: Dataset, how: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = dataset.traffic_users if how == "traffic" else dataset.active_users
    return [rng.choice(pool) for _ in range(n)]


def activity_summary(dataset: Dataset) -> str:
    counts = Counter(dataset.traffic_users)
    ranked = [c for _, c in counts.most_common()]
    top = max(1, len(ranked) // 100)
    return (f"{dataset.users_with_events:,} users with events; busiest 1% made "
            f"{100 * sum(ranked[:top]) / max(1, sum(ranked)):.0f}% of them; events per user: "
            f"max {ranked[0] if ranked else 0}, median {ranked[len(ranked) // 2] if ranked else 0}")
