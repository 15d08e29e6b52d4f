"""`featurestream dev up|status|down` run as a user would: a separate process, no terminal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
import redis
from confluent_kafka.admin import AdminClient

from featurestream.config import ENV_CONFIG, ENV_HOME, ENV_KAFKA, ENV_POSTGRES, ENV_REDIS
from featurestream.devstack.procs import ServiceStartError, free_port, spawn_detached, wait_for_port
from featurestream.devstack.services import start_kafka

pytestmark = pytest.mark.integration


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_KAFKA, ENV_REDIS, ENV_POSTGRES)}
    env.update({ENV_HOME: str(home), ENV_CONFIG: str(home / "absent.yaml"), "CI": "true"})
    return subprocess.run(
        [sys.executable, "-c", "from featurestream.cli import main; main()", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def home() -> Iterator[Path]:
    # Outside pytest's basetemp, whose parents pytest keeps at mode 0700 (see conftest).
    path = Path(tempfile.mkdtemp(prefix="featurestream-devstack-test-"))
    yield path
    cli(path, "dev", "down")  # whatever the test left running
    shutil.rmtree(path, ignore_errors=True)


def read_state(home: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((home / "dev" / "stack.json").read_text())  # type: ignore[no-any-return]


def test_up_status_down(home: Path, tmp_path: Path) -> None:
    # A broker the stack did not start: `down` must leave it alone.
    bystander = start_kafka(free_port(), tmp_path / "bystander.log")
    try:
        first = cli(home, "dev", "up")
        assert first.returncode == 0, first.stdout + first.stderr
        assert "started" in first.stdout
        state = read_state(home)
        pids = {name: s["process"]["pid"] for name, s in state["services"].items()}
        assert set(pids) == {"kafka", "redis", "postgres"}

        # The CLI has exited; its services run on and answer real clients.
        status = cli(home, "dev", "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        report = json.loads(status.stdout)
        assert report["running"] is True
        assert {s["name"]: s["reachable"] for s in report["services"]} == dict.fromkeys(pids, True)
        addresses = state["addresses"]
        with psycopg.connect(addresses["postgres_url"], connect_timeout=5) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        client = redis.Redis.from_url(addresses["redis_url"])
        assert client.ping() is True
        client.close()
        metadata = AdminClient({"bootstrap.servers": addresses["kafka_bootstrap"]}).list_topics(timeout=10)
        assert metadata.brokers

        table = cli(home, "dev", "status")  # rich table with no terminal
        assert table.returncode == 0, table.stderr
        assert addresses["postgres_url"] in table.stdout and "reachable" in table.stdout

        again = cli(home, "dev", "up")
        assert again.returncode == 0, again.stderr
        assert "already running" in again.stdout
        assert {n: s["process"]["pid"] for n, s in read_state(home)["services"].items()} == pids

        down = cli(home, "dev", "down")
        assert down.returncode == 0, down.stderr
        assert all(gone(pid) for pid in pids.values()), down.stdout
        assert not (home / "dev" / "stack.json").exists()
        assert not (home / "dev" / "postgres").exists()
        assert not gone(bystander.state.process.pid)

        after = cli(home, "dev", "status")
        assert after.returncode == 1
        assert "No dev stack is running" in after.stdout
    finally:
        bystander.stop()


def test_down_spares_a_process_that_is_not_the_one_recorded(home: Path) -> None:
    assert cli(home, "dev", "up").returncode == 0
    state = read_state(home)
    redis_pid = state["services"]["redis"]["process"]["pid"]
    # Same PID, other start time: what a recycled PID looks like.
    state["services"]["redis"]["process"]["create_time"] -= 1000
    (home / "dev" / "stack.json").write_text(json.dumps(state))
    try:
        down = cli(home, "dev", "down")
        assert down.returncode == 0, down.stderr
        assert f"redis (pid {redis_pid}) was not running" in down.stdout
        assert not gone(redis_pid)
    finally:
        if not gone(redis_pid):
            psutil.Process(redis_pid).terminate()


def test_up_replaces_a_partly_dead_stack(home: Path) -> None:
    assert cli(home, "dev", "up").returncode == 0
    before = read_state(home)["services"]
    psutil.Process(before["redis"]["process"]["pid"]).kill()
    up = cli(home, "dev", "up")
    assert up.returncode == 0, up.stderr
    assert "partly down (redis)" in up.stdout
    assert gone(before["kafka"]["process"]["pid"])  # the old survivors were stopped too
    status = json.loads(cli(home, "dev", "status", "--json").stdout)
    assert status["running"] is True


def test_a_port_that_never_opens_is_named_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "sleepy.log"
    port = free_port()
    proc, _ = spawn_detached(["sleep", "30"], log)
    try:
        with pytest.raises(ServiceStartError) as info:
            wait_for_port("sleepy", port, log, proc, timeout=0.3)
        assert f"sleepy did not accept connections on 127.0.0.1:{port}" in str(info.value)
        assert str(log) in str(info.value)
    finally:
        proc.kill()
        proc.wait()


def test_a_service_that_exits_early_shows_its_log(tmp_path: Path) -> None:
    log = tmp_path / "broken.log"
    proc, _ = spawn_detached(["sh", "-c", "echo bad flag >&2; exit 3"], log)
    with pytest.raises(ServiceStartError) as info:
        wait_for_port("broken", free_port(), log, proc, timeout=10)
    assert "exited with code 3" in str(info.value)
    assert "bad flag" in str(info.value)


# --- The shared fixtures in tests/conftest.py work on whichever path this run took ---------


def test_postgres_fixtures_give_separate_databases(postgres_url: str, fresh_pg_url: str) -> None:
    with psycopg.connect(postgres_url) as a, psycopg.connect(fresh_pg_url) as b:
        name_a = a.execute("select current_database()").fetchone()
        name_b = b.execute("select current_database()").fetchone()
        tables = b.execute("select count(*) from pg_tables where schemaname = 'public'").fetchone()
    assert name_a != name_b
    assert tables == (0,)


def test_redis_fixture_is_a_dedicated_database(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.connection_pool.connection_kwargs["db"] != 0
        client.set("fixture-probe", "1")
        assert client.get("fixture-probe") == b"1"
        client.delete("fixture-probe")
    finally:
        client.close()


def test_create_topic_uses_the_partition_count(kafka_bootstrap: str, create_topic: Callable[..., str]) -> None:
    topic = create_topic(partitions=3)
    metadata = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(topic, timeout=10)
    assert len(metadata.topics[topic].partitions) == 3
    assert create_topic(topic, partitions=3) == topic  # an existing topic is fine
