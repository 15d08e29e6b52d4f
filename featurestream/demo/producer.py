"""Send the demo transactions to Kafka: topic creation, pacing, delivery accounting.

``produce_demo(options)`` creates the topic with the declared partition count when it is missing
(brokers auto-create topics with their own default count: 4 on tansu), then sends
``generate_transactions(...)`` keyed by user id, paced by a token bucket, and returns a
``ProduceSummary`` that holds everything needed to regenerate exactly what was sent
(seed, ``now``, rate, users, shares).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from featurestream.demo.generator import MALFORMED_PREFIX, MALFORMED_REASONS, generate_transactions

DEFAULT_PARTITIONS = 4
DEMO_SOURCE = "transactions"
PROGRESS_INTERVAL_S = 0.1
MIN_WAIT_S = 0.005


class ProduceError(RuntimeError):
    """The demo could not be produced at all (broker unreachable, topic not creatable)."""


@dataclass(frozen=True)
class ProduceOptions:
    bootstrap: str
    count: int
    rate: float = 0.0
    topic: str = "transactions"
    seed: int = 0
    users: int = 3000
    malformed_share: float = 0.002
    late_share: float = 0.02
    out_of_order_share: float = 0.05
    partitions: int = DEFAULT_PARTITIONS
    create_topic: bool = True
    now: datetime | None = None
    """Event-time anchor; default: the time sending starts."""
    flush_timeout_s: float = 30.0
    producer_config: dict[str, Any] = field(default_factory=dict)
    """Extra librdkafka settings, applied over the defaults."""


@dataclass
class ProduceSummary:
    topic: str
    bootstrap: str
    seed: int
    now: str
    rate: float
    users: int
    malformed_share: float
    late_share: float
    out_of_order_share: float
    requested: int
    partitions: int | None = None
    topic_created: bool = False
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    malformed: dict[str, int] = field(default_factory=dict)
    partition_counts: dict[int, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    achieved_rate: float = 0.0
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)
    """The first few delivery errors (distinct messages) and warnings."""

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["partition_counts"] = {str(k): v for k, v in sorted(self.partition_counts.items())}
        return data


class TokenBucket:
    """Allow ``rate`` acquisitions per second on average, in bursts of at most ``capacity``
    (default: 50 ms worth of tokens, at least one).

    ``sleep`` is called to wait; the producer passes ``Producer.poll`` so delivery callbacks are
    served while it waits. ``clock`` and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        rate: float,
        capacity: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = max(1.0, capacity if capacity is not None else rate / 20)
        self._clock = clock
        self._sleep = sleep
        self._tokens = 1.0
        self._last = clock()

    def acquire(self) -> None:
        while True:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
            # Wait for the missing token, but at least MIN_WAIT_S: at high rates the bucket then
            # refills several tokens per wait instead of waking up once per message.
            self._sleep(max((1.0 - self._tokens) / self.rate, MIN_WAIT_S))


def partitions_from_definitions(directory: Path, topic: str) -> int:
    """Partition count declared for ``topic`` (or, failing that, the ``transactions`` source)."""
    from featurestream.definitions.loader import load_project

    definition = load_project(directory)
    source = next((s for s in definition.sources if s.topic == topic), None) or definition.source(DEMO_SOURCE)
    return source.partitions if source is not None else DEFAULT_PARTITIONS


