"""One batch of one source's Kafka records -> dead letters, raw archive, feature state, history.

This is the whole stream job without Faust, so it can be tested and benchmarked alone.
Order of effects per batch, which is what makes a crash at any instant harmless:
1. the archive and the history rows are committed to PostgreSQL (idempotent by offset);
2. the entity states are written to Redis, each with the last offset it includes;
3. the caller sends the dead letters, then acknowledges the records to Kafka.
A replay skips, per entity and partition, the records at or below the stored offset.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from featurestream.aggregation.view import ViewAggregator
from featurestream.definitions.models import Entity, FeatureView, Source, natural_output_type
from featurestream.storage.offline.base import ArchivedEvent, FeatureRow
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.storage.online.redis_store import EntityKey, EntityWrite, PartitionState, RedisOnlineStore
from featurestream.stream_jobs.events import EventDecoder, InvalidEvent

COMPACT_GRACE_MS = 5_000
"""Head events older than now - grace move into tiles; reads at or after that stay exact."""


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
    ) -> None:
        self.source = source
        self.views = list(views)
        self.online = online
        self.offline = offline
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self.decoder = EventDecoder(source, clock_ms=self.clock_ms)
        self.cache = StateCache(cache_entries)
        self.write_history = write_history
        offline.ensure_source(source, sorted({v.key_fields for v in self.views}))
        for runtime in self.views:
            offline.ensure_view(runtime.view, runtime.version, runtime.key_fields, runtime.dtypes(source))

    def recover(self) -> None:
        """After a failed batch: its folds may be in the cache but not in the stores, so drop the
        cache (states reload from Redis, where offsets say what was applied) and reconnect."""
        self.cache.clear()
        self.offline.reconnect()

    def process(self, records: Sequence[Record]) -> BatchResult:
        result = BatchResult()
        valid: list[tuple[Record, dict[str, Any], int]] = []
        for record in records:
            try:
                fields, event_ms = self.decoder.decode(record.value)
            except InvalidEvent as exc:
                result.dead_letters.append(DeadLetter(record, exc.reason))
                continue
            valid.append((record, fields, event_ms))
        result.valid = len(valid)
        if not valid:
            return result
        result.newest_event_ms = max(e for _, _, e in valid)
        now_ms = self.clock_ms()
        plans = [self._fold_view(runtime, valid, now_ms, result) for runtime in self.views]
        archive = [ArchivedEvent(r.partition, r.offset, e, r.timestamp_ms, f) for r, f, e in valid]
        with self.offline.connection.transaction():
            result.archived = self.offline.archive_events(self.source, archive)
            if self.write_history:
                for runtime, (_, rows) in zip(self.views, plans, strict=True):
                    self.offline.write_feature_rows(runtime.view, runtime.version, rows)
        for runtime, (writes, _) in zip(self.views, plans, strict=True):
            self.online.write(runtime.view.name, runtime.version, runtime.agg, writes, runtime.ttl)
        return result

    def _fold_view(
        self, runtime: ViewRuntime, valid: list[tuple[Record, dict[str, Any], int]], now_ms: int, result: BatchResult
    ) -> tuple[list[EntityWrite], list[FeatureRow]]:
        name, version, agg = runtime.view.name, runtime.version, runtime.agg
        groups: dict[tuple[EntityKey, int], list[tuple[Record, dict[str, Any], int]]] = {}
        key_fields = runtime.key_fields
        for item in valid:
            fields = item[1]
            groups.setdefault((tuple(fields[k] for k in key_fields), item[0].partition), []).append(item)
        self._load_missing(runtime, list(groups))
        writes: list[EntityWrite] = []
        rows: list[FeatureRow] = []
        late = 0
        for (entity, partition), items in groups.items():
            sub = self.cache.get((name, version, entity, partition))
            if sub is None:  # loaded just now; evicted only if the batch outgrew the cache
                sub = PartitionState(agg.new_state())
            fresh = [item for item in items if item[0].offset > sub.offset]
            result.replayed += len(items) - len(fresh)
            if not fresh:
                continue
            folded = agg.fold(sub.state, [f for _, f, _ in fresh], [r.offset for r, _, _ in fresh])
            folded.add(agg.compact(sub.state, now_ms - COMPACT_GRACE_MS))
            removed = agg.prune(sub.state, now_ms)
            late += folded.late
            newest_record, _, newest_ms = max(fresh, key=lambda item: (item[2], item[0].offset))
            sub.offset = max(r.offset for r, _, _ in fresh)
            sub.newest_ms = max(sub.newest_ms or newest_ms, newest_ms)
            self.cache.put((name, version, entity, partition), sub)
            writes.append(EntityWrite(entity, partition, sub, folded.touched, removed, True))
            if self.write_history:
                values = agg.evaluate(sub.state, newest_ms)
                rows.append(FeatureRow(entity, newest_ms, partition, newest_record.offset, values))
        if late:
            result.late[name] = result.late.get(name, 0) + late
        return writes, rows

    def _load_missing(self, runtime: ViewRuntime, keys: list[tuple[EntityKey, int]]) -> None:
        name, version = runtime.view.name, runtime.version
        missing = [key for key in keys if self.cache.get((name, version, *key)) is None]
        if not missing:
            return
        entities = list(dict.fromkeys(entity for entity, _ in missing))
        loaded = dict(zip(entities, self.online.load(name, version, runtime.agg, entities), strict=True))
        for entity, partition in missing:
            sub = loaded[entity].get(partition) or PartitionState(runtime.agg.new_state())
            self.cache.put((name, version, entity, partition), sub)
