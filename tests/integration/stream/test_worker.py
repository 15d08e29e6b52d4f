"""`featurestream worker` end to end on a real broker, Redis and PostgreSQL: the demo view's values
against an independent reference, dead letters on their topic, kill -9 and restart, two workers
sharing the partitions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from featurestream.definitions.loader import load_project
from featurestream.definitions.models import ProjectDefinition
from featurestream.demo.generator import DemoEvent, generate_transactions, to_millis
from featurestream.registry import Registry
from featurestream.storage.offline.layout import SCHEMA, table_name
from featurestream.storage.online.redis_store import RedisOnlineStore, merged_state
from featurestream.stream_jobs.processor import ViewRuntime
from tests.support.reference import assert_features_match, user_transactions_reference

DEMO = Path(__file__).resolve().parents[3] / "definitions"
TEST_GROUP_SETTINGS = ["--session-timeout", "2", "--heartbeat-interval", "0.5"]


@dataclass
class Project:
    name: str
    topic: str
    definition: ProjectDefinition
    env: dict[str, str]
    postgres_url: str
    redis_url: str
    kafka: str


@pytest.fixture
def project(tmp_path: Path, fresh_pg_url: str, redis_url: str, kafka_bootstrap: str, create_topic: Any) -> Project:
    """The demo definitions under a unique project and topic name, applied to a fresh registry."""
    suffix = uuid.uuid4().hex[:8]
    for path in DEMO.glob("*.yaml"):
        text = path.read_text().replace("name: demo\n", f"name: demo{suffix}\n", 1)
        text = text.replace("topic: transactions\n", f"topic: transactions-{suffix}\n")
        (tmp_path / path.name).write_text(text)
    definition = load_project(tmp_path)
    # Only the demo view the test checks, to keep the worker quick on two cores.
    definition = definition.model_copy(
        update={
            "feature_views": tuple(v for v in definition.feature_views if v.name == "user_transactions"),
            "feature_services": (),
            "consumers": (),
        }
    )
    Registry(fresh_pg_url).apply(definition)
    source = definition.source("transactions")
    assert source is not None
    create_topic(source.topic, partitions=source.partitions)
    env = {
        **os.environ,
        "FEATURESTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "FEATURESTREAM_REDIS_URL": redis_url,
        "FEATURESTREAM_POSTGRES_URL": fresh_pg_url,
    }
    return Project(definition.project.name, source.topic, definition, env, fresh_pg_url, redis_url, kafka_bootstrap)


class Workers:
    def __init__(self, project: Project, log_dir: Path) -> None:
        self.project = project
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"worker{len(self.procs)}.log").open("wb")
        cmd = [sys.executable, "-m", "featurestream.cli", "worker", "--project", self.project.name,
               "--metrics-port", "0", "--log-level", "info", *TEST_GROUP_SETTINGS]
        proc = subprocess.Popen(cmd, env=self.project.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.log_dir.glob("worker*.log")))


@pytest.fixture
def workers(project: Project, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(project, tmp_path)
    yield w
    w.stop_all()


def produce(project: Project, events: list[DemoEvent], rate: float = 0.0) -> None:
    producer = Producer({"bootstrap.servers": project.kafka, "linger.ms": 5, "partitioner": "murmur2_random"})
    started = time.monotonic()
    for i, event in enumerate(events):
        producer.produce(project.topic, key=event.key, value=event.value)
        producer.poll(0)
        if rate:
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    assert producer.flush(15) == 0


def archived(project: Project) -> int:
    table = table_name("raw", "transactions")
    with psycopg.connect(project.postgres_url) as conn:
        exists = conn.execute("select to_regclass(%s)", [f"{SCHEMA}.{table}"]).fetchone()
        if exists is None or exists[0] is None:
            return 0
        row = conn.execute(f'select count(*) from {SCHEMA}."{table}"').fetchone()
        return int(row[0]) if row else 0


def wait_for(predicate: Any, timeout: float, workers: Workers, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n--- worker logs ---\n{workers.logs()}")


def reference_by_user(events: list[DemoEvent]) -> dict[str, list[tuple[int, int, dict[str, Any]]]]:
    """Per user (event time, order sent, fields); the order breaks event-time ties like offsets do."""
    by_user: dict[str, list[tuple[int, int, dict[str, Any]]]] = defaultdict(list)
    for index, event in enumerate(events):
        if event.well_formed and event.event is not None and event.event_time is not None:
            by_user[event.user_id].append((to_millis(event.event_time), index, dict(event.event)))
    return by_user


def check_values(project: Project, events: list[DemoEvent], read_ms: int) -> None:
    definition = project.definition
    view = definition.feature_view("user_transactions")
    entity, source = definition.entity("user"), definition.source("transactions")
    assert view is not None and entity is not None and source is not None
    rt = ViewRuntime.build(view, 1, entity, source)
    store = RedisOnlineStore(project.redis_url, project.name)
    try:
        expected = reference_by_user(events)
        users = sorted(expected)
        loaded = store.load(view.name, 1, rt.agg, [(u,) for u in users])
        for user, subs in zip(users, loaded, strict=True):
            actual = rt.agg.evaluate(merged_state(rt.agg, subs)[0], read_ms)
            assert_features_match(actual, user_transactions_reference(expected[user], read_ms), where=user)
    finally:
        store.close()


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


def demo_events(count: int, seed: int) -> list[DemoEvent]:
    now = datetime.now(tz=UTC)
    events = list(generate_transactions(count, seed=seed, now=now, users=300, malformed_share=0.01))
    return events


def test_worker_end_to_end_with_dead_letters(project: Project, workers: Workers) -> None:
    events = demo_events(3000, seed=11)
    workers.start()
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

    import threading

    thread = threading.Thread(target=produce_all)
    thread.start()
    wait_for(lambda: archived(project) > valid // 4, 90, workers, "a quarter of the events")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    killed_at = archived(project)
    assert killed_at < valid, "the worker finished before it was killed; raise the event count"
    workers.start()
    thread.join(60)
    assert producer_done
    wait_for(lambda: archived(project) >= valid, 120, workers, f"{valid} archived events after the restart")
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
