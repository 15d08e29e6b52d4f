"""The serving layer both front ends (gRPC, REST) and the in-process reader call.

A request is resolved against the live views of the registry, read from Redis in ONE pipelined
round trip whatever the number of entities and features, evaluated at the request time (sliding
windows end now, DIRECTION.md), and every value gets a status and its event time.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from featurestream.aggregation.state import StateLayoutError, ViewState
from featurestream.registry.records import ProjectSnapshot
from featurestream.serving import metrics
from featurestream.serving.access import ANONYMOUS, AccessPolicy, OpenAccess, Principal
from featurestream.serving.refs import (
    Catalog,
    FeatureRef,
    ServedView,
    ServingError,
    catalog_for,
    parse_entity,
)
from featurestream.storage.online.redis_store import merged_state, parse_fields, redis_key

PRESENT, MISSING, STALE, INVALID = "PRESENT", "MISSING", "STALE", "INVALID"


@dataclass(frozen=True, slots=True)
class ServedValue:
    value: Any
    status: str
    event_time_ms: int | None


@dataclass(frozen=True, slots=True)
class ServedRow:
    entity: dict[str, str]
    at_ms: int
    values: list[ServedValue]


@dataclass(frozen=True, slots=True)
class ServedRows:
    feature_names: list[str]
    refs: list[FeatureRef]
    rows: list[ServedRow]


@dataclass(frozen=True)
class ServingLimits:
    max_entities: int = 1000
    max_features: int = 1000

    def check(self, count: int, feature_count: int, noun: str = "entities") -> None:
        """INVALID_ARGUMENT when a request holds more entities (or rows) or features than allowed."""
        if count > self.max_entities:
            raise ServingError("INVALID_ARGUMENT", f"{count} {noun} in one request; the limit is {self.max_entities}")
        if feature_count > self.max_features:
            raise ServingError(
                "INVALID_ARGUMENT", f"{feature_count} features in one request; the limit is {self.max_features}"
            )


class _StateCache:
    """Decoded entity states for a short time, so hot keys skip Redis. Values are still evaluated
    at request time (windows decay exactly); the TTL bounds how late a new event shows."""

    def __init__(self, ttl_ms: int, max_entries: int) -> None:
        self.ttl_ms = ttl_ms
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[int, ViewState | None, int | None]] = OrderedDict()

    def get(self, key: str, now_ms: int) -> tuple[ViewState | None, int | None] | None:
        item = self._items.get(key)
        if item is None or item[0] <= now_ms:
            return None
        return item[1], item[2]

    def discard(self, keys: list[str]) -> None:
        for key in keys:
            self._items.pop(key, None)

    def put(self, key: str, now_ms: int, state: ViewState | None, newest_ms: int | None) -> None:
        self._items[key] = (now_ms + self.ttl_ms, state, newest_ms)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)


class OnlineService:
    """Online lookups for one project."""

    def __init__(
        self,
        snapshot: Callable[[], ProjectSnapshot],
        redis_url: str,
        *,
        limits: ServingLimits | None = None,
        cache_ttl_ms: int = 0,
        cache_entries: int = 100_000,
        clock_ms: Callable[[], int] | None = None,
        redis_timeout_s: float = 0.5,
        access: AccessPolicy | None = None,
    ) -> None:
        self._snapshot = snapshot
        self.access: AccessPolicy = access or OpenAccess()
        self.limits = limits or ServingLimits()
        self.clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        # No retries: with Redis down a call must fail within a second, not back off for longer.
        self.redis = redis.Redis.from_url(
            redis_url,
            socket_timeout=redis_timeout_s,
            socket_connect_timeout=redis_timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self.cache = _StateCache(cache_ttl_ms, cache_entries) if cache_ttl_ms > 0 else None

    @property
    def catalog(self) -> Catalog:
        return catalog_for(self._snapshot())

    @property
    def project(self) -> str:
        return self.catalog.snapshot.project

    def get_online(
        self,
        entities: Sequence[dict[str, str]],
        features: Sequence[str],
        feature_service: str = "",
        principal: Principal = ANONYMOUS,
    ) -> ServedRows:
        started = time.perf_counter()
        catalog = self.catalog
        refs = catalog.resolve(list(features), feature_service)
        self._check_limits(len(entities), len(refs))
        self.access.authorize(principal, refs, "online")
        views = list({(r.served.view.name, r.served.version): r.served for r in refs}.values())
        keys = [[parse_entity(i, dict(e), served.entity) for served in views] for i, e in enumerate(entities)]
        now_ms = self.clock_ms()
        states = self._read_states(views, keys, now_ms)
        rows = []
        for i, entity in enumerate(entities):
            evaluated: dict[tuple[str, int], tuple[dict[str, Any], int | None, bool]] = {}
            for j, served in enumerate(views):
                state, newest = states[(served.view.name, served.version, keys[i][j])]
                values = served.agg.evaluate(state, now_ms) if state is not None else {}
                evaluated[(served.view.name, served.version)] = (values, newest, state is not None)
            rows.append(ServedRow(dict(entity), now_ms, [self._status(r, evaluated, now_ms) for r in refs]))
        result = self.access.present(principal, ServedRows([r.name for r in refs], refs, rows), "online")
        metrics.REQUEST_SECONDS.labels(method="online").observe(time.perf_counter() - started)
        metrics.VALUES.labels(method="online").inc(len(rows) * len(refs))
        return result

    def _check_limits(self, entity_count: int, feature_count: int) -> None:
        if entity_count == 0:
            raise ServingError("INVALID_ARGUMENT", "give at least one entity")
        self.limits.check(entity_count, feature_count)

    def _read_states(
        self, views: list[ServedView], keys: list[list[tuple[Any, ...]]], now_ms: int
    ) -> dict[tuple[str, int, tuple[Any, ...]], tuple[ViewState | None, int | None]]:
        project = self.project
        wanted: dict[tuple[str, int, tuple[Any, ...]], str] = {}
        for row in keys:
            for served, key in zip(views, row, strict=True):
                wanted[(served.view.name, served.version, key)] = redis_key(project, served.view.name, served.version, key)
        out: dict[tuple[str, int, tuple[Any, ...]], tuple[ViewState | None, int | None]] = {}
        misses = []
        for ident, rkey in wanted.items():
            hit = self.cache.get(rkey, now_ms) if self.cache else None
            if hit is not None:
                out[ident] = hit
                metrics.CACHE.labels(result="hit").inc()
            else:
                misses.append((ident, rkey))
        if self.cache:
            metrics.CACHE.labels(result="miss").inc(len(misses))
        if not misses:
            return out
        pipe = self.redis.pipeline(transaction=False)
        for _, rkey in misses:
            pipe.hgetall(rkey)
        try:
            replies = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            metrics.REDIS_ERRORS.inc()
            raise ServingError("UNAVAILABLE", f"the online store is unreachable: {exc}") from exc
        by_view = {(v.view.name, v.version): v for v in views}
        for (ident, rkey), fields in zip(misses, replies, strict=True):
            served = by_view[(ident[0], ident[1])]
            result: tuple[ViewState | None, int | None] = (None, None)
            if fields:
                try:
                    result = merged_state(served.agg, parse_fields(served.agg, fields))
                except StateLayoutError:
                    # Written before a feature was added to the view: MISSING until the worker
                    # rebuilds the entity from the archive (next event) or `materialize` runs.
                    metrics.STALE_LAYOUT.inc()
            out[ident] = result
            if self.cache:
                self.cache.put(rkey, now_ms, *result)
        return out

    @staticmethod
    def _status(
        ref: FeatureRef, evaluated: dict[tuple[str, int], tuple[dict[str, Any], int | None, bool]], now_ms: int
    ) -> ServedValue:
        values, newest, known = evaluated[(ref.served.view.name, ref.served.version)]
        if not known:
            return ServedValue(None, MISSING, None)
        value = values.get(ref.feature.name)
        if value is None:
            return ServedValue(None, MISSING, newest)
        check = ref.feature.validation
        if check is not None and not check.accepts(value):
            return ServedValue(value, INVALID, newest)
        max_age = ref.feature.max_age
        if max_age is not None and newest is not None and now_ms - newest > max_age.total_seconds() * 1000:
            return ServedValue(value, STALE, newest)
        return ServedValue(value, PRESENT, newest)

    def invalidate(self, redis_keys: list[str]) -> None:
        """Forget cached states of these keys (their entities were just written)."""
        if self.cache is not None:
            self.cache.discard(redis_keys)

    def close(self) -> None:
        self.redis.close()
