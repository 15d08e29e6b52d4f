"""Detached service processes: start, wait for a port, recognise, stop.

A process is identified by (pid, create time, executable), so a recycled PID never
gets a signal meant for a service we started.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel, ConfigDict


class ServiceStartError(RuntimeError):
    """A service process exited or never opened its port."""


class ProcessRecord(BaseModel):
    """Enough to find a started process again from another interpreter."""

    model_config = ConfigDict(frozen=True)

    pid: int
    create_time: float
    executable: str


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it, so never 5432 or 6379 in use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def spawn_detached(
    argv: Sequence[str | Path],
    log: Path,
    *,
    user: str | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Start ``argv`` in its own session with output appended to ``log``.

    Its own session keeps it alive after the caller exits and away from the caller's
    terminal signals (Ctrl-C in the shell that ran ``dev up``).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd="/",  # hold no directory; a working dir unreadable by ``user`` breaks initdb/postgres
            env=env,
            **as_user(user),
        )
    ps = psutil.Process(proc.pid)
    record = ProcessRecord(pid=proc.pid, create_time=ps.create_time(), executable=str(argv[0]))
    return proc, record


def as_user(user: str | None) -> dict[str, Any]:
    """``Popen`` arguments to run as ``user`` with only that user's group.

    Setting just ``user=`` keeps root's group, and a parent directory owned by group root
    with mode 0701 then denies access through its (empty) group bits.
    """
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_for_port(
    name: str, port: int, log: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0
) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; fail fast if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceStartError(
                f"{name} exited with code {proc.returncode} before opening port {port}; "
                f"log {log}:\n{log_tail(log)}"
            )
        if port_open("127.0.0.1", port, timeout=0.2):
            return
        time.sleep(0.02)
    raise ServiceStartError(
        f"{name} did not accept connections on 127.0.0.1:{port} within {timeout:.0f}s; "
        f"log {log}:\n{log_tail(log)}"
    )


def find(record: ProcessRecord) -> psutil.Process | None:
    """The live process ``record`` describes, or None if it ended or the PID was reused."""
    try:
        ps = psutil.Process(record.pid)
        if abs(ps.create_time() - record.create_time) > 0.05 or ps.status() == psutil.STATUS_ZOMBIE:
            return None
        # Redis rewrites its process title, so compare the executable, not the command line.
        if os.path.realpath(ps.exe()) != os.path.realpath(record.executable):
            return None
        return ps
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_running(record: ProcessRecord) -> bool:
    return find(record) is not None


def stop(record: ProcessRecord, sig: int = signal.SIGTERM, timeout: float = 15.0) -> bool:
    """Stop the process ``record`` names, escalating to SIGKILL. False if it was not running."""
    ps = find(record)
    if ps is None:
        return False
    with contextlib.suppress(psutil.NoSuchProcess):
        ps.send_signal(sig)
    if not _wait_gone(ps, timeout):
        with contextlib.suppress(psutil.NoSuchProcess):
            ps.kill()
        _wait_gone(ps, 5.0)
    return True


def _wait_gone(ps: psutil.Process, timeout: float) -> bool:
    """Wait for exit; a zombie counts as gone (its parent may be a PID 1 that never reaps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ps.status() == psutil.STATUS_ZOMBIE:
                with contextlib.suppress(psutil.Error, ChildProcessError):
                    ps.wait(0)  # reap it when it is our own child (test fixtures)
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False
