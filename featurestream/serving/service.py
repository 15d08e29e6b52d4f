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
from typing import Any, NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from featurestream.aggregation.layout import GroupColumns
from featurestream.aggregation.state import StateLayoutError, ViewState
from featurestream.aggregation.view import ViewAggregator
from featurestream.definitions.models import ValueCheck
from featurestream.generations import Generations
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
from featurestream.storage.online.redis_store import (
    READ_SCRIPT,
    WRITE_TOKEN,
    hash_fields,
    merged_state,
    parse_fields,
    read_command,
    redis_key,
    round_trip,
)

PRESENT, MISSING, STALE, INVALID = "PRESENT", "MISSING", "STALE", "INVALID"


class ServedValue(NamedTuple):
    value: Any
    status: str
    event_time_ms: int | None


Evaluated = dict[tuple[str, int], tuple[dict[str, Any], int | None, bool]]
"""(view, version) -> (feature values, newest event time, entity known)."""
_UNKNOWN = ServedValue(None, MISSING, None)


def value_status(
    value: Any, known: bool, newest_ms: int | None, at_ms: int, check: ValueCheck | None, max_age_ms: float | None
) -> str:
    """The status of a value read at ``at_ms`` (serving's rule; training sets apply it too):
    MISSING (no state, or a null value), INVALID (fails its declared check), STALE (the newest
    event is older than max_age) or PRESENT."""
    if not known or value is None:
        return MISSING
    if check is not None and not check.accepts(value):
        return INVALID
    if max_age_ms is not None and newest_ms is not None and at_ms - newest_ms > max_age_ms:
        return STALE
    return PRESENT


def served_values(refs: Sequence[FeatureRef], evaluated: Evaluated, now_ms: int) -> list[ServedValue]:
    """Each ref's value, status (``value_status``) and newest event time at ``now_ms``."""
    out: list[ServedValue] = []
    append = out.append
    for ref in refs:
        values, newest, known = evaluated[ref.view_key]
        if not known:
            append(_UNKNOWN)
            continue
        value = values.get(ref.feature.name)
        append(ServedValue(value, value_status(value, known, newest, now_ms, ref.check, ref.max_age_ms), newest))
    return out


@dataclass(frozen=True, slots=True)
class ServedRow:
    entity: dict[str, str]
    at_ms: int
    values: list[ServedValue]


@dataclass(frozen=True, slots=True)
class ServedRows:
    feature_names: list[str]
    refs: Sequence[FeatureRef]
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


@dataclass(slots=True)
class _Decoded:
    """One entity hash as read from Redis and decoded, with the values last evaluated from it.

    ``state`` is None when the key does not exist (or holds another layout). The state is shared
    by the requests that read the same bytes: nothing may fold into it.
    """

    fields: dict[bytes, bytes]
    state: ViewState | None
    newest_ms: int | None
    evaluated: tuple[tuple[int, ...], tuple[int, ...], dict[str, Any]] | None = None
    """(``evaluation_key``, ``window_key``, values): one attribute, so concurrent requests swap
    it atomically."""
    token: bytes | None = None
    """The hash's write token when read (``redis_store.WRITE_TOKEN``)."""
    served: tuple[object, tuple[int, ...], int, int, list[ServedValue]] | None = None
    """(refs, window key, computed at, valid until, served values) of the last request."""
    columns: list[GroupColumns] | None = None
    """``ViewAggregator.columns`` of the state, made at the first evaluation."""

    def values(self, agg: ViewAggregator, now_ms: int) -> tuple[tuple[int, ...], dict[str, Any]]:
        """The window key at ``now_ms`` and the values, evaluated once per key. The cheap
        ``evaluation_key`` is tried first; when it moved (a new minute), the ``window_key``
        often has not, and the values stand."""
        state = self.state
        if state is None:
            return (), {}
        coarse = agg.evaluation_key(state, now_ms)
        held = self.evaluated
        if held is not None and held[0] == coarse:
            return held[1], held[2]
        columns = self.columns
        if columns is None:
            columns = self.columns = agg.columns(state)
        fine = agg.window_key(state, now_ms, columns)
        if held is not None and held[1] == fine:
            self.evaluated = (coarse, fine, held[2])
            return fine, held[2]
        values = agg.evaluate(state, now_ms, columns)
        self.evaluated = (coarse, fine, values)
        return fine, values

    def served_values(
        self, agg: ViewAggregator, refs: Sequence[FeatureRef], view_key: tuple[str, int], now_ms: int
    ) -> list[ServedValue]:
        """``served_values`` of a one-view request, reused while neither the values nor any
        status can have changed (same refs, same evaluation key, no value turned stale since)."""
        key, values = self.values(agg, now_ms)
        held = self.served
        if held is not None and held[0] is refs and held[1] == key and held[2] <= now_ms <= held[3]:
            return held[4]
        newest = self.newest_ms
        out = served_values(refs, {view_key: (values, newest, self.state is not None)}, now_ms)
        until = _NEVER
        if newest is not None:
            for ref in refs:  # the first instant a PRESENT or INVALID value would turn STALE
                if ref.max_age_ms is not None and now_ms <= newest + ref.max_age_ms < until:
                    until = int(newest + ref.max_age_ms)
        self.served = (refs, key, now_ms, until, out)
        return out


