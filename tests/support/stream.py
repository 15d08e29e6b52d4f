"""Helpers for end-to-end tests of `featurestream worker`: the demo project applied under unique
names, worker processes, a producer, archive counts, checks against the reference, and a tansu
broker with durable storage (S3 on a local moto server) that survives a kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
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
from featurestream.devstack.binaries import tansu_binary
from featurestream.devstack.procs import free_port, log_tail, wait_for_port
from featurestream.devstack.topics import create_topics
from featurestream.registry import Registry
from featurestream.storage.offline.layout import SCHEMA, table_name
from featurestream.storage.online.redis_store import RedisOnlineStore, merged_state
from featurestream.stream_jobs.app import build_runtimes
from featurestream.stream_jobs.processor import ViewRuntime
from tests.support.reference import assert_features_match, user_transactions_reference

DEMO = Path(__file__).resolve().parents[2] / "definitions"
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


def make_project(tmp_path: Path, postgres_url: str, redis_url: str, kafka: str) -> Project:
    """The demo definitions under a unique project and topic name (only the ``user_transactions``
    view, to keep the worker quick on two cores), applied to the registry at ``postgres_url``,
    with the source topic created on ``kafka``."""
    suffix = uuid.uuid4().hex[:8]
    definitions = tmp_path / "definitions"
    definitions.mkdir()
    for path in DEMO.glob("*.yaml"):
        text = path.read_text().replace("name: demo\n", f"name: demo{suffix}\n", 1)
        text = text.replace("topic: transactions\n", f"topic: transactions-{suffix}\n")
        (definitions / path.name).write_text(text)
    definition = load_project(definitions)
    definition = definition.model_copy(
        update={
            "feature_views": tuple(v for v in definition.feature_views if v.name == "user_transactions"),
            "feature_services": (),
            "consumers": (),
        }
    )
    Registry(postgres_url).apply(definition)
    source = definition.source("transactions")
    assert source is not None
    create_topics(kafka, {source.topic: source.partitions})
    env = {
        **os.environ,
        "FEATURESTREAM_KAFKA_BOOTSTRAP": kafka,
        "FEATURESTREAM_REDIS_URL": redis_url,
        "FEATURESTREAM_POSTGRES_URL": postgres_url,
    }
    return Project(definition.project.name, source.topic, definition, env, postgres_url, redis_url, kafka)


class Workers:
    """`featurestream worker` processes of one project, each in its own session, logs in ``log_dir``."""

    def __init__(self, project: Project, log_dir: Path) -> None:
        self.project = project
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *options: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"worker{len(self.procs)}.log").open("wb")
        cmd = [sys.executable, "-m", "featurestream.cli", "worker", "--project", self.project.name,
               "--metrics-port", "0", "--log-level", "info", *TEST_GROUP_SETTINGS, *options]  # fmt: skip
        # cwd: Faust makes its data directory (<app id>-data) there; not in the repository.
        proc = subprocess.Popen(
            cmd,
            env=self.project.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.log_dir,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def log_text(self, index: int = 0) -> str:
        return (self.log_dir / f"worker{index}.log").read_text(errors="replace")

    def logs(self, tail: int = 6000) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-tail:] for p in sorted(self.log_dir.glob("worker*.log"))
        )

    def wait_assigned(self, timeout: float = 30.0, index: int = 0) -> None:
        """Until worker ``index`` logged its first partition assignment (it is consuming)."""
        wait_for(
            lambda: f"assigned {self.project.topic} partitions" in self.log_text(index),
            timeout,
            self,
            "an assignment",
        )


def live_runtimes(registry: Registry, definition: ProjectDefinition) -> list[ViewRuntime]:
    """The runtimes of every live view of ``definition``'s project (one source), as the worker
    builds them."""
    snapshot = registry.snapshot(definition.project.name)
    [runtimes] = build_runtimes(definition, [(v.spec, v.version) for v in snapshot.views]).values()
    return runtimes


def wait_for(predicate: Callable[[], bool], timeout: float, workers: Workers, what: str) -> None:
    if not poll_until(predicate, timeout):
        pytest.fail(f"timed out waiting for {what}\n--- worker logs ---\n{workers.logs()}")


def poll_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


class Sender:
    """A plain (not idempotent) producer whose every delivery is checked.

    Idempotence is deliberately off: tansu 0.6.0 with S3 storage acknowledges a batch retried
    across a broker kill -9 as a duplicate (base offset -1) without having stored it, so an
    idempotent producer silently loses that batch there. Tests restart the broker only between
    ``send`` calls, after ``flush`` has confirmed every delivery.

    On the S3-backed broker every produce request costs several S3 calls (on moto, a Python
    server): use a long ``linger_ms`` there, or the broker takes ~100 events per second."""

    def __init__(self, project: Project, linger_ms: int = 5) -> None:
        self.project = project
        self.producer = Producer(
            {"bootstrap.servers": project.kafka, "linger.ms": linger_ms, "partitioner": "murmur2_random"}
        )
        self.errors: list[str] = []
        self.delivered = 0

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))
        else:
            self.delivered += 1

    def send(self, events: list[DemoEvent], rate: float = 0.0) -> None:
        """Send at ``rate`` events per second (0: at once), then wait for every delivery."""
        started = time.monotonic()
        for i, event in enumerate(events):
            self.producer.produce(
                self.project.topic, key=event.key, value=event.value, on_delivery=self._on_delivery
            )
            self.producer.poll(0)
            if rate:
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        assert self.producer.flush(30) == 0, "undelivered events after 30 s"
        assert not self.errors, f"delivery failures: {self.errors[:5]}"


def produce(project: Project, events: list[DemoEvent], rate: float = 0.0) -> None:
    Sender(project).send(events, rate)


def archived(project: Project) -> int:
    table = table_name("raw", "transactions")
    try:
        with psycopg.connect(project.postgres_url, connect_timeout=2) as conn:
            exists = conn.execute("select to_regclass(%s)", [f"{SCHEMA}.{table}"]).fetchone()
            if exists is None or exists[0] is None:
                return 0
            row = conn.execute(f'select count(*) from {SCHEMA}."{table}"').fetchone()
            return int(row[0]) if row else 0
    except psycopg.OperationalError:  # the server is being restarted
        return -1


def archived_events(project: Project) -> Counter[tuple[Any, ...]]:
    """The archive's rows as (user, amount, merchant, country, event ms), with multiplicity."""
    table = table_name("raw", "transactions")
    with psycopg.connect(project.postgres_url) as conn:
        rows = conn.execute(
            f'select user_id, amount, merchant, country, event_time from {SCHEMA}."{table}"'
        ).fetchall()
    return Counter((u, float(a), m, c, to_millis(t)) for u, a, m, c, t in rows)


