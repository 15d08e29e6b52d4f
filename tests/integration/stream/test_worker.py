"""`featurestream worker` end to end on a real broker, Redis and PostgreSQL: the demo view's values
against an independent reference, dead letters on their topic, kill -9 and restart, two workers
sharing the partitions."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
from confluent_kafka import Consumer, TopicPartition

from featurestream.demo.generator import to_millis
from tests.support.stream import (
    Project,
    Workers,
    archived,
    check_values,
    demo_events,
    make_project,
    produce,
    wait_for,
)


@pytest.fixture
def project(tmp_path: Path, fresh_pg_url: str, redis_url: str, kafka_bootstrap: str) -> Project:
    """The demo definitions under a unique project and topic name, applied to a fresh registry."""
    return make_project(tmp_path, fresh_pg_url, redis_url, kafka_bootstrap)


@pytest.fixture
def workers(project: Project, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(project, tmp_path)
    yield w
    w.stop_all()


def dead_letters(project: Project, expected: int) -> list[dict[str, str]]:
    consumer = Consumer({"bootstrap.servers": project.kafka, "group.id": f"t-{uuid.uuid4().hex}", "enable.auto.commit": False})
    topic = f"{project.topic}.dlq"
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        out: list[dict[str, str]] = []
        deadline = time.monotonic() + 15
        while len(out) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            headers = {k: v.decode() for k, v in (message.headers() or [])}
            out.append({**headers, "value": (message.value() or b"").decode(errors="replace")})
        return out
    finally:
        consumer.close()


@pytest.mark.parametrize("where", ["--child-process", "--no-child-process"])
def test_worker_end_to_end_with_dead_letters(project: Project, workers: Workers, where: str) -> None:
    events = demo_events(3000, seed=11)
    workers.start(where)
    produce(project, events)
    valid = sum(e.well_formed for e in events)
    wait_for(lambda: archived(project) >= valid, 90, workers, f"{valid} archived events")
    time.sleep(0.5)  # the Redis write follows the archive commit
    check_values(project, events, to_millis(datetime.now(tz=UTC)))
    malformed = [e for e in events if not e.well_formed]
    letters = dead_letters(project, len(malformed))
    assert len(letters) == len(malformed) > 0
    assert all(letter["featurestream-reason"] and letter["featurestream-topic"] == project.topic for letter in letters)
    assert {letter["value"] for letter in letters} == {e.value.decode(errors="replace") for e in malformed}


def test_kill_9_mid_stream_loses_nothing_and_counts_nothing_twice(project: Project, workers: Workers) -> None:
    events = demo_events(6000, seed=12)
    valid = sum(e.well_formed for e in events)
    first = workers.start()
    producer_done = False

    def produce_all() -> None:
        nonlocal producer_done
        produce(project, events, rate=1500)
        producer_done = True

    thread = threading.Thread(target=produce_all)
    thread.start()
    wait_for(lambda: archived(project) > valid // 4, 90, workers, "a quarter of the events")
    children = psutil.Process(first.pid).children(recursive=True)
    assert children, "the worker has no child process processing its batches"
    os.kill(first.pid, signal.SIGKILL)  # the worker's process alone, as a supervisor would: its child must follow
    first.wait(10)
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"processes of the killed worker still run: {alive}"
    killed_at = archived(project)
    assert killed_at < valid, "the worker finished before it was killed; raise the event count"
    workers.start()
    thread.join(60)
    assert producer_done
    wait_for(lambda: archived(project) >= valid, 120, workers, f"{valid} archived events after the restart")
    time.sleep(0.5)
    check_values(project, events, to_millis(datetime.now(tz=UTC)))
    assert archived(project) == valid


def _processing_child(workers: Workers) -> int:
    """The pid of worker 0's newest processing child, from its log."""
    pids = re.findall(r"batches are processed by child process (\d+)", workers.log_text())
    assert pids, workers.logs()
    return int(pids[-1])


def test_kill_9_of_the_processing_child_loses_nothing(project: Project, workers: Workers) -> None:
    """The child that folds and stores the batches dies mid-stream: the worker starts another,
    which reloads the states from Redis and goes on from the first batch not stored."""
    events = demo_events(5000, seed=14)
    valid = sum(e.well_formed for e in events)
    worker = workers.start()
    first, rest = events[: len(events) // 2], events[len(events) // 2 :]
    thread = threading.Thread(target=produce, args=(project, first), kwargs={"rate": 1500})
    thread.start()
    wait_for(lambda: archived(project) > valid // 4, 90, workers, "a quarter of the events")
    child = psutil.Process(_processing_child(workers))
    assert child.ppid() == worker.pid
    child.kill()
    thread.join(60)
    # the rest only now: a fast worker may have stored every event of the first half already
    produce(project, rest, rate=1500)
    wait_for(lambda: archived(project) >= valid, 120, workers, f"{valid} archived events after the child died")
    assert worker.poll() is None, workers.logs()
    assert "the processing child process died" in workers.log_text()
    successor = _processing_child(workers)
    assert successor != child.pid and psutil.Process(successor).ppid() == worker.pid
    time.sleep(0.5)
    check_values(project, events, to_millis(datetime.now(tz=UTC)))
    assert archived(project) == valid


def test_two_workers_share_the_partitions(project: Project, workers: Workers) -> None:
    events = demo_events(4000, seed=13)
    valid = sum(e.well_formed for e in events)
    workers.start()
    workers.start()
    time.sleep(3)  # both join the group before the events arrive
    produce(project, events)
    wait_for(lambda: archived(project) >= valid, 90, workers, f"{valid} archived events")
    time.sleep(0.5)
    check_values(project, events, to_millis(datetime.now(tz=UTC)))
    # Each worker's last assignment (from its log) holds some of the partitions, together all.
    owned = []
    for log in sorted(workers.log_dir.glob("worker*.log")):
        lines = [line for line in log.read_text().splitlines() if f"assigned {project.topic} partitions" in line]
        assert lines, f"{log.name} never got an assignment\n{workers.logs()}"
        owned.append({int(p) for p in lines[-1].strip().rsplit(" ", 1)[1].split(",") if p != "none"})
    assert len(owned) == 2 and all(owned), owned
    assert set().union(*owned) == {0, 1, 2, 3}
