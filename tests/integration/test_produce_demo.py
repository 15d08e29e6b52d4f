"""`featurestream produce-demo` against a real (tansu) broker: everything sent arrives, keyed right."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from typer.testing import CliRunner

from featurestream.cli import app
from featurestream.config import ENV_KAFKA
from featurestream.demo.generator import MALFORMED_REASONS, DemoEvent, generate_transactions

DEMO = Path(__file__).resolve().parents[2] / "definitions"


def murmur2_partition(key: bytes, partitions: int) -> int:
    """Kafka's default (Java) partitioner: murmur2 of the key, positive, modulo partitions."""
    m, r, length = 0x5BD1E995, 24, len(key)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(key[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length % 4
    if tail:
        h ^= int.from_bytes(key[length - tail :], "little")
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


def consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    """Every message of every partition from the beginning; stops at ``expected`` plus a short
    grace period for extras (the broker's high watermark is not trusted)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 500,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
        messages: list[Any] = []
        empty_polls = 0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (len(messages) < expected or empty_polls < 3):
            batch = consumer.consume(1000, timeout=0.5)
            if not batch:
                empty_polls += 1
                continue
            for message in batch:
                assert message.error() is None, message.error()
                messages.append(message)
        return messages
    finally:
        consumer.close()


def regenerate(summary: dict[str, Any]) -> list[DemoEvent]:
    return list(
        generate_transactions(
            summary["requested"],
            summary["seed"],
            now=datetime.fromisoformat(summary["now"]),
            rate=summary["rate"],
            users=summary["users"],
            malformed_share=summary["malformed_share"],
            late_share=summary["late_share"],
            out_of_order_share=summary["out_of_order_share"],
        )
    )


def test_every_event_arrives_keyed_to_one_partition(kafka_bootstrap: str, tmp_path: Path) -> None:
    # The demo definitions with 6 partitions: the broker would auto-create 4, so 6 proves the
    # topic was created from the definitions.
    definitions = tmp_path / "definitions"
    shutil.copytree(DEMO, definitions)
    project = definitions / "project.yaml"
    project.write_text(project.read_text().replace("partitions: 4", "partitions: 6"))
    topic = f"transactions-{uuid.uuid4().hex[:8]}"
    args = ["produce-demo", "--count", "2000", "--rate", "0", "--seed", "5", "--malformed-share", "0.01"]
    args += ["--bootstrap", kafka_bootstrap, "--topic", topic, "--definitions", str(definitions), "--json"]
    result = CliRunner().invoke(app, args, env={"CI": "true"})
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the progress bar goes to stderr, stdout is pure JSON
    assert "2000/2000" in result.stderr

    assert summary["topic_created"] is True
    assert summary["partitions"] == 6
    assert summary["sent"] == summary["delivered"] == 2000
    assert summary["failed"] == 0 and summary["errors"] == []
    assert summary["achieved_rate"] > 0

    sent = regenerate(summary)
    kinds = Counter(e.kind for e in sent)
    assert summary["kinds"] == dict(kinds)
    assert summary["malformed"] == {r: kinds.get(f"malformed:{r}", 0) for r in MALFORMED_REASONS}
    assert sum(summary["malformed"].values()) > 0

    messages = consume_all(kafka_bootstrap, topic, len(sent))
    assert Counter((m.key(), m.value()) for m in messages) == Counter((e.key, e.value) for e in sent)
    partitions_of_key: defaultdict[bytes, set[int]] = defaultdict(set)
    for message in messages:
        partitions_of_key[message.key()].add(message.partition())
    assert all(len(p) == 1 for p in partitions_of_key.values())
    assert all(murmur2_partition(key, 6) == next(iter(p)) for key, p in partitions_of_key.items())
    per_partition = Counter(m.partition() for m in messages)
    assert len(per_partition) == 6
    assert summary["partition_counts"] == {str(p): n for p, n in sorted(per_partition.items())}
    # Within a partition one user's events keep the order they were generated in.
    index_of = {(e.key, e.value): e.index for e in sent}
    by_key: defaultdict[bytes, list[int]] = defaultdict(list)
    for message in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        by_key[message.key()].append(index_of[(message.key(), message.value())])
    assert all(indexes == sorted(indexes) for indexes in by_key.values())


def test_paced_run_with_the_configured_address(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_KAFKA, kafka_bootstrap)
    topic = f"paced-{uuid.uuid4().hex[:8]}"
    args = ["produce-demo", "--count", "300", "--rate", "500", "--seed", "1", "--topic", topic]
    started = time.monotonic()
    result = CliRunner().invoke(app, [*args, "--no-create-topic"], env={"CI": "true"})
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert "300 of 300" in result.stdout and "malformed" in result.stdout
    assert 0.55 <= elapsed < 10  # 300 events at 500/s: about 0.6 s
    # Not created by us: the broker auto-created it with its default partition count.
    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    assert len(topics[topic].partitions) == 4
    assert len(consume_all(kafka_bootstrap, topic, 300)) == 300


def test_no_address_is_a_clear_error() -> None:
    result = CliRunner().invoke(app, ["produce-demo", "--count", "1"], env={"CI": "true"})
    assert result.exit_code == 2
    assert "kafka_bootstrap" in result.output
