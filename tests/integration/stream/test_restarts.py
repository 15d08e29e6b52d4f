"""`featurestream worker` through restarts of the services under it: PostgreSQL (fast shutdown
or kill -9) and the broker (kill -9, durable storage). The worker process keeps running, and in
the end every valid event is archived exactly once and the Redis values equal the reference."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from featurestream.demo.generator import DemoEvent, to_millis
from featurestream.devstack.procs import free_port
from featurestream.devstack.services import start_postgres
from tests.support.stream import (
    DurableBroker,
    Project,
    Sender,
    Workers,
    archived,
    assert_archived_once,
    check_values,
    demo_events,
    make_project,
    poll_until,
    topic_values,
    wait_for,
)


def _finish(project: Project, workers: Workers, events: list[DemoEvent], worker_pid: int) -> None:
    valid = sum(e.well_formed for e in events)
    poll_until(lambda: archived(project) >= valid, 45)  # if not, the next line says what is missing
    time.sleep(0.5)  # the Redis write follows the archive commit
    assert_archived_once(project, events, workers)
    check_values(project, events, to_millis(datetime.now(tz=UTC)))
    proc = workers.procs[0]
    assert len(workers.procs) == 1 and proc.pid == worker_pid and proc.poll() is None, (
        f"the worker died\n{workers.logs()}"
    )
    assert "Traceback" not in workers.log_text(), f"the worker logged an exception\n{workers.logs()}"
    # Dead letters are at least once (a send cut by a broker kill may repeat): the same set.
    malformed = {e.value for e in events if not e.well_formed}
    letters = topic_values(project.kafka, f"{project.topic}.dlq", malformed)
    assert set(letters) == malformed, (
        f"{len(letters)} distinct dead letters, {len(malformed)} malformed events"
    )


# --- PostgreSQL -------------------------------------------------------------------------


class OwnPostgres:
    """A PostgreSQL of this test's own (never the machine's), restartable on its port and data."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = start_postgres(free_port(), root / "postgres.log", root / "data")
        self.address = self.server.state.address

    def stop(self, how: str) -> None:
        if how == "fast":
            self.server.stop()  # SIGINT: fast shutdown, sessions are terminated
        else:  # the postmaster and every backend at once, as in a crash; recovery at the start
            os.killpg(self.server.popen.pid, signal.SIGKILL)
            self.server.popen.wait(10)

    def start(self) -> None:
        self.server = start_postgres(self.server.state.port, self.root / "postgres.log", self.root / "data")
        assert self.server.state.address == self.address


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    # Not under pytest's basetemp: its parents are mode 0700 and PostgreSQL runs unprivileged.
    root = Path(tempfile.mkdtemp(prefix="featurestream-test-pgrestart-"))
    server = OwnPostgres(root)
    try:
        yield server
    finally:
        server.server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("how", ["fast", "kill9"])
def test_postgres_restart_mid_stream(
    how: str, own_postgres: OwnPostgres, redis_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    project = make_project(tmp_path, own_postgres.address, redis_url, kafka_bootstrap)
    workers = Workers(project, tmp_path)
    try:
        events = demo_events(6000, seed=21)
        valid = sum(e.well_formed for e in events)
        worker = workers.start()
        workers.wait_assigned()
        sender = Sender(project)
        thread = threading.Thread(target=sender.send, args=(events, 1000.0))
        thread.start()
        wait_for(lambda: archived(project) > valid // 4, 30, workers, "a quarter of the events")
        own_postgres.stop(how)
        time.sleep(3)
        own_postgres.start()
        thread.join(30)
        assert not thread.is_alive() and sender.delivered == len(events)
        _finish(project, workers, events, worker.pid)
        at_restart = workers.log_text().count("retrying in")
        assert at_restart > 0, f"the worker never saw PostgreSQL go away\n{workers.logs()}"
        assert archived(project) == valid
    finally:
        workers.stop_all()


# --- the broker -------------------------------------------------------------------------

BROKER_DOWN_S = 3.0  # longer than the test group's session timeout (2 s)


@pytest.fixture
def durable_broker() -> Iterator[DurableBroker]:
    root = Path(tempfile.mkdtemp(prefix="featurestream-test-broker-"))
    broker = DurableBroker(root)
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_broker_kill_9_mid_stream(
    durable_broker: DurableBroker, fresh_pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    project = make_project(tmp_path, fresh_pg_url, redis_url, durable_broker.address)
    workers = Workers(project, tmp_path)
    try:
        events = demo_events(6000, seed=22)
        first, burst, rest = events[:2000], events[2000:3500], events[3500:]
        worker = workers.start()
        workers.wait_assigned()
        sender = Sender(project, linger_ms=100)
        sender.send(first, rate=1000)
        sender.send(burst)  # at once: the worker is busy with it when the broker dies
        durable_broker.kill()
        at_kill = archived(project)
        valid_before = sum(e.well_formed for e in first + burst)
        print(f"archived at the kill: {at_kill} of {valid_before}")
        assert at_kill < valid_before, "the worker caught up before the kill; raise the burst"
        time.sleep(BROKER_DOWN_S)
        assert worker.poll() is None, f"the worker died with the broker\n{workers.logs()}"
        durable_broker.start()
        sender.send(rest, rate=1000)
        assert sender.delivered == len(events)
        _finish(project, workers, events, worker.pid)
        # The broker kept every record once: a difference here is the broker's, not the worker's.
        in_topic = topic_values(project.kafka, project.topic, {e.value for e in events})
        assert in_topic == Counter(e.value for e in events)
    finally:
        workers.stop_all()
