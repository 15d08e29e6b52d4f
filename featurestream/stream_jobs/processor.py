"""One batch of one source's Kafka records -> dead letters, raw archive, feature state, history.

This is the whole stream job without Faust, so it can be tested and benchmarked alone.
Order of effects per batch, which is what makes a crash at any instant harmless:
1. the archive and the history rows are committed to PostgreSQL (idempotent by offset);
2. the entity states are written to Redis, each with the last offset it includes;
3. the caller sends the dead letters, then acknowledges the records to Kafka.
A replay skips, per entity and partition, the records at or below the stored offset.

PostgreSQL work runs on a thread of its own so that the server's time overlaps this thread's
folding and encoding: the batch's transaction opens with the archive COPY as soon as the batch
is decoded, the history rows follow once folded, and the commit precedes the Redis pipeline,
which is encoded meanwhile and sent only after the commit (so the order above holds). The
transaction takes six round trips in the common case (see ``_Transaction``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from operator import itemgetter
from typing import Any

import psycopg

from featurestream.aggregation.view import ViewAggregator
from featurestream.definitions.models import Entity, FeatureView, Source, natural_output_type
from featurestream.storage.offline.base import FeatureRow
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.storage.online.redis_store import EntityKey, EntityWrite, PartitionState, RedisOnlineStore
from featurestream.stream_jobs.events import EventDecoder, InvalidEvent

COMPACT_GRACE_MS = 250
"""Head events older than now - grace move into tiles; reads at or after that stay exact.