def expected_archive(events: list[DemoEvent]) -> Counter[tuple[Any, ...]]:
    return Counter(
        (
            e.event["user_id"],
            float(e.event["amount"]),
            e.event["merchant"],
            e.event["country"],
            to_millis(e.event_time),
        )
        for e in events
        if e.event is not None and e.event_time is not None
    )


def assert_archived_once(project: Project, events: list[DemoEvent], workers: Workers | None = None) -> None:
    """Every well-formed event is in the archive exactly once (by content, not just by count)."""
    got, want = archived_events(project), expected_archive(events)
    missing, extra = want - got, got - want
    if missing or extra:
        pytest.fail(
            f"archive differs: {sum(missing.values())} missing (e.g. {list(missing)[:3]}), "
            f"{sum(extra.values())} extra (e.g. {list(extra)[:3]})"
            + (f"\n--- worker logs ---\n{workers.logs()}" if workers else "")
        )


def topic_values(kafka: str, topic: str, wanted: set[bytes], timeout: float = 30.0) -> Counter[bytes]:
    """The values in ``topic``, read from the start of every partition until each of ``wanted``
    has come (or ``timeout``), then until nothing more comes for a second: extra copies count.

    Not "until the end offsets": tansu's high watermark can be short of the true end."""
    consumer = Consumer(
        {"bootstrap.servers": kafka, "group.id": f"t-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        out: Counter[bytes] = Counter()
        missing = set(wanted)
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and (missing or time.monotonic() - quiet_since < 1.0):
            message = consumer.poll(0.2)
            if message is None or message.error():
                continue
            value = message.value() or b""
            out[value] += 1
            missing.discard(value)
            quiet_since = time.monotonic()
        return out
    finally:
        consumer.close()


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


def demo_events(count: int, seed: int) -> list[DemoEvent]:
    now = datetime.now(tz=UTC)
    return list(generate_transactions(count, seed=seed, now=now, users=300, malformed_share=0.01))


# --- a broker whose storage survives it ---------------------------------------------------


class DurableBroker:
    """tansu with ``s3://tansu/`` storage on a local moto S3 server: topics, records and committed
    offsets outlive a kill -9 of the broker. ``kill`` and ``start`` keep the port and the storage."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.s3_port = free_port()
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = work_dir / "tansu.log"
        moto_log = work_dir / "moto.log"
        moto = Path(sys.executable).with_name("moto_server")
        with moto_log.open("ab") as out:
            self.moto = subprocess.Popen(
                [str(moto), "-H", "127.0.0.1", "-p", str(self.s3_port)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.broker: subprocess.Popen[bytes] | None = None
        try:
            wait_for_port("moto S3 server", self.s3_port, moto_log, self.moto)
            request = urllib.request.Request(f"http://127.0.0.1:{self.s3_port}/tansu", method="PUT")
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200, response.status
            self.start()
        except BaseException:
            self.stop()
            raise

    def start(self) -> None:
        assert self.broker is None or self.broker.poll() is not None, "the broker is running"
        env = {
            **os.environ,
            "AWS_ENDPOINT": f"http://127.0.0.1:{self.s3_port}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        listener = f"tcp://{self.address}"
        argv = [str(tansu_binary()), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
                "--storage-engine", "s3://tansu/"]  # fmt: skip
        with self.log.open("ab") as out:
            self.broker = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_port("kafka (tansu, s3)", self.port, self.log, self.broker)

    def kill(self) -> None:
        """kill -9, nothing flushed."""
        assert self.broker is not None and self.broker.poll() is None, (
            f"the broker died:\n{log_tail(self.log)}"
        )
        self.broker.send_signal(signal.SIGKILL)
        self.broker.wait(10)

    def stop(self) -> None:
        for proc in (self.broker, self.moto):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
