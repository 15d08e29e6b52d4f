"""The data both sides hold: demo events through featurestream's real stream path, featurestream's
values read back, and those values written as Feast's Parquet sources (project venv).

* ``ingest``: demo events (``featurestream.demo.generator``) spread over the last ``span_s``
  seconds, in Kafka-like records (partition by key, offsets, record time = send time), through
  ``SourceProcessor`` into Redis (online state) and PostgreSQL (raw archive, history), no Kafka.
* ``read_online``: every user's values of a view as featurestream serves them at one instant
  (``OnlineService`` with that instant as its clock) -> Feast's online rows (event_timestamp =
  that instant, so ``feast materialize`` writes exactly these values).
* ``read_history``: featurestream's values of a view as of each of a user's events (the as-of
  path: windows end at the event's time) -> Feast's offline feature rows, the kind of rows a
  Feast user's batch job would compute: the value as of each event.
* ``write_labels``: label rows for training sets: users drawn like the events' users at times
  uniform over the data's span, and 10% at exactly the time of one of the user's events.
"""

from __future__ import annotations

import random
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from featurestream.definitions.models import ProjectDefinition
from featurestream.demo.generator import from_millis, generate_transactions, to_millis
from featurestream.registry import Registry
from featurestream.registry.records import ProjectSnapshot
from featurestream.serving.asof import AsOfService
from featurestream.serving.service import OnlineService, ServingLimits
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.storage.online.redis_store import RedisOnlineStore
from featurestream.stream_jobs.processor import Record, SourceProcessor, ViewRuntime

PARTITIONS = 4
BATCH = 2000
ARROW_TYPES = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string(),
               "timestamp": pa.timestamp("us", tz="UTC"), "bool": pa.bool_()}


@dataclass
class Ingested:
    events: int
    valid: int
    dead_letters: int
    late: int
    seconds: float
    start_ms: int
    end_ms: int
    users: Counter[str] = field(default_factory=Counter)
    """Valid events per user (lookups are drawn with these weights)."""
    event_times: dict[str, list[int]] = field(default_factory=dict)
    """Distinct event times (ms) of each user's valid events."""


def runtimes(snapshot: ProjectSnapshot, views: list[str]) -> list[ViewRuntime]:
    definition = snapshot.definition
    out = []
    for version in snapshot.views:
        if version.name in views:
            entity, source = definition.entity(version.spec.entity), definition.source(version.spec.source)
            assert entity is not None and source is not None
            out.append(ViewRuntime.build(version.spec, version.version, entity, source))
    return out


def ingest(
    postgres_url: str, redis_url: str, snapshot: ProjectSnapshot, views: list[str], events: int, users: int,
    span_s: float, end_ms: int, seed: int, log: Callable[[str], None],
) -> Ingested:
    definition = snapshot.definition
    source = definition.source("transactions")
    assert source is not None
    rate = events / span_s
    start_ms = end_ms - round(span_s * 1000)
    clock = [start_ms]
    processor = SourceProcessor(
        source, runtimes(snapshot, views), RedisOnlineStore(redis_url, snapshot.project),
        PostgresOfflineStore(postgres_url), clock_ms=lambda: clock[0],
    )
    stats = Ingested(events, 0, 0, 0, 0.0, start_ms, end_ms)
    times: dict[str, set[int]] = {}
    offsets = [0] * PARTITIONS
    batch: list[Record] = []
    started = time.perf_counter()

    def flush() -> None:
        clock[0] = max(r.timestamp_ms for r in batch)
        result = processor.process(batch)
        stats.valid += result.valid
        stats.dead_letters += len(result.dead_letters)
        stats.late += sum(result.late.values())
        batch.clear()

    try:
        for event in generate_transactions(events, seed, now=from_millis(start_ms), rate=rate, users=users):
            partition = zlib.crc32(event.key) % PARTITIONS
            sent_ms = start_ms + round(event.index * 1000 / rate) + 20  # the broker's record time
            batch.append(Record(partition, offsets[partition], sent_ms, event.value))
            offsets[partition] += 1
            if event.event_time is not None:
                stats.users[event.user_id] += 1
                times.setdefault(event.user_id, set()).add(to_millis(event.event_time))
            if len(batch) == BATCH:
                flush()
                if stats.valid % 10_000 < BATCH:
                    log(f"  {stats.valid + stats.dead_letters:,} events processed")
        if batch:
            flush()
    finally:
        processor.close()
        processor.online.close()
        processor.offline.close()
    stats.seconds = time.perf_counter() - started
    stats.event_times = {u: sorted(t) for u, t in times.items()}
    return stats