The grace only has to cover how far a reader's clock may lag this worker's (a read at T before
the head start may count events in (T, head start] of T's tile); hosts synchronised by NTP are
milliseconds apart. A history row (at its entity's newest event of the batch) stays exact too:
an event that skips the head (older than the grace on arrival) finds in its tile only events
processed before it, which are older unless the entity's events arrive out of order across
batches. It is also the cost of a hot entity: every batch re-encodes its head (the Redis
header) and every evaluation merges it, so the head's size, rate x grace, sets the cost per
batch. 5 s made a live stream at 10k events/s about twice as costly as 1 s, and 250 ms cut
processing CPU by a fifth against 1 s (bench/README.md)."""


@dataclass(frozen=True, slots=True)
class Record:
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: Record
    reason: str


@dataclass(slots=True)
class BatchResult:
    valid: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    replayed: int = 0
    late: dict[str, int] = field(default_factory=dict)
    archived: int = 0
    newest_event_ms: int | None = None
    rebuilt: int = 0
    """Entity states rebuilt from the archive: written for another layout of their view."""


@dataclass
class ViewRuntime:
    """A live feature view version as the worker computes it."""

    view: FeatureView
    version: int
    entity: Entity
    agg: ViewAggregator
    ttl: timedelta | None

    @property
    def key_fields(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.entity.join_keys)

    @classmethod
    def build(cls, view: FeatureView, version: int, entity: Entity, source: Source) -> ViewRuntime:
        return cls(view, version, entity, ViewAggregator.from_source(view, source), view.effective_online_ttl)

    def dtypes(self, source: Source) -> dict[str, str]:
        """Column types of the view's history table: join keys and features."""
        types = {f.name: f.type for f in source.fields}
        out: dict[str, str] = {k.name: k.type for k in self.entity.join_keys}
        for f in self.view.features:
            out[f.name] = f.dtype or natural_output_type(f.aggregation, types.get(f.field) if f.field else None)
        return out


class StateCache:
    """Entity sub-states this worker owns, newest use last; bounded, refilled from Redis."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[str, int, EntityKey, int], PartitionState] = OrderedDict()

    def get(self, key: tuple[str, int, EntityKey, int]) -> PartitionState | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def peek(self, key: tuple[str, int, EntityKey, int]) -> PartitionState | None:
        """``get`` without refreshing the entry's recency."""
        return self._items.get(key)

    def put(self, key: tuple[str, int, EntityKey, int], value: PartitionState) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def forget_partitions(self, partitions: set[int]) -> None:
        """After a rebalance another worker may have written these partitions' states."""
        for key in [k for k in self._items if k[3] in partitions]:
            del self._items[key]


def _getter(names: Sequence[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """``fields -> tuple of fields[name]`` in one C call (itemgetter of one name gives no tuple)."""
    if len(names) == 1:
        name = names[0]
        return lambda fields: (fields[name],)
    if not names:
        return lambda fields: ()
    return itemgetter(*names)


Valid = tuple[Record, dict[str, Any], int]
"""A decoded record: the record, its typed fields, its event time (ms)."""
Groups = dict[tuple[EntityKey, int], list[Valid]]


def _group(valid: list[Valid], key_fields: tuple[str, ...]) -> Groups:
    """The batch's records by (entity key, partition), in batch order within each group."""
    groups: dict[tuple[Any, int], list[Valid]] = {}
    get = groups.get
    if len(key_fields) == 1:  # the common case: group by the bare value, make key tuples per group
        name = key_fields[0]
        for item in valid:
            key = (item[1][name], item[0].partition)
            group = get(key)
            if group is None:
                groups[key] = [item]
            else:
                group.append(item)
        return {((value,), partition): items for (value, partition), items in groups.items()}
    key_of = itemgetter(*key_fields) if key_fields else (lambda fields: ())
    for item in valid:
        key = (key_of(item[1]), item[0].partition)
        group = get(key)
        if group is None:
            groups[key] = [item]
        else:
            group.append(item)
    return groups


class _Transaction:
    """The batch's PostgreSQL transaction, opened and closed on the processor's PostgreSQL thread.

    The common case takes six round trips: BEGIN, a COPY of the archive and of each view's
    history rows straight into their tables (two each), COMMIT. If a COPY meets a row stored
    before (a replay), the transaction is rolled back and the batch is stored again in a new one,
    the idempotent way (``ON CONFLICT DO NOTHING``).
    """

    def __init__(self, offline: PostgresOfflineStore, source: Source) -> None:
        self.offline = offline
        self.source = source
        self.tx: AbstractContextManager[Any] | None = None
        self.replay = False
        self.rows: list[tuple[Any, ...]] = []

    def begin_with_archive(self, rows: list[tuple[Any, ...]]) -> int:
        self.rows = rows
        self._open()
        try:
            try:
                return self.offline.archive_rows(self.source, rows, assume_new=True)
            except psycopg.errors.UniqueViolation as exc:
                self._restart(exc)
                return self.offline.archive_rows(self.source, rows)
        except BaseException as exc:
            self.close(exc)
            raise

    def commit_with_history(self, histories: list[tuple[ViewRuntime, list[FeatureRow]]]) -> None:
        if self.tx is None:  # the archive failed and rolled the transaction back
            raise RuntimeError("the batch's transaction is not open")
        try:
            try:
                for runtime, rows in histories:
                    self.offline.write_feature_rows(runtime.view, runtime.version, rows, assume_new=not self.replay)
            except psycopg.errors.UniqueViolation as exc:  # history rows stored before (a backfill, say)
                self._restart(exc)
                self.offline.archive_rows(self.source, self.rows)
                for runtime, rows in histories:
                    self.offline.write_feature_rows(runtime.view, runtime.version, rows)
        except BaseException as exc:
            self.close(exc)
            raise
        self.close(None)

    def _open(self) -> None:
        self.tx = tx = self.offline.connection.transaction()
        tx.__enter__()

    def _restart(self, exc: BaseException) -> None:
        """Roll back after a COPY met a stored row and open a transaction for the idempotent way."""
        self.close(exc)
        self.offline.forget_partitions()
        self.replay = True
        self._open()

    def close(self, exc: BaseException | None) -> None:
        """Commit (no ``exc``) or roll back; a no-op once closed."""
        tx, self.tx = self.tx, None
        if tx is not None:
            if exc is None:
                tx.__exit__(None, None, None)
            else:
                try:
                    tx.__exit__(type(exc), exc, exc.__traceback__)
                except psycopg.Error:
                    pass  # a broken connection; ``recover`` replaces it


class SourceProcessor:
    def __init__(
        self,
        source: Source,
        views: Sequence[ViewRuntime],
        online: RedisOnlineStore,
        offline: PostgresOfflineStore,
        *,
        clock_ms: Callable[[], int] | None = None,
        cache_entries: int = 200_000,
        write_history: bool = True,
        compact_grace_ms: int | None = None,
    ) -> None:
        self.source = source
        self.views = list(views)
        self.online = online
        self.offline = offline
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.decoder = EventDecoder(source, clock_ms=self.clock_ms)
        self.cache = StateCache(cache_entries)
        self.write_history = write_history
        self.compact_grace_ms = COMPACT_GRACE_MS if compact_grace_ms is None else compact_grace_ms
        offline.ensure_source(source, sorted({v.key_fields for v in self.views}))
        for runtime in self.views:
            offline.ensure_view(runtime.view, runtime.version, runtime.key_fields, runtime.dtypes(source))
        self._archive_fields = _getter(offline.source_columns(source))
        self._pg_thread: ThreadPoolExecutor | None = None
        self._archive_reader: PostgresOfflineStore | None = None

    def recover(self) -> None:
        """After a failed batch: its folds may be in the cache but not in the stores, so drop the
        cache (states reload from Redis, where offsets say what was applied) and reconnect."""
        self.cache.clear()
        self.offline.reconnect()

    def close(self) -> None:
        """Stop the PostgreSQL thread (the stores are the caller's to close)."""
        if self._pg_thread is not None:
            self._pg_thread.shutdown(wait=True)
            self._pg_thread = None
        if self._archive_reader is not None:
            self._archive_reader.close()
            self._archive_reader = None

    def process(self, records: Sequence[Record]) -> BatchResult:
        result = BatchResult()
        now_ms = self.clock_ms()
        decode = self.decoder.decode
        valid: list[Valid] = []
        append = valid.append
        for record in records:
            try:
                fields, event_ms = decode(record.value, now_ms)
            except InvalidEvent as exc:
                result.dead_letters.append(DeadLetter(record, exc.reason))
                continue
            append((record, fields, event_ms))
        result.valid = len(valid)
        if not valid:
            return result
        result.newest_event_ms = max(e for _, _, e in valid)
        archive_fields = self._archive_fields
        rows = [(e, r.timestamp_ms, r.partition, r.offset, *archive_fields(f)) for r, f, e in valid]

        if self._pg_thread is None:
            self._pg_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featurestream-postgres")
        pg = self._pg_thread
        transaction = _Transaction(self.offline, self.source)
        futures: list[Future[Any]] = [pg.submit(transaction.begin_with_archive, rows)]
        try:
            groupings: dict[tuple[str, ...], Groups] = {}  # views of one entity share one grouping
            plans = []
            for runtime in self.views:
                key_fields = runtime.key_fields
                groups = groupings.get(key_fields)
                if groups is None:
                    groups = groupings[key_fields] = _group(valid, key_fields)
                plans.append(self._fold_view(runtime, groups, now_ms, result))
            histories = [(rt, hist) for rt, (_, hist) in zip(self.views, plans, strict=True)] if self.write_history else []
            futures.append(pg.submit(transaction.commit_with_history, histories))
            pipe = self.online.pipeline()
            for runtime, (writes, _) in zip(self.views, plans, strict=True):
                self.online.prepare(pipe, runtime.view.name, runtime.version, runtime.agg, writes, runtime.ttl)
            result.archived = futures[0].result()
            futures[1].result()
        except BaseException as exc:
            wait(futures)  # the connection is idle again before anyone retries on it
            pg.submit(transaction.close, exc).result()
            raise
        self.online.execute(pipe)
        return result

    def _fold_view(
        self, runtime: ViewRuntime, groups: Groups, now_ms: int, result: BatchResult
    ) -> tuple[list[EntityWrite], list[FeatureRow]]:
        name, version, agg = runtime.view.name, runtime.version, runtime.agg
        self._load_missing(runtime, list(groups), now_ms, result)
        cache = self.cache
        fold, compact, prune, evaluate = agg.fold, agg.compact, agg.prune, agg.evaluate
        history = self.write_history
        upto = now_ms - self.compact_grace_ms
        writes: list[EntityWrite] = []
        rows: list[FeatureRow] = []
        late = replayed = 0
        for (entity, partition), items in groups.items():
            sub = cache.get((name, version, entity, partition))
            if sub is None:  # loaded just now; evicted only if the batch outgrew the cache
                sub = PartitionState(agg.new_state())
                cache.put((name, version, entity, partition), sub)
            applied = sub.offset
            if len(items) == 1:  # most entities have one event in a batch
                newest_record, fields, newest_ms = items[0]
                last = newest_record.offset
                if last <= applied:
                    replayed += 1
                    continue
                folded = fold(sub.state, (fields,), (last,))
            else:
                offsets = [r.offset for r, _, _ in items]
                if min(offsets) <= applied:  # a replay: keep only what the state lacks
                    fresh = [item for item in items if item[0].offset > applied]
                    replayed += len(items) - len(fresh)
                    if not fresh:
                        continue
                    items = fresh
                    offsets = [r.offset for r, _, _ in items]
                folded = fold(sub.state, [f for _, f, _ in items], offsets)
                last = max(offsets)
                newest_record, _, newest_ms = items[0]
                for item in items:  # the newest event; at equal times the later offset
                    if item[2] > newest_ms or (item[2] == newest_ms and item[0].offset > newest_record.offset):
                        newest_record, _, newest_ms = item
            folded.add(compact(sub.state, upto))
            removed = prune(sub.state, now_ms)
            late += folded.late
            sub.offset = last
            if sub.newest_ms is None or newest_ms > sub.newest_ms:
                sub.newest_ms = newest_ms
            writes.append(EntityWrite(entity, partition, sub, folded.touched, removed, True))
            if history:
                rows.append(FeatureRow(entity, newest_ms, partition, newest_record.offset, evaluate(sub.state, newest_ms)))
        result.replayed += replayed
        if late:
            result.late[name] = result.late.get(name, 0) + late
        return writes, rows

    def _load_missing(
        self, runtime: ViewRuntime, keys: list[tuple[EntityKey, int]], now_ms: int, result: BatchResult
    ) -> None:
        name, version = runtime.view.name, runtime.version
        peek = self.cache.peek
        missing = [key for key in keys if peek((name, version, *key)) is None]
        if not missing:
            return
        entities = list(dict.fromkeys(entity for entity, _ in missing))
        loaded = dict(zip(entities, self.online.load(name, version, runtime.agg, entities), strict=True))
        stale = [entity for entity, subs in loaded.items() if subs is None]
        if stale:
            loaded.update(self._rebuild(runtime, stale, now_ms))
            result.rebuilt += len(stale)
        for entity, partition in missing:
            subs = loaded[entity]
            sub = (subs or {}).get(partition) or PartitionState(runtime.agg.new_state())
            self.cache.put((name, version, entity, partition), sub)

    def _rebuild(
        self, runtime: ViewRuntime, entities: list[EntityKey], now_ms: int
    ) -> dict[EntityKey, dict[int, PartitionState]]:
        """States written for another layout of the view (a feature was added, which keeps the
        version), rebuilt from the archive and rewritten whole before this batch folds in.

        The archive holds every event of earlier batches (their transactions committed before
        their Redis writes); this batch's events follow with offsets above the rebuilt ones."""
        from featurestream.offline.rebuild import entity_events, rebuild_entity_states

        if self._archive_reader is None:  # the main connection is the batch transaction's
            self._archive_reader = PostgresOfflineStore(self.offline.url)
        agg, name, version = runtime.agg, runtime.view.name, runtime.version
        rebuilt: dict[EntityKey, dict[int, PartitionState]] = {key: {} for key in entities}
        stream = self._archive_reader.read_events(self.source, runtime.key_fields, entities, None)
        for key, events in entity_events(stream):
            if key in rebuilt:
                rebuilt[key] = rebuild_entity_states(agg, events, now_ms, grace_ms=self.compact_grace_ms)
        for key, subs in rebuilt.items():
            self.online.replace(name, version, agg, key, subs, runtime.ttl)
        return rebuilt
