"""PushEvents: events sent to the serving API go through the same door as every other event.

Each event is validated with the source's ``EventDecoder`` (what the stream job will check
again); the valid ones are produced to the source's topic and the call returns once Kafka has
acknowledged them, so an accepted event is durable and will be processed like any other.
Refused events come back with their index in the request and the reason; nothing is produced
for them.

The Kafka key is the entity of the first feature view on the source (definition order) whose
join keys the event carries, written like the online store writes entities (``u1``; a JSON
list for several keys). An entity's events therefore share a partition and keep their order,
and keys hash with murmur2 like Java, Kafka Streams and Faust producers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from featurestream.definitions.models import ProjectDefinition, Source
from featurestream.registry.records import ProjectSnapshot
from featurestream.serving import metrics
from featurestream.serving.access import ANONYMOUS, AccessPolicy, OpenAccess, Principal
from featurestream.serving.context import PushResult
from featurestream.serving.refs import ServingError
from featurestream.storage.online.redis_store import entity_part
from featurestream.stream_jobs.events import EventDecoder, InvalidEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushLimits:
    max_events: int = 1000
    max_request_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class _SourcePlan:
    source: Source
    decoder: EventDecoder
    key_fields: tuple[tuple[str, ...], ...]
    """Join keys of each entity keyed by a view on the source, first view first."""


@dataclass
class _Delivery:
    """The outcome of one push call's messages, filled in by delivery callbacks."""

    pending: int = 0
    errors: dict[int, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)

    def callback(self, index: int) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            with self.lock:
                if err is not None:
                    self.errors[index] = f"not delivered to Kafka: {err.str()}"
                self.pending -= 1
                if self.pending == 0:
                    self.done.set()

        return on_delivery


def key_fields_of(definition: ProjectDefinition, source: Source) -> tuple[tuple[str, ...], ...]:
    """The join keys of each entity with a view on ``source``, in definition order, distinct."""
    out: list[tuple[str, ...]] = []
    for view in definition.feature_views:
        if view.source != source.name:
            continue
        entity = definition.entity(view.entity)
        if entity is None:
            continue
        keys = tuple(k.name for k in entity.join_keys)
        if keys not in out:
            out.append(keys)
    return tuple(out)