_NEVER = 2**63
_MISSING_HASH: dict[bytes, bytes] = {}


class _StateCache:
    """Decoded entity states for a short time, so hot keys skip Redis. Values are still evaluated
    at request time (windows decay exactly); the TTL bounds how late a new event shows."""

    def __init__(self, ttl_ms: int, max_entries: int) -> None:
        self.ttl_ms = ttl_ms
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[int, _Decoded]] = OrderedDict()

    def get(self, key: str, now_ms: int) -> _Decoded | None:
        item = self._items.get(key)
        if item is None or item[0] <= now_ms:
            return None
        return item[1]

    def discard(self, keys: list[str]) -> None:
        for key in keys:
            self._items.pop(key, None)

    def put(self, key: str, now_ms: int, decoded: _Decoded) -> None:
        self._items[key] = (now_ms + self.ttl_ms, decoded)
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
        memo_entries: int = 4096,
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
        # The read memo: decoded hashes by Redis key, reused while Redis holds the same bytes
        # (every lookup still reads Redis; see _read_states).
        self.memo: Generations[str, _Decoded] | None = Generations(memo_entries) if memo_entries > 0 else None

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
        if len(views) == 1:
            only = views[0]
            view_key = (only.view.name, only.version)
            for i, entity in enumerate(entities):
                decoded = states[(*view_key, keys[i][0])]
                rows.append(ServedRow(dict(entity), now_ms, decoded.served_values(only.agg, refs, view_key, now_ms)))
        else:
            for i, entity in enumerate(entities):
                evaluated: Evaluated = {}
                for j, served in enumerate(views):
                    decoded = states[(served.view.name, served.version, keys[i][j])]
                    values = decoded.values(served.agg, now_ms)[1]
                    evaluated[(served.view.name, served.version)] = (values, decoded.newest_ms, decoded.state is not None)
                rows.append(ServedRow(dict(entity), now_ms, served_values(refs, evaluated, now_ms)))
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
    ) -> dict[tuple[str, int, tuple[Any, ...]], _Decoded]:
        project = self.project
        wanted: dict[tuple[str, int, tuple[Any, ...]], str] = {}
        for row in keys:
            for served, key in zip(views, row, strict=True):
                wanted[(served.view.name, served.version, key)] = redis_key(project, served.view.name, served.version, key)
        out: dict[tuple[str, int, tuple[Any, ...]], _Decoded] = {}
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
        # With the memo: a hash whose write token we hold comes back as 1, not as its fields.
        memo = self.memo
        held = [memo.get(rkey) if memo is not None else None for _, rkey in misses]
        commands = [
            read_command(rkey.encode(), h.token if h is not None else None)
            for (_, rkey), h in zip(misses, held, strict=True)
        ]
        replies = self._round_trip(commands)
        by_view = {(v.view.name, v.version): v for v in views}
        for (ident, rkey), h, reply in zip(misses, held, replies, strict=True):
            if isinstance(reply, redis.ResponseError):
                raise ServingError("UNAVAILABLE", f"the online store refused to read {rkey}: {reply}")
            decoded: _Decoded | None = h if reply == 1 else None
            if decoded is None:
                fields = hash_fields(reply)
                if h is not None and h.token is None and h.fields == fields:  # written without a token
                    decoded = h
                else:
                    decoded = self._decode(by_view[(ident[0], ident[1])], fields, shared_rows=memo is not None)
                    if memo is not None:
                        memo.put(rkey, decoded)
            out[ident] = decoded
            if self.cache:
                self.cache.put(rkey, now_ms, decoded)
        return out

    def _round_trip(self, commands: list[bytes]) -> list[Any]:
        try:
            replies = round_trip(self.redis, commands)
            if any(isinstance(r, NoScriptError) for r in replies):
                self.redis.script_load(READ_SCRIPT)  # a restarted or flushed Redis: load it, read again
                replies = round_trip(self.redis, commands)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            metrics.REDIS_ERRORS.inc()
            raise ServingError("UNAVAILABLE", f"the online store is unreachable: {exc}") from exc
        return replies

    @staticmethod
    def _decode(served: ServedView, fields: dict[bytes, bytes], *, shared_rows: bool) -> _Decoded:
        if fields:
            try:
                state, newest = merged_state(served.agg, parse_fields(served.agg, fields, shared_rows=shared_rows))
                return _Decoded(fields, state, newest, token=fields.get(WRITE_TOKEN))
            except StateLayoutError:
                # Written before a feature was added to the view: MISSING until the worker
                # rebuilds the entity from the archive (next event) or `materialize` runs.
                metrics.STALE_LAYOUT.inc()
        return _Decoded(fields or _MISSING_HASH, None, None)

    def invalidate(self, redis_keys: list[str]) -> None:
        """Forget cached states of these keys (their entities were just written)."""
        if self.cache is not None:
            self.cache.discard(redis_keys)

    def close(self) -> None:
        if self.memo is not None:
            self.memo.clear()
        self.redis.close()
