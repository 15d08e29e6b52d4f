"""The dev stack: start, stop and inspect the three embedded services as one unit.

Layout under ``$FEATURESTREAM_HOME/dev/``: ``stack.json`` (addresses and PIDs, read by
``featurestream.config``), ``<service>.log``, ``postgres/`` and ``redis/`` (data), ``.lock``.
The stack is disposable: the broker keeps topics in memory only, so every ``up`` starts
all three from empty data, and Kafka offsets stored in PostgreSQL never outlive their topics.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from featurestream.config import ServiceAddresses, dev_state_path
from featurestream.devstack import health, procs
from featurestream.devstack.services import (
    ServiceState,
    StartedService,
    start_kafka,
    start_postgres,
    start_redis,
)

SERVICE_NAMES = ("kafka", "redis", "postgres")
STATE_VERSION = 1


class StackState(BaseModel):
    """The content of ``stack.json``."""

    model_config = ConfigDict(frozen=True)

    version: int = STATE_VERSION
    started_at: datetime
    addresses: ServiceAddresses
    services: dict[str, ServiceState]


@dataclass(frozen=True)
class UpResult:
    state: StackState
    already_running: bool
    were_down: list[str] = field(default_factory=list)  # of a stale stack, replaced whole


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    address: str
    pid: int
    running: bool
    problem: str | None  # None when reachable
    log: str

    @property
    def reachable(self) -> bool:
        return self.running and self.problem is None


def dev_dir() -> Path:
    return dev_state_path().parent


class StateFileError(RuntimeError):
    """``stack.json`` exists but cannot be read."""


def load_state() -> StackState | None:
    path = dev_state_path()
    if not path.is_file():
        return None
    try:
        return StackState.model_validate_json(path.read_text())
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise StateFileError(
            f"cannot read the dev stack state {path} ({exc}); stop its tansu, redis-server and "
            "postgres processes by hand, then delete the file"
        ) from exc


def _save_state(state: StackState) -> None:
    path = dev_state_path()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(state.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)  # readers never see half a file


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise ``up`` and ``down`` across processes."""
    dev_dir().mkdir(parents=True, exist_ok=True)
    with (dev_dir() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def up() -> UpResult:
    """Start the stack unless it already runs; a partly dead stack is replaced whole."""
    with _locked():
        current = load_state()
        were_down: list[str] = []
        if current is not None:
            were_down = [n for n in SERVICE_NAMES if not _alive(current, n)]
            if not were_down:
                return UpResult(current, already_running=True)
            _stop_all(current)
        _wipe_data(logs=True)
        state = _start_all()
        _save_state(state)
        return UpResult(state, already_running=False, were_down=were_down)


def _alive(state: StackState, name: str) -> bool:
    service = state.services.get(name)
    return service is not None and procs.is_running(service.process)


def _start_all() -> StackState:
    home = dev_dir()
    started: list[StartedService] = []
    try:
        started.append(start_kafka(procs.free_port(), home / "kafka.log"))
        started.append(start_redis(procs.free_port(), home / "redis.log", home / "redis"))
        started.append(start_postgres(procs.free_port(), home / "postgres.log", home / "postgres"))
    except BaseException:
        for service in started:
            service.stop()
        raise
    services = {s.state.name: s.state for s in started}
    addresses = ServiceAddresses(
        kafka_bootstrap=services["kafka"].address,
        redis_url=services["redis"].address,
        postgres_url=services["postgres"].address,
    )
    return StackState(started_at=datetime.now(UTC), addresses=addresses, services=services)


def down() -> dict[str, tuple[int, bool]]:
    """Stop the recorded processes and forget the stack: name -> (pid, was it running)."""
    with _locked():
        state = load_state()
        if state is None:
            return {}
        stopped = _stop_all(state)
        dev_state_path().unlink(missing_ok=True)
        _wipe_data()
        return stopped


def _stop_all(state: StackState) -> dict[str, tuple[int, bool]]:
    # Only processes whose PID, start time and executable match the record get a signal.
    return {name: (s.process.pid, s.stop()) for name, s in state.services.items()}


def _wipe_data(logs: bool = False) -> None:
    for name in ("postgres", "redis"):
        shutil.rmtree(dev_dir() / name, ignore_errors=True)
    if logs:  # only at ``up``: after ``down`` the logs stay for a post-mortem
        for name in SERVICE_NAMES:
            (dev_dir() / f"{name}.log").unlink(missing_ok=True)


def status(check: bool = True) -> list[ServiceStatus]:
    """One row per recorded service; empty when no stack was started."""
    state = load_state()
    if state is None:
        return []
    rows = []
    for name, svc in state.services.items():
        running = procs.is_running(svc.process)
        problem = "process not running" if not running else None
        if running and check:
            problem = health.CHECKS[name](svc.address)
        rows.append(ServiceStatus(name, svc.address, svc.process.pid, running, problem, svc.log))
    return rows


def status_json(rows: list[ServiceStatus]) -> str:
    return json.dumps(
        {
            "state_file": str(dev_state_path()),
            "running": bool(rows) and all(r.reachable for r in rows),
            "services": [
                {
                    "name": r.name,
                    "address": r.address,
                    "pid": r.pid,
                    "running": r.running,
                    "reachable": r.reachable,
                    "problem": r.problem,
                    "log": r.log,
                }
                for r in rows
            ],
        },
        indent=2,
    )