class PushService:
    """Validates pushed events and produces the valid ones to their source's topic."""

    def __init__(
        self,
        snapshot: Callable[[], ProjectSnapshot],
        kafka_bootstrap: str,
        *,
        access: AccessPolicy | None = None,
        limits: PushLimits | None = None,
        delivery_timeout_s: float = 5.0,
        producer_config: dict[str, Any] | None = None,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self.access: AccessPolicy = access or OpenAccess()
        self.limits = limits or PushLimits()
        self.delivery_timeout_s = delivery_timeout_s
        self._config: dict[str, Any] = {
            "bootstrap.servers": kafka_bootstrap,
            "client.id": "featurestream-push",
            "linger.ms": 2,
            "enable.idempotence": True,  # acks=all, per-partition order kept across retries
            "partitioner": "murmur2_random",
            "message.timeout.ms": max(1000, int(delivery_timeout_s * 1000)),
            **(producer_config or {}),
        }
        self._clock_ms = clock_ms
        self._plans: dict[str, _SourcePlan] = {}
        self._plans_of: ProjectSnapshot | None = None
        self._producer: Producer | None = None
        self._fatal = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------ the call

    def push(self, source: str, events: Sequence[bytes], principal: Principal = ANONYMOUS) -> PushResult:
        started = time.perf_counter()
        plan = self._plan(source)
        self._check_limits(events)
        self.access.authorize(principal, [], "push")
        rejected: dict[int, str] = {}
        valid: list[tuple[int, bytes, bytes | None]] = []
        for i, raw in enumerate(events):
            try:
                fields, _ = plan.decoder.decode(raw)
            except InvalidEvent as exc:
                rejected[i] = exc.reason
                continue
            valid.append((i, raw, self._key(plan, fields)))
        if valid:
            failed = self._produce(plan.source.topic, valid)
            if len(failed) == len(valid):
                reason = next(iter(failed.values()))
                raise ServingError("UNAVAILABLE", f"no event could be written to topic '{plan.source.topic}': {reason}")
            rejected.update(failed)
        metrics.REQUEST_SECONDS.labels(method="push").observe(time.perf_counter() - started)
        return PushResult(len(events) - len(rejected), sorted(rejected.items()))

    def _check_limits(self, events: Sequence[bytes]) -> None:
        if not events:
            raise ServingError("INVALID_ARGUMENT", "give at least one event")
        if len(events) > self.limits.max_events:
            raise ServingError(
                "INVALID_ARGUMENT", f"{len(events)} events in one request; the limit is {self.limits.max_events}"
            )
        size = sum(len(e) for e in events if e is not None)
        if size > self.limits.max_request_bytes:
            raise ServingError(
                "INVALID_ARGUMENT", f"{size} bytes of events in one request; the limit is {self.limits.max_request_bytes}"
            )

    def _plan(self, name: str) -> _SourcePlan:
        snapshot = self._snapshot()
        with self._lock:
            if self._plans_of is not snapshot:
                self._plans, self._plans_of = {}, snapshot
            plan = self._plans.get(name)
            if plan is None:
                definition = snapshot.definition
                source = definition.source(name)
                if source is None:
                    raise ServingError("NOT_FOUND", f"no source '{name}' in project '{snapshot.project}'")
                plan = _SourcePlan(source, EventDecoder(source, self._clock_ms), key_fields_of(definition, source))
                self._plans[name] = plan
            return plan

    @staticmethod
    def _key(plan: _SourcePlan, fields: dict[str, Any]) -> bytes | None:
        for names in plan.key_fields:
            values = tuple(fields.get(n) for n in names)
            if all(v is not None for v in values):
                return entity_part(values).encode()
        return None  # no view's entity in the event: any partition

    # ------------------------------------------------------------ Kafka

    def _get_producer(self) -> Producer:
        with self._lock:
            if self._producer is None or self._fatal:
                # After a fatal error (idempotence state lost) the old producer is unusable.
                self._producer, self._fatal = Producer({**self._config, "error_cb": self._on_error}), False
            return self._producer

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("push producer: fatal error, a new producer will be made: %s", err.str())
            self._fatal = True
        else:
            log.debug("push producer: %s", err.str())

    def _produce(self, topic: str, valid: list[tuple[int, bytes, bytes | None]]) -> dict[int, str]:
        """Produce and wait for Kafka's acknowledgements; (index -> reason) of the failures."""
        producer = self._get_producer()
        delivery = _Delivery()
        deadline = time.monotonic() + self.delivery_timeout_s + 1.0
        failed: dict[int, str] = {}
        for index, raw, key in valid:
            with delivery.lock:
                delivery.pending += 1
            while True:
                try:
                    producer.produce(topic, value=raw, key=key, on_delivery=delivery.callback(index))
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    if time.monotonic() > deadline:
                        failed[index] = "not sent: the producer queue stayed full"
                        break
                    producer.poll(0.05)
                except KafkaException as exc:
                    failed[index] = f"not sent: {exc.args[0].str() if exc.args else exc}"
                    break
            if index in failed:
                with delivery.lock:
                    delivery.pending -= 1
        with delivery.lock:
            if delivery.pending == 0:
                delivery.done.set()
        # Delivery callbacks run inside poll(); with concurrent calls another thread's poll may
        # serve ours, so wait on our own event between polls.
        while not delivery.done.is_set() and time.monotonic() < deadline:
            producer.poll(0.05)
        with delivery.lock:
            failed.update(delivery.errors)
            if not delivery.done.is_set():
                # Unconfirmed: Kafka may still store these, so say so rather than claim failure.
                sent = {i for i, _, _ in valid} - set(failed)
                for i in sent:
                    failed[i] = f"delivery not confirmed within {self.delivery_timeout_s:g}s (it may still arrive)"
        return failed

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(self.delivery_timeout_s)
