"""Online/offline consistency: what serving returns now against what the archive says it should.

For a sample of entities taken from the event archive, at one instant ``now``:

* online: ``OnlineService.get_online`` over Redis (the serving code path itself);
* offline: ``evaluate_history`` over the entity's archived events at ``now``, the batch path of
  the same aggregation core.

The score is the share of equal values. Floats are compared with a relative tolerance of 1e-9
(and an absolute one of 1e-12 around zero): online tiles add their events in arrival order and
merge partitions, offline tiles add them in time order, so float sums, means and stddevs may
differ in the last bits. Everything else must be exactly equal, approximate distinct counts
included: their sets merge to the same answer in any order and grouping (``aggregation/
distinct.py``), so an entity spread over partitions (a merchant) agrees as one that is not.

Made exact under a live stream: each partition sub-state in Redis records the last Kafka offset
it applied; the offline side counts, per partition, only archived events up to that offset
(events beyond it are *pending*: archived, not applied yet, and reported as such). For a
partition the entity has no sub-state for, the bound is the newest offset any entity of the same
chunk (500 entities) has applied there: the worker applies a partition in offset order, so an
event at or below it should be in Redis, and one above it may still be on its way. The offsets
are read before and after the serving call; an entity written in between is read again.

An entity without a Redis key is consistent when the archive agrees it should have none: no
event, or its newest arrival is more than the view's online TTL ago (the key expired). Any
other missing key is a difference (every feature that has a value offline).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from psycopg import sql

from featurestream.offline.rebuild import (
    OfflineError,
    OfflineView,
    Progress,
    close_stream,
    entity_events,
    require_archive,
    time_filter,
)
from featurestream.registry.records import ProjectSnapshot
from featurestream.serving.service import OnlineService, ServedRow
from featurestream.storage.offline.base import ArchivedEvent
from featurestream.storage.offline.layout import qualified, table_name
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.storage.online.redis_store import EntityKey, entity_part, redis_key

REL_TOL = 1e-9
ABS_TOL = 1e-12
CHUNK = 500
RETRIES = 3

Offsets = dict[int, int]
"""partition -> last offset applied, as stored in Redis (absent: no sub-state for it)."""


def same_value(online: Any, offline: Any) -> bool:
    if online is None or offline is None:
        return online is None and offline is None
    if isinstance(online, float) or isinstance(offline, float):
        if isinstance(online, bool) or isinstance(offline, bool):
            return False
        if not isinstance(online, int | float) or not isinstance(offline, int | float):
            return False
        if math.isnan(online) or math.isnan(offline):
            return math.isnan(online) and math.isnan(offline)
        return math.isclose(online, offline, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return bool(type(online) is type(offline) and online == offline)


def distance(online: Any, offline: Any) -> float:
    """How far apart two unequal values are: relative for numbers, infinite otherwise."""
    numbers = (int, float)
    if (isinstance(online, numbers) and isinstance(offline, numbers)
            and not isinstance(online, bool) and not isinstance(offline, bool)):
        scale = max(abs(online), abs(offline))
        if scale == 0 or math.isnan(scale):
            return math.inf
        return abs(online - offline) / scale
    return math.inf


@dataclass(frozen=True)
class Difference:
    entity: str
    feature: str
    online: Any
    offline: Any
    status: str
    """The online status (PRESENT, MISSING, STALE, INVALID)."""
    distance: float

    def to_json(self) -> dict[str, Any]:
        return {
            "entity": self.entity, "feature": self.feature, "online": self.online, "offline": self.offline,
            "online_status": self.status, "relative_difference": None if math.isinf(self.distance) else self.distance,
        }  # fmt: skip


@dataclass
class ConsistencyReport:
    view: str
    version: int
    now_ms: int
    features: list[str]
    entities: int = 0
    values: int = 0
    equal: int = 0
    per_feature: dict[str, list[int]] = field(default_factory=dict)
    """feature -> [equal, compared]."""
    differences: list[Difference] = field(default_factory=list)
    missing_online: int = 0
    """Entities without a Redis key that the archive says should have one."""
    expired: int = 0
    """Entities without a Redis key whose key has expired (consistent)."""
    pending_events: int = 0
    """Archived events beyond the offsets Redis has applied (the worker's lag), left out."""
    unstable: int = 0
    """Entities written during every read attempt, left out."""
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return self.equal / self.values if self.values else 1.0

    @property
    def differing_entities(self) -> list[str]:
        return list(dict.fromkeys(d.entity for d in self.differences))

    def worst(self, n: int) -> list[Difference]:
        return sorted(self.differences, key=lambda d: (-d.distance, d.entity, d.feature))[:n]

    def to_json(self, top: int = 20) -> dict[str, Any]:
        return {
            "view": self.view,
            "version": self.version,
            "now_ms": self.now_ms,
            "score": self.score,
            "entities": self.entities,
            "values": self.values,
            "equal": self.equal,
            "per_feature": {
                name: {"equal": eq, "values": total, "score": eq / total if total else 1.0}
                for name, (eq, total) in self.per_feature.items()
            },
            "differing_entities": self.differing_entities,
            "worst_differences": [d.to_json() for d in self.worst(top)],
            "missing_online": self.missing_online,
            "expired": self.expired,
            "pending_events": self.pending_events,
            "unstable": self.unstable,
            "tolerance": {"relative": REL_TOL, "absolute": ABS_TOL},
            "seconds": round(self.seconds, 3),
        }


def sample_entities(
    store: PostgresOfflineStore, view: OfflineView, n: int, *, seed: float | None = None,
    end_ms: int | None = None,
) -> list[EntityKey]:
    """Up to ``n`` random entities with an archived event (at or before ``end_ms``)."""
    keys = view.key_fields
    key_list = sql.SQL(", ").join(map(sql.Identifier, keys))
    where, params = time_filter(keys, None, end_ms)
    query = sql.SQL("select * from (select distinct {} from {} where {}) k order by random() limit %s").format(
        key_list, qualified(table_name("raw", view.source.name)), where
    )
    conn = store.connection
    with conn.transaction():
        if seed is not None:
            conn.execute("select setseed(%s)", [max(-1.0, min(1.0, seed))])
        return [tuple(row) for row in conn.execute(query, [*params, n]).fetchall()]


class _Checker:
    def __init__(self, view: OfflineView, online: OnlineService, store: PostgresOfflineStore, now_ms: int) -> None:
        self.view = view
        self.online = online
        self.store = store
        self.now_ms = now_ms
        self.refs = [f"{view.name}@{view.version}:{f.name}" for f in view.runtime.view.features]
        self.features = [f.name for f in view.runtime.view.features]
        ttl: timedelta | None = view.runtime.ttl
        self.ttl_ms = None if ttl is None else int(ttl.total_seconds() * 1000)

    def offsets(self, keys: Sequence[EntityKey]) -> list[Offsets]:
        """The ``{p}:o`` fields of each entity's hash (pipelined)."""
        project, name, version = self.online.project, self.view.name, self.view.version
        pipe = self.online.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(redis_key(project, name, version, key))
        out: list[Offsets] = []
        for fields in pipe.execute():
            found: Offsets = {}
            for name, value in fields.items():
                if name.endswith(b":o"):
                    found[int(name[:-2])] = int(value.partition(b":")[0])
            out.append(found)
        return out

    def served(self, keys: Sequence[EntityKey]) -> tuple[dict[EntityKey, tuple[ServedRow, Offsets]], int]:
        """Serving's answer per entity with the offsets it reflects; and how many kept changing."""
        names = self.view.key_fields
        stable: dict[EntityKey, tuple[ServedRow, Offsets]] = {}
        todo = list(keys)
        for _ in range(RETRIES):
            if not todo:
                break
            before = self.offsets(todo)
            rows = self.online.get_online([{n: str(v) for n, v in zip(names, k, strict=True)} for k in todo],
                                          self.refs).rows
            after = self.offsets(todo)
            again = []
            for key, row, b, a in zip(todo, rows, before, after, strict=True):
                if a == b:
                    stable[key] = (row, a)
                else:
                    again.append(key)
            todo = again
        return stable, len(todo)

    def compare_chunk(self, keys: Sequence[EntityKey], report: ConsistencyReport) -> None:
        served, unstable = self.served(keys)
        report.unstable += unstable
        frontier: Offsets = {}  # per partition, the newest offset any entity of the chunk has applied
        for _, offsets in served.values():
            for p, o in offsets.items():
                if o > frontier.get(p, -1):
                    frontier[p] = o
        events: dict[EntityKey, list[ArchivedEvent]] = {}
        stream = self.store.read_events(self.view.source, self.view.key_fields, list(served), self.now_ms)
        try:
            for key, items in entity_events(stream):
                events[key] = items
        finally:
            close_stream(stream)
        for key, (row, offsets) in served.items():
            self.compare_entity(key, row, {**frontier, **offsets}, offsets, events.get(key, []), report)

    def compare_entity(
        self, key: EntityKey, row: ServedRow, bounds: Offsets, offsets: Offsets, events: list[ArchivedEvent],
        report: ConsistencyReport,
    ) -> None:
        """``offsets``: what the entity's own sub-states applied; ``bounds``: those, else the
        chunk's frontier (a partition the worker has not reached yet holds nothing)."""
        kept = [e for e in events if e.partition not in bounds or e.offset <= bounds[e.partition]]
        report.pending_events += len(events) - len(kept)
        report.entities += 1
        absent = not offsets
        expected_absent = not kept or (
            self.ttl_ms is not None and max(e.arrival_ms for e in kept) + self.ttl_ms <= self.now_ms
        )
        label = entity_part(key)
        if absent and expected_absent:
            report.expired += 1
            offline: dict[str, Any] = dict.fromkeys(self.features)
        else:
            agg = self.view.agg
            offline = agg.evaluate_history([e.fields for e in kept], [self.now_ms], [e.offset for e in kept])[0]
        differs = False
        for name, served in zip(self.features, row.values, strict=True):
            want = offline.get(name)
            counts = report.per_feature.setdefault(name, [0, 0])
            counts[1] += 1
            report.values += 1
            if same_value(served.value, want):
                counts[0] += 1
                report.equal += 1
            else:
                differs = True
                report.differences.append(
                    Difference(label, name, served.value, want, served.status, distance(served.value, want))
                )
        if absent and not expected_absent and differs:
            report.missing_online += 1


def check_consistency(
    view: OfflineView,
    snapshot: Callable[[], ProjectSnapshot],
    redis_url: str,
    store: PostgresOfflineStore,
    *,
    sample: int = 1000,
    keys: Sequence[EntityKey] | None = None,
    now_ms: int | None = None,
    seed: float | None = None,
    progress: Progress | None = None,
    on_total: Progress | None = None,
) -> ConsistencyReport:
    """Compare online serving with the offline computation at ``now_ms`` (default: the clock) for
    ``keys``, or for ``sample`` entities drawn from the archive."""
    started = time.perf_counter()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    require_archive(store, view.source)
    online = OnlineService(snapshot, redis_url, clock_ms=lambda: now, redis_timeout_s=5.0)
    try:
        if (view.name, view.version) not in online.catalog.views:
            raise OfflineError(f"{view.ref} is not live in project '{online.project}': online serving does not "
                               "serve it, so there is nothing to compare")
        chosen = list(keys) if keys is not None else sample_entities(store, view, sample, seed=seed, end_ms=now)
        checker = _Checker(view, online, store, now)
        report = ConsistencyReport(view.name, view.version, now, checker.features)
        if on_total is not None:
            on_total(len(chosen))
        for start in range(0, len(chosen), CHUNK):
            chunk = chosen[start : start + CHUNK]
            checker.compare_chunk(chunk, report)
            if progress is not None:
                progress(len(chunk))
    finally:
        online.close()
    report.seconds = time.perf_counter() - started
    return report
