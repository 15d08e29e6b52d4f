"""Create Kafka topics with an explicit partition count (auto-created ones get tansu's 4)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]


def create_topics(
    bootstrap: str,
    partitions: Mapping[str, int],
    *,
    config: Mapping[str, str] | None = None,
    timeout: float = 15.0,
) -> None:
    """Create each topic with its partition count; an existing topic is left as it is.

    Returns once the broker's metadata lists every topic, so a producer or consumer
    started next sees them.
    """
    if not partitions:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [
        NewTopic(name, num_partitions=count, replication_factor=1, config=dict(config or {}))
        for name, count in partitions.items()
    ]
    for name, future in admin.create_topics(new, request_timeout=timeout).items():
        # exception(), not result(): a raised error's traceback would keep ``admin`` in a
        # reference cycle, and a client collected after its broker stopped blocks ~5 s.
        exc = future.exception(timeout=timeout)
        if exc is None:
            continue
        error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
        if not (isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS):
            raise RuntimeError(f"cannot create topic {name!r} on {bootstrap}: {exc}")
    _wait_listed(admin, set(partitions), bootstrap, timeout)


def _wait_listed(admin: AdminClient, names: set[str], bootstrap: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        missing = names - set(admin.list_topics(timeout=timeout).topics)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics {sorted(missing)} not listed by {bootstrap} after {timeout:.0f}s")
        time.sleep(0.05)
