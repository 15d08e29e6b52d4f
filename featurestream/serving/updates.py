"""StreamFeatureUpdates: push new values to a client as the stream jobs write them.

The stream worker PUBLISHes, after each batch write, the entities it changed on the view
version's channel (``updates_channel``). A subscription listens on the channels of the views
its features live in; when a message names one of its entities, it reads their values through
``OnlineService.get_online`` (so statuses, access checks and presentation are the online ones)
and yields them. Only subscribed entities are read and delivered.

``subscribe`` returns once Redis confirmed the subscription, so every write after it is seen.
Pub/sub does not queue for absent listeners: a write during a Redis outage is not announced,
and a client that reconnects should read current values once with GetOnlineFeatures.
The iterator wakes every ``poll_s`` seconds even without messages, so ``close()`` from another
thread ends it promptly, and a new registry version re-subscribes to the live view versions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.client import PubSub
from redis.retry import Retry

from featurestream.registry.records import ProjectSnapshot
from featurestream.serving.access import ANONYMOUS, AccessPolicy, Principal
from featurestream.serving.refs import Catalog, ServedView, ServingError, catalog_for, parse_entity
from featurestream.serving.service import OnlineService, ServedRows, ServingLimits
from featurestream.storage.online.redis_store import entity_part, redis_key, updates_channel

EntityKey = tuple[Any, ...]
MAX_DRAIN = 1000
"""Messages already waiting that are merged into one read (one batch publishes per view)."""


@dataclass(frozen=True)
class _Channel:
    served: ServedView
    rows: dict[str, tuple[EntityKey, list[int]]]
    """entity part as the worker publishes it -> (typed key, indices of the subscribed rows)."""


@dataclass(frozen=True)
class _Plan:
    snapshot: ProjectSnapshot
    channels: dict[bytes, _Channel]


class UpdateService:
    """Subscriptions to the values of entities, fed by the stream workers' Redis announcements."""

    def __init__(
        self,
        snapshot: Callable[[], ProjectSnapshot],
        redis_url: str,
        online: OnlineService | None = None,
        *,
        access: AccessPolicy | None = None,
        limits: ServingLimits | None = None,
        poll_s: float = 0.25,
        max_subscriptions: int = 1000,
        redis_timeout_s: float = 1.0,
        health_check_s: float = 15.0,
    ) -> None:
        self._snapshot = snapshot
        self._owns_online = online is None
        # Without an online service of the server's, one of our own (no state cache) reads the values.
        self.online = online or OnlineService(snapshot, redis_url, limits=limits, access=access)
        self.access: AccessPolicy = access or self.online.access
        self.limits = limits or self.online.limits
        self.poll_s = poll_s
        self.max_subscriptions = max_subscriptions
        self.redis_timeout_s = redis_timeout_s
        # One immediate reconnect (a dropped connection), then UNAVAILABLE; pings an idle
        # subscription's connection every health_check_s so a dead one is noticed.
        self.redis = redis.Redis.from_url(
            redis_url,
            socket_timeout=redis_timeout_s,
            socket_connect_timeout=redis_timeout_s,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=health_check_s,
        )
        self._active: set[FeatureSubscription] = set()
        self._lock = threading.Lock()

    @property
    def catalog(self) -> Catalog:
        return catalog_for(self._snapshot())

    @property
    def active(self) -> int:
        """Subscriptions holding a Redis connection."""
        with self._lock:
            return len(self._active)

    def subscribe(
        self,
        entities: Sequence[dict[str, str]],
        features: Sequence[str],
        feature_service: str = "",
        principal: Principal = ANONYMOUS,
    ) -> FeatureSubscription:
        entity_rows = [dict(e) for e in entities]
        plan = self.plan(entity_rows, features, feature_service, principal)
        subscription = FeatureSubscription(self, entity_rows, list(features), feature_service, principal, plan)
        with self._lock:
            if len(self._active) >= self.max_subscriptions:
                raise ServingError(
                    "RESOURCE_EXHAUSTED", f"{len(self._active)} subscriptions are open; the limit is {self.max_subscriptions}"
                )
            self._active.add(subscription)
        try:
            subscription.start()
        except BaseException:
            subscription.close()
            raise
        return subscription

    def plan(
        self, entities: list[dict[str, str]], features: Sequence[str], feature_service: str, principal: Principal
    ) -> _Plan:
        """Resolve, check and authorize a subscription; the channels and entity parts to watch."""
        catalog = self.catalog
        refs = catalog.resolve(list(features), feature_service)
        if not entities:
            raise ServingError("INVALID_ARGUMENT", "give at least one entity")
        self.limits.check(len(entities), len(refs))
        self.access.authorize(principal, refs, "updates")
        project = catalog.snapshot.project
        channels: dict[bytes, _Channel] = {}
        for served in {(r.served.view.name, r.served.version): r.served for r in refs}.values():
            rows: dict[str, tuple[EntityKey, list[int]]] = {}
            for i, entity in enumerate(entities):
                key = parse_entity(i, entity, served.entity)
                rows.setdefault(entity_part(key), (key, []))[1].append(i)
            channels[updates_channel(project, served.view.name, served.version).encode()] = _Channel(served, rows)
        return _Plan(catalog.snapshot, channels)

    def _forget(self, subscription: FeatureSubscription) -> None:
        with self._lock:
            self._active.discard(subscription)

    def forget_cached(self, keys: list[str]) -> None:
        """An announced change must not be answered from the online service's state cache."""
        self.online.invalidate(keys)

    def close(self) -> None:
        with self._lock:
            active = list(self._active)
        for subscription in active:
            subscription.close()
        self.redis.close()
        if self._owns_online:
            self.online.close()