def ensure_topic(bootstrap: str, topic: str, partitions: int, timeout_s: float = 10.0) -> tuple[bool, int]:
    """Create ``topic`` with ``partitions`` unless it exists; (created, its partition count)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        # All topics, not just ours: a metadata request naming a topic may auto-create it.
        existing = admin.list_topics(timeout=timeout_s).topics
        if topic in existing and existing[topic].error is None:
            return False, len(existing[topic].partitions)
        new = NewTopic(topic, num_partitions=partitions, replication_factor=-1)
        future = admin.create_topics([new], operation_timeout=timeout_s)[topic]
        # exception(), not result(): a raised error's traceback would keep ``admin`` alive in a
        # reference cycle, and a client collected after its broker stopped blocks for seconds.
        error = future.exception(timeout=timeout_s)
        created = error is None
        if error is not None:
            code = error.args[0].code() if isinstance(error, KafkaException) and error.args else None
            if code != KafkaError.TOPIC_ALREADY_EXISTS:
                raise ProduceError(f"cannot create topic '{topic}' on {bootstrap}: {error}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            metadata = admin.list_topics(timeout=timeout_s).topics.get(topic)
            if metadata is not None and metadata.error is None and metadata.partitions:
                return created, len(metadata.partitions)
            time.sleep(0.1)
    except KafkaException as exc:
        raise ProduceError(f"cannot create topic '{topic}' on {bootstrap}: {exc}") from exc
    raise ProduceError(f"topic '{topic}' did not appear on {bootstrap} within {timeout_s:g}s")


def producer_config(bootstrap: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "client.id": "featurestream-produce-demo",
        "linger.ms": 20,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 200_000,
        "enable.idempotence": True,  # acks=all, per-partition order kept across retries
        # Java clients, Kafka Streams and aiokafka/Faust hash keys with murmur2: same key, same partition.
        "partitioner": "murmur2_random",
        **(extra or {}),
    }


def prepare_topic(options: ProduceOptions) -> tuple[bool, int | None]:
    """(created, partition count) after creating the topic if asked; (False, None) if not asked."""
    if not options.create_topic:
        return False, None
    return ensure_topic(options.bootstrap, options.topic, options.partitions)


def produce_demo(
    options: ProduceOptions,
    on_progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ProduceSummary:
    """Create the topic if asked, send the events, flush, and account for every one of them."""
    created, partitions = prepare_topic(options)
    return send_demo(options, created, partitions, on_progress, clock)


def send_demo(
    options: ProduceOptions,
    created: bool,
    partitions: int | None,
    on_progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ProduceSummary:
    """Send the events (the topic is prepared), flush, and account for every one of them."""
    now = options.now or datetime.now(UTC)
    summary = ProduceSummary(
        topic=options.topic,
        bootstrap=options.bootstrap,
        seed=options.seed,
        now=now.isoformat(),
        rate=options.rate,
        users=options.users,
        malformed_share=options.malformed_share,
        late_share=options.late_share,
        out_of_order_share=options.out_of_order_share,
        requested=options.count,
        partitions=partitions,
        topic_created=created,
    )
    if partitions is not None and partitions != options.partitions:
        summary.errors.append(
            f"warning: topic '{options.topic}' has {partitions} partitions, the definitions declare "
            f"{options.partitions}; recreate it to match"
        )
    events = generate_transactions(
        options.count,
        options.seed,
        now=now,
        rate=options.rate,
        users=options.users,
        malformed_share=options.malformed_share,
        late_share=options.late_share,
        out_of_order_share=options.out_of_order_share,
    )
    producer = Producer(producer_config(options.bootstrap, options.producer_config))
    partition_counts: Counter[int] = Counter()

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            summary.failed += 1
            if len(summary.errors) < 5 and str(err) not in summary.errors:
                summary.errors.append(str(err))
        else:
            summary.delivered += 1
            partition = msg.partition()
            if partition is not None:
                partition_counts[partition] += 1

    bucket = TokenBucket(options.rate, clock=clock, sleep=producer.poll) if options.rate > 0 else None
    kinds: Counter[str] = Counter()
    started = last_report = clock()
    try:
        for event in events:
            if bucket is not None:
                bucket.acquire()
            while True:
                try:
                    producer.produce(options.topic, value=event.value, key=event.key, on_delivery=on_delivery)
                    break
                except BufferError:  # local queue full: let deliveries drain it
                    producer.poll(0.05)
            summary.sent += 1
            kinds[event.kind] += 1
            producer.poll(0)
            if on_progress is not None and (now_s := clock()) - last_report >= PROGRESS_INTERVAL_S:
                last_report = now_s
                on_progress(summary.sent)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        undelivered = producer.flush(options.flush_timeout_s)
        if undelivered:
            summary.failed += undelivered
            summary.errors.append(
                f"{undelivered} messages still undelivered after {options.flush_timeout_s:g}s"
            )
        summary.elapsed_s = round(clock() - started, 3)
    if on_progress is not None:
        on_progress(summary.sent)
    summary.kinds = dict(sorted(kinds.items()))
    summary.malformed = {r: kinds.get(MALFORMED_PREFIX + r, 0) for r in MALFORMED_REASONS}
    summary.partition_counts = dict(partition_counts)
    summary.achieved_rate = round(summary.sent / summary.elapsed_s, 1) if summary.elapsed_s > 0 else 0.0
    if summary.partitions is None:  # not created by us: ask what the broker made of it
        try:
            metadata = producer.list_topics(options.topic, timeout=5).topics.get(options.topic)
        except KafkaException:
            metadata = None
        if metadata is not None and metadata.error is None:
            summary.partitions = len(metadata.partitions)
    return summary