def feature_types(snapshot: ProjectSnapshot, view: str) -> dict[str, str]:
    """featurestream's output type of each feature of ``view`` (int64, float64, string, timestamp, bool)."""
    (runtime,) = runtimes(snapshot, [view])
    source = snapshot.definition.source(runtime.view.source)
    assert source is not None
    dtypes = runtime.dtypes(source)
    return {f.name: dtypes[f.name] for f in runtime.view.features}


def _rows_table(snapshot: ProjectSnapshot, view: str, users: list[str], times_ms: list[int],
                values: list[list[Any]]) -> pa.Table:
    types = feature_types(snapshot, view)
    columns: dict[str, pa.Array] = {
        "user_id": pa.array(users, pa.string()),
        "event_timestamp": pa.array([t * 1000 for t in times_ms], pa.timestamp("us", tz="UTC")),
    }
    for j, (name, dtype) in enumerate(types.items()):
        column = [row[j] for row in values]
        if dtype == "timestamp":
            column = [None if v is None else int(v.timestamp() * 1_000_000) for v in column]
        columns[name] = pa.array(column, ARROW_TYPES[dtype])
    return pa.table(columns)


def read_online(postgres_url: str, redis_url: str, project: str, view: str, users: list[str], at_ms: int) -> pa.Table:
    """Every user's values of ``view`` as featurestream serves them at ``at_ms``."""
    snapshot = Registry(postgres_url).snapshot(project)
    service = OnlineService(lambda: snapshot, redis_url, clock_ms=lambda: at_ms,
                            limits=ServingLimits(max_entities=len(users) + 1, max_features=1000))
    try:
        names = list(feature_types(snapshot, view))
        values: list[list[Any]] = []
        for start in range(0, len(users), 1000):
            rows = service.get_online([{"user_id": u} for u in users[start : start + 1000]], [f"{view}:{n}" for n in names])
            values.extend([v.value for v in row.values] for row in rows.rows)
    finally:
        service.close()
    return _rows_table(snapshot, view, users, [at_ms] * len(users), values)


def read_history(postgres_url: str, project: str, view: str, event_times: dict[str, list[int]]) -> pa.Table:
    """featurestream's values of ``view`` as of each (user, event time)."""
    snapshot = Registry(postgres_url).snapshot(project)
    pairs = [(u, t) for u in sorted(event_times) for t in event_times[u]]
    service = AsOfService(lambda: snapshot, postgres_url, limits=ServingLimits(max_entities=len(pairs) + 1))
    try:
        names = list(feature_types(snapshot, view))
        values: list[list[Any]] = []
        for start in range(0, len(pairs), 20_000):
            chunk = pairs[start : start + 20_000]
            rows = service.get_as_of([({"user_id": u}, t) for u, t in chunk], [f"{view}:{n}" for n in names])
            values.extend([v.value for v in row.values] for row in rows.rows)
    finally:
        service.close()
    return _rows_table(snapshot, view, [u for u, _ in pairs], [t for _, t in pairs], values)


def write_labels(path: Path, rows: int, data: Ingested, seed: int, exact_share: float = 0.1) -> None:
    """``label_id, user_id, event_timestamp, exact`` (exact: the time of one of the user's events)."""
    rng = random.Random(seed)
    users = list(data.users)
    weights = [data.users[u] for u in users]
    chosen = rng.choices(users, weights, k=rows)
    lo, hi = data.start_ms + 3_600_000, data.end_ms
    stamps, exact = [], []
    for user in chosen:
        if rng.random() < exact_share:
            stamps.append(rng.choice(data.event_times[user]))
            exact.append(True)
        else:
            stamps.append(rng.randint(lo, hi))
            exact.append(False)
    table = pa.table({
        "label_id": pa.array(range(rows), pa.int64()),
        "user_id": pa.array(chosen, pa.string()),
        "event_timestamp": pa.array([t * 1000 for t in stamps], pa.timestamp("us", tz="UTC")),
        "exact": pa.array(exact, pa.bool_()),
    })
    pq.write_table(table, path, row_group_size=200_000)


def apply_demo(postgres_url: str, definition: ProjectDefinition) -> ProjectSnapshot:
    registry = Registry(postgres_url)
    registry.apply(definition)
    return registry.snapshot(definition.project.name)


def now_ms() -> int:
    return to_millis(datetime.now(UTC))