class FeatureSubscription:
    """One client's subscription: iterate to receive changed values; ``close()`` ends it.

    One thread iterates; ``close()`` may come from any thread.
    """

    def __init__(
        self,
        service: UpdateService,
        entities: list[dict[str, str]],
        features: list[str],
        feature_service: str,
        principal: Principal,
        plan: _Plan,
    ) -> None:
        self._service = service
        self.entities = entities
        self.features = features
        self.feature_service = feature_service
        self.principal = principal
        self._plan = plan
        self._pubsub: PubSub | None = service.redis.pubsub()  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        self._closed = False
        self._busy = False
        self._iterating = False

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Subscribe and wait for Redis to confirm every channel."""
        with self._using_pubsub() as pubsub:
            if pubsub is None:
                raise ServingError("CANCELLED", "the subscription was closed")
            channels = list(self._plan.channels)
            try:
                pubsub.subscribe(*channels)
                confirmed = 0
                while confirmed < len(channels):
                    message = pubsub.get_message(timeout=self._service.redis_timeout_s)
                    if message is None:
                        raise ServingError("UNAVAILABLE", "the online store did not confirm the subscription")
                    if message["type"] == "subscribe":
                        confirmed += 1
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise ServingError("UNAVAILABLE", f"the online store is unreachable: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            release = not self._busy
        if release:
            self._release()

    @property
    def closed(self) -> bool:
        return self._closed

    @contextmanager
    def _using_pubsub(self) -> Iterator[PubSub | None]:
        """The pubsub for one blocking step (None once closed); a close() meanwhile takes
        effect when the step ends, so the connection is never closed under a reader."""
        with self._lock:
            pubsub = None if self._closed else self._pubsub
            self._busy = pubsub is not None
        try:
            yield pubsub
        finally:
            with self._lock:
                self._busy = False
                release = self._closed
            if release:
                self._release()

    def _release(self) -> None:
        with self._lock:
            pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            finally:
                self._service._forget(self)

    # ------------------------------------------------------------ iteration

    def __iter__(self) -> Generator[ServedRows, None, None]:
        with self._lock:
            if self._iterating:
                raise RuntimeError("a subscription is read by one iterator")
            self._iterating = True
        try:
            while True:
                changed = self._wait()
                if changed is None:
                    return
                if changed:
                    yield self._read(changed)
        finally:
            self.close()

    def _wait(self) -> dict[int, list[str]] | None:
        """Row index -> Redis keys changed for it, after at most ``poll_s`` (empty: nothing for
        us yet); None once closed."""
        with self._using_pubsub() as pubsub:
            if pubsub is None:
                return None
            changed: dict[int, list[str]] = {}
            try:
                self._refresh(pubsub)
                message = pubsub.get_message(timeout=self._service.poll_s)
                if message is None:
                    return changed
                drained = 0
                while message is not None and drained < MAX_DRAIN:
                    if message["type"] == "message":
                        self._collect(message["channel"], message["data"], changed)
                    drained += 1
                    message = pubsub.get_message(timeout=0.0)
                if message is not None and message["type"] == "message":
                    self._collect(message["channel"], message["data"], changed)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise ServingError("UNAVAILABLE", f"the online store is unreachable: {exc}") from exc
            return changed

    def _collect(self, channel: bytes, data: bytes, changed: dict[int, list[str]]) -> None:
        watched = self._plan.channels.get(channel)
        if watched is None:  # a channel left by a re-plan, still draining
            return
        project = self._plan.snapshot.project
        name, version = watched.served.view.name, watched.served.version
        for part in data.decode("utf-8", "replace").split("\n"):
            hit = watched.rows.get(part)
            if hit is None:
                continue
            key, rows = hit
            rkey = redis_key(project, name, version, key)
            for i in rows:
                changed.setdefault(i, []).append(rkey)

    def _read(self, changed: dict[int, list[str]]) -> ServedRows:
        self._service.forget_cached([k for keys in changed.values() for k in keys])
        rows = [self.entities[i] for i in sorted(changed)]
        return self._service.online.get_online(rows, self.features, self.feature_service, self.principal)

    def _refresh(self, pubsub: PubSub) -> None:
        """After a registry change, listen on the channels of the views now live."""
        if self._service.catalog.snapshot is self._plan.snapshot:
            return
        plan = self._service.plan(self.entities, self.features, self.feature_service, self.principal)
        old, new = set(self._plan.channels), set(plan.channels)
        if new - old:
            pubsub.subscribe(*sorted(new - old))
        if old - new:
            pubsub.unsubscribe(*sorted(old - new))  # type: ignore[no-untyped-call]
        self._plan = plan
