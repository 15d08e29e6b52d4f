"""GetFeaturesAsOf: the values that would have been served at a past time, answered from history.

Each request row is (entity, T). Values come from the source's raw event archive through the
same aggregation core as the stream path (``ViewAggregator.evaluate_history``): windows end at
T, nothing with an event time after T counts, out-of-order events count where they belong.
Statuses follow the online service: MISSING when the entity had no event at or before T (or its
Redis key would have expired by T: ``effective_online_ttl`` after its newest event), STALE when
the newest event at or before T is older than the feature's ``max_age`` at T, INVALID per the
feature's validation. ``as_of_arrival`` also ignores events that reached Kafka after T (their
record timestamp), so a late event does not leak into the past.

Reads: one query per (source, join-key columns, batch of entities) via
``PostgresOfflineStore.read_events`` with ``end_ms`` = the batch's latest T; the events stream
back ordered by entity, and each entity is evaluated at all its read times in one pass.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.errors

from featurestream.definitions.models import Source
from featurestream.registry.records import ProjectSnapshot
from featurestream.serving import metrics
from featurestream.serving.access import ANONYMOUS, AccessPolicy, OpenAccess, Principal
from featurestream.serving.refs import Catalog, ServedView, ServingError, catalog_for, parse_entity
from featurestream.serving.service import Evaluated, ServedRow, ServedRows, ServingLimits, served_values
from featurestream.storage.offline.base import ArchivedEvent
from featurestream.storage.offline.postgres import PostgresOfflineStore

EntityKey = tuple[Any, ...]


@dataclass(frozen=True)
class AsOfLimits:
    max_events: int = 5_000_000
    """History events one request may read; beyond it RESOURCE_EXHAUSTED (ask for fewer rows)."""
    batch_entities: int = 500
    """Entities per archive query."""


@dataclass
class _KeyGroup:
    """The views of one source keyed by the same join-key columns: one archive query serves them."""

    source: Source
    key_fields: tuple[str, ...]
    views: list[ServedView]
    reads: dict[EntityKey, list[int]]
    """entity key -> sorted distinct read times."""


class AsOfService:
    """Feature values as of past times for one project, from the offline store's event archive."""

    def __init__(
        self,
        snapshot: Callable[[], ProjectSnapshot],
        postgres_url: str,
        *,
        access: AccessPolicy | None = None,
        limits: ServingLimits | None = None,
        as_of_limits: AsOfLimits | None = None,
        connect_timeout_s: int = 2,
        pool_size: int = 4,
    ) -> None:
        self._snapshot = snapshot
        self.access: AccessPolicy = access or OpenAccess()
        self.limits = limits or ServingLimits()
        self.as_of_limits = as_of_limits or AsOfLimits()
        self._url = psycopg.conninfo.make_conninfo(postgres_url, connect_timeout=max(1, connect_timeout_s))
        self._pool_size = pool_size
        self._idle: list[PostgresOfflineStore] = []
        self._lock = threading.Lock()

    @property
    def catalog(self) -> Catalog:
        return catalog_for(self._snapshot())

    def get_as_of(
        self,
        rows: Sequence[tuple[dict[str, str], int]],
        features: Sequence[str],
        feature_service: str = "",
        principal: Principal = ANONYMOUS,
        as_of_arrival: bool = False,
    ) -> ServedRows:
        started = time.perf_counter()
        catalog = self.catalog
        refs = catalog.resolve(list(features), feature_service)
        self._check_limits(rows, len(refs))
        self.access.authorize(principal, refs, "as_of")
        views = list({(r.served.view.name, r.served.version): r.served for r in refs}.values())
        groups = self._plan(catalog, views, rows)
        # (view, version, entity key, T) -> (values, newest event time, known)
        results: dict[tuple[str, int, EntityKey, int], tuple[dict[str, Any], int | None, bool]] = {}
        with self._store() as store:
            budget = [self.as_of_limits.max_events]
            for group in groups.values():
                self._evaluate_group(store, group, as_of_arrival, results, budget)
        served_rows = []
        for i, (entity, at_ms) in enumerate(rows):
            evaluated: Evaluated = {}
            for served in views:
                key = parse_entity(i, dict(entity), served.entity)
                name, version = served.view.name, served.version
                evaluated[(name, version)] = results.get((name, version, key, at_ms), ({}, None, False))
            served_rows.append(
                ServedRow(dict(entity), at_ms, served_values(refs, evaluated, at_ms))
            )
        result = self.access.present(principal, ServedRows([r.name for r in refs], refs, served_rows), "as_of")
        metrics.REQUEST_SECONDS.labels(method="as_of").observe(time.perf_counter() - started)
        metrics.VALUES.labels(method="as_of").inc(len(served_rows) * len(refs))
        return result

    # ------------------------------------------------------------ planning

    def _check_limits(self, rows: Sequence[tuple[dict[str, str], int]], feature_count: int) -> None:
        if not rows:
            raise ServingError("INVALID_ARGUMENT", "give at least one row (entity and timestamp)")
        self.limits.check(len(rows), feature_count, "rows")
        for i, (_, at_ms) in enumerate(rows):
            if isinstance(at_ms, bool) or not isinstance(at_ms, int) or at_ms < 0:
                raise ServingError(
                    "INVALID_ARGUMENT", f"row {i}: timestamp must be epoch milliseconds (a non-negative integer), got {at_ms!r}"
                )

    @staticmethod
    def _plan(
        catalog: Catalog, views: list[ServedView], rows: Sequence[tuple[dict[str, str], int]]
    ) -> dict[tuple[str, tuple[str, ...]], _KeyGroup]:
        """Views grouped by (source, typed join keys): one archive query per group and batch."""
        definition = catalog.snapshot.definition
        groups: dict[tuple[str, tuple[str, ...]], _KeyGroup] = {}
        for served in views:
            source = definition.source(served.view.source)
            if source is None:  # Catalog only keeps views whose source exists
                continue
            ident = (source.name, tuple(f"{k.name}:{k.type}" for k in served.entity.join_keys))
            group = groups.get(ident)
            if group is None:
                group = groups[ident] = _KeyGroup(source, served.key_fields, [], {})
            group.views.append(served)
            for i, (entity, at_ms) in enumerate(rows):
                group.reads.setdefault(parse_entity(i, dict(entity), served.entity), []).append(at_ms)
        for group in groups.values():
            for key, times in group.reads.items():
                group.reads[key] = sorted(set(times))
        return groups

    # ------------------------------------------------------------ reading and evaluating

    def _evaluate_group(
        self,
        store: PostgresOfflineStore,
        group: _KeyGroup,
        as_of_arrival: bool,
        results: dict[tuple[str, int, EntityKey, int], tuple[dict[str, Any], int | None, bool]],
        budget: list[int],
    ) -> None:
        keys = list(group.reads)
        size = max(1, self.as_of_limits.batch_entities)
        for start in range(0, len(keys), size):
            batch = keys[start : start + size]
            end_ms = max(group.reads[k][-1] for k in batch)
            seen: set[EntityKey] = set()
            stream = self._read(store, group, batch, end_ms)
            try:
                for key, items in groupby(stream, key=lambda item: item[0]):
                    events = [event for _, event in items]
                    budget[0] -= len(events)
                    if budget[0] < 0:
                        raise ServingError(
                            "RESOURCE_EXHAUSTED",
                            f"the request reads more than {self.as_of_limits.max_events} history events; "
                            "ask for fewer rows",
                        )
                    times = group.reads.get(key)
                    if times is None:  # not asked for (cannot happen with exact key matches)
                        continue
                    seen.add(key)
                    self._evaluate_entity(group, key, events, times, as_of_arrival, results)
            finally:
                stream.close()  # ends the server-side cursor and its transaction now, not at GC
            for key in batch:
                if key not in seen:
                    self._evaluate_entity(group, key, [], group.reads[key], as_of_arrival, results)

    @staticmethod
    def _read(
        store: PostgresOfflineStore, group: _KeyGroup, batch: list[EntityKey], end_ms: int
    ) -> Generator[tuple[EntityKey, ArchivedEvent], None, None]:
        try:
            yield from store.read_events(group.source, group.key_fields, batch, end_ms)
        except psycopg.errors.UndefinedTable:
            return  # nothing archived for this source yet: every entity is MISSING

    @staticmethod
    def _evaluate_entity(
        group: _KeyGroup,
        key: EntityKey,
        events: list[ArchivedEvent],
        times: list[int],
        as_of_arrival: bool,
        results: dict[tuple[str, int, EntityKey, int], tuple[dict[str, Any], int | None, bool]],
    ) -> None:
        """Values of every view of ``group`` for one entity at each of ``times`` (sorted)."""
        # Read times that see the same events are evaluated together. Without as_of_arrival
        # that is all of them (the window's near edge excludes later event times); with it,
        # a read at T also drops events that arrived after T, which differ per T.
        batches: dict[tuple[int, ...], list[int]] = {}
        lateness = max((e.arrival_ms - e.event_time_ms for e in events), default=0)
        if as_of_arrival and lateness > 0:
            all_times = [e.event_time_ms for e in events]
            for at_ms in times:
                # Only events less than the largest lateness before T can have arrived after T.
                first = bisect_right(all_times, at_ms - lateness)
                last = bisect_right(all_times, at_ms)
                hidden = tuple(i for i in range(first, last) if events[i].arrival_ms > at_ms)
                batches.setdefault(hidden, []).append(at_ms)
        else:
            batches[()] = list(times)
        for hidden, reads in batches.items():
            skip = set(hidden)
            visible = [e for i, e in enumerate(events) if i not in skip] if skip else events
            event_times = [e.event_time_ms for e in visible]  # ordered: read_events sorts by event time
            fields = [e.fields for e in visible]
            offsets = [e.offset for e in visible]
            for served in group.views:
                values = served.agg.evaluate_history(fields, reads, offsets) if visible else [{} for _ in reads]
                ttl = served.view.effective_online_ttl
                ttl_ms = ttl.total_seconds() * 1000 if ttl is not None else None
                for at_ms, vals in zip(reads, values, strict=True):
                    upto = bisect_right(event_times, at_ms)
                    newest = event_times[upto - 1] if upto else None
                    known = newest is not None and (ttl_ms is None or at_ms - newest <= ttl_ms)
                    name, version = served.view.name, served.version
                    results[(name, version, key, at_ms)] = (vals if known else {}, newest if known else None, known)

    # ------------------------------------------------------------ connections

    @contextmanager
    def _store(self) -> Iterator[PostgresOfflineStore]:
        with self._lock:
            store = self._idle.pop() if self._idle else None
        try:
            if store is None:
                # A reader: no TimescaleDB set-up, only the archive's tables are read.
                store = PostgresOfflineStore(self._url, use_timescale=False)
        except psycopg.OperationalError as exc:
            raise ServingError("UNAVAILABLE", f"the offline store is unreachable: {exc}") from exc
        try:
            yield store
        except psycopg.OperationalError as exc:
            store.close()
            raise ServingError("UNAVAILABLE", f"the offline store is unreachable: {exc}") from exc
        except BaseException:
            if store.connection.closed or store.connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                store.close()
            else:
                self._release(store)
            raise
        else:
            self._release(store)

    def _release(self, store: PostgresOfflineStore) -> None:
        with self._lock:
            if len(self._idle) < self._pool_size and not store.connection.closed:
                self._idle.append(store)
                return
        store.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for store in idle:
            store.close()
