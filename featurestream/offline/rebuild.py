"""Online state rebuilt from the raw event archive: one entity (``rebuild_entity_states``) or a
whole feature view version (``materialize``, after a Redis loss or for a new version).

The state is built exactly as the stream worker builds it (``stream_jobs/processor.py``): one
sub-state per source partition from that partition's events, sequences = Kafka offsets, the
partition's applied offset = its largest offset and its newest event time, the head starting
``COMPACT_GRACE_MS`` before now and tiles pruned at now. The worker's replay check
(offset <= stored offset) therefore works on a rebuilt state as on its own.

Which entities ``materialize`` writes: those whose Redis key would still exist had the worker
written it: every entity of a view without a TTL (lifetime features only), else those whose
last write (approximated by their newest arrival time) is less than the view's online TTL ago;
the key gets the TTL it has left. Others are not written (their key is deleted if present): serving
answers MISSING for them, as it would once their key had expired. An entity whose windows are
merely empty is still written: until its key expires, serving answers count 0 / sum 0 for it
(PRESENT), not MISSING.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from itertools import groupby
from operator import attrgetter
from typing import Any, Protocol

from psycopg import sql

from featurestream.aggregation.view import ViewAggregator
from featurestream.aggregation.windows import from_millis
from featurestream.definitions.models import ProjectDefinition, Source
from featurestream.registry.store import Registry
from featurestream.storage.offline.base import ArchivedEvent
from featurestream.storage.offline.layout import qualified, table_exists, table_name
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.storage.online.redis_store import EntityKey, PartitionState, RedisOnlineStore
from featurestream.stream_jobs.processor import COMPACT_GRACE_MS, ViewRuntime

Progress = Callable[[int], None]
"""Called with how many units (entities) were just finished."""


class OfflineError(Exception):
    """An offline job that cannot run as asked (a user error: no traceback in the CLI)."""


class PartitionedEvent(Protocol):
    """What a rebuild needs of an event (``ArchivedEvent`` has it)."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def event_time_ms(self) -> int: ...
    @property
    def fields(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------- one entity


def rebuild_entity_states(
    agg: ViewAggregator, events: Iterable[PartitionedEvent], now_ms: int, *, grace_ms: int = COMPACT_GRACE_MS
) -> dict[int, PartitionState]:
    """The online state of one entity from its events, split per source partition as the worker
    splits it: ``{partition: PartitionState(state, max offset, newest event ms)}``.

    Events may come in any order and twice (e.g. the archive plus an in-flight batch): each
    (partition, offset) counts once. Events are folded in offset order, the worker's arrival
    order, so float sums add in the same order as far as possible. Cost: one sort and one fold
    per event, plus the prune.
    """
    by_partition: dict[int, list[PartitionedEvent]] = {}
    for event in events:
        items = by_partition.get(event.partition)
        if items is None:
            by_partition[event.partition] = [event]
        else:
            items.append(event)
    out: dict[int, PartitionState] = {}
    head_start = now_ms - grace_ms
    for partition, items in by_partition.items():
        items.sort(key=attrgetter("offset"))
        offsets: list[int] = []
        fields: list[dict[str, Any]] = []
        newest = items[0].event_time_ms
        last = None
        for event in items:
            if event.offset == last:
                continue
            last = event.offset
            offsets.append(event.offset)
            fields.append(event.fields)
            if event.event_time_ms > newest:
                newest = event.event_time_ms
        state = agg.new_state(head_start)
        agg.prune(state, now_ms)  # before the fold: events for pruned tiles are late, as online
        agg.fold(state, fields, offsets)
        out[partition] = PartitionState(state, offsets[-1], newest)
    return out


def remaining_ttl(ttl: timedelta | None, last_write_ms: int, now_ms: int) -> timedelta | None:
    """How long the entity's key has left if it was last written at ``last_write_ms``;
    None: no expiry; zero or less: it would have expired."""
    if ttl is None:
        return None
    return timedelta(milliseconds=last_write_ms - now_ms) + ttl


# ---------------------------------------------------------------- views from the registry


@dataclass(frozen=True)
class OfflineView:
    """A feature view version with its source, as the offline jobs compute it."""

    runtime: ViewRuntime
    source: Source
    project: str = ""
    status: str = "live"

    @property
    def name(self) -> str:
        return self.runtime.view.name

    @property
    def version(self) -> int:
        return self.runtime.version

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def key_fields(self) -> tuple[str, ...]:
        return self.runtime.key_fields

    @property
    def agg(self) -> ViewAggregator:
        return self.runtime.agg

    def dtypes(self) -> dict[str, str]:
        """Join key and feature types (the history table's columns)."""
        return self.runtime.dtypes(self.source)

    @classmethod
    def of(cls, definition: ProjectDefinition, spec: Any, version: int, *, status: str = "live") -> OfflineView:
        entity = definition.entity(spec.entity)
        source = definition.source(spec.source)
        if entity is None or source is None:
            missing = f"entity '{spec.entity}'" if entity is None else f"source '{spec.source}'"
            raise OfflineError(
                f"feature view {spec.name}@{version}: its {missing} is not in project '{definition.project.name}'"
            )
        runtime = ViewRuntime.build(spec, version, entity, source)
        return cls(runtime, source, definition.project.name, status)

    @classmethod
    def from_registry(cls, registry: Registry, project: str, ref: str) -> OfflineView:
        """``name`` (its latest live version) or ``name@N`` (that version, whatever its status)."""
        stored = registry.view(project, ref)
        return cls.of(registry.load_project(project), stored.spec, stored.version, status=stored.status)


def archive_table(source: Source) -> str:
    """``fs_offline.raw__{source}`` as text, for messages."""
    return f"fs_offline.{table_name('raw', source.name)}"


def require_archive(store: PostgresOfflineStore, source: Source) -> None:
    """A clear error when nothing was ever archived for ``source``."""
    if not table_exists(store.connection, table_name("raw", source.name)):
        raise OfflineError(
            f"no event archive for source '{source.name}' ({archive_table(source)} does not exist): "
            "the stream worker creates it when it first runs on the source"
        )


def count_entities(
    store: PostgresOfflineStore, source: Source, key_fields: tuple[str, ...],
    start_ms: int | None = None, end_ms: int | None = None,
) -> int:
    """Distinct entities with an event in [start, end] (the progress bars' total)."""
    keys = sql.SQL(", ").join(map(sql.Identifier, key_fields))
    where, params = time_filter(key_fields, start_ms, end_ms)
    query = sql.SQL("select count(*) from (select distinct {} from {} where {}) k").format(
        keys, qualified(table_name("raw", source.name)), where
    )
    row = store.connection.execute(query, params).fetchone()
    return int(row[0]) if row else 0


def time_filter(
    key_fields: tuple[str, ...], start_ms: int | None, end_ms: int | None
) -> tuple[sql.Composable, list[Any]]:
    """``true [and keys not null] [and event_time >= start] [and event_time <= end]`` (ms, both
    inclusive)."""
    parts: list[sql.Composable] = [sql.SQL("true")]
    parts += [sql.SQL("{} is not null").format(sql.Identifier(k)) for k in key_fields]
    params: list[Any] = []
    if start_ms is not None:
        parts.append(sql.SQL("event_time >= %s"))
        params.append(from_millis(start_ms))
    if end_ms is not None:
        parts.append(sql.SQL("event_time <= %s"))
        params.append(from_millis(end_ms))
    return sql.SQL(" and ").join(parts), params


def close_stream(stream: Iterator[Any]) -> None:
    """End a ``read_events`` stream now (its server-side cursor and transaction), not at GC."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def entity_events(
    stream: Iterator[tuple[EntityKey, ArchivedEvent]],
) -> Iterator[tuple[EntityKey, list[ArchivedEvent]]]:
    """(key, events) per entity from ``read_events``' key-ordered stream; null keys skipped."""
    for key, items in groupby(stream, key=lambda item: item[0]):
        if None in key:
            continue
        yield key, [event for _, event in items]


# ---------------------------------------------------------------- materialize


@dataclass
class MaterializeStats:
    view: str
    version: int
    now_ms: int
    entities: int = 0
    written: int = 0
    expired: int = 0
    """Entities not written: their key would have expired (see the module docstring)."""
    events: int = 0
    seconds: float = 0.0
    partitions: set[int] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        return {
            "view": self.view,
            "version": self.version,
            "now_ms": self.now_ms,
            "entities": self.entities,
            "written": self.written,
            "expired": self.expired,
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "entities_per_second": round(self.entities / self.seconds) if self.seconds else None,
            "events_per_second": round(self.events / self.seconds) if self.seconds else None,
            "partitions": sorted(self.partitions),
        }


class _Writer:
    """``replace()`` calls on a few threads, so Redis round trips overlap the rebuilding."""

    def __init__(self, online: RedisOnlineStore, threads: int, in_flight: int) -> None:
        self.online = online
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="featurestream-materialize")
        self.pending: deque[Future[Any]] = deque()
        self.in_flight = in_flight

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.in_flight:
            self.pending.popleft().result()

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def materialize(
    view: OfflineView,
    store: PostgresOfflineStore,
    online: RedisOnlineStore,
    *,
    now_ms: int | None = None,
    progress: Progress | None = None,
    threads: int = 4,
) -> MaterializeStats:
    """Rewrite the online state of every entity of ``view`` in Redis from the event archive.

    Run it while no worker writes this view version (before the worker first runs it, or with
    the worker stopped): the worker caches states in memory, and would write its own on top.
    The worker then resumes from its committed Kafka offsets and skips, per entity and
    partition, what the rebuilt state already holds.
    """
    now = int(time.time() * 1000) if now_ms is None else now_ms
    require_archive(store, view.source)
    stats = MaterializeStats(view.name, view.version, now)
    ttl = view.runtime.ttl
    agg = view.agg
    started = time.perf_counter()
    writer = _Writer(online, threads, in_flight=threads * 64)
    stream = store.read_events(view.source, view.key_fields, None, None)
    try:
        for key, events in entity_events(stream):
            stats.entities += 1
            stats.events += len(events)
            left = remaining_ttl(ttl, max(e.arrival_ms for e in events), now)
            if left is not None and left <= timedelta(0):
                stats.expired += 1
                writer.submit(online.client.delete, online.key(view.name, view.version, key))
            else:
                subs = rebuild_entity_states(agg, events, now)
                stats.partitions.update(subs)
                stats.written += 1
                writer.submit(online.replace, view.name, view.version, agg, key, subs, left)
            if progress is not None:
                progress(1)
        writer.drain()
    finally:
        close_stream(stream)
        writer.close()
    stats.seconds = time.perf_counter() - started
    return stats
