"""Throwaway PostgreSQL database, Redis database numbers, server processes and Feast's venv."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from _stack import stop_process_group
from psycopg import sql

MARKER = "featurestream:compare-feast:owner"


@contextmanager
def throwaway_database(admin_url: str) -> Iterator[str]:
    name = f"fs_cmpfeast_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


@contextmanager
def redis_databases(server_url: str, count: int) -> Iterator[list[str]]:
    """``count`` empty database numbers of one Redis server, highest first, claimed with a marker
    key (so a concurrent run skips them); only these are flushed, at the end."""
    base = server_url.rstrip("/")
    probe = redis.Redis.from_url(base)
    try:
        total = int(probe.config_get("databases").get("databases", 16))
    finally:
        probe.close()
    claimed: list[str] = []
    try:
        for db in range(total - 1, 0, -1):
            client = redis.Redis.from_url(f"{base}/{db}")
            try:
                if client.dbsize() == 0 and client.set(MARKER, str(os.getpid()), nx=True):
                    if client.dbsize() == 1:
                        claimed.append(f"{base}/{db}")
                    else:  # someone else started writing here at the same moment
                        client.delete(MARKER)
            finally:
                client.close()
            if len(claimed) == count:
                break
        if len(claimed) < count:
            raise RuntimeError(f"fewer than {count} empty Redis databases on {base}")
        yield claimed
    finally:
        for url in claimed:
            with suppress(redis.RedisError):
                client = redis.Redis.from_url(url)
                if client.get(MARKER) == str(os.getpid()).encode():
                    client.flushdb()
                client.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """A server process in its own session, stopped with SIGTERM (then SIGKILL) by its pid."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.name = name
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)

    def wait_http(self, port: int, path: str, body: bytes, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except Exception as exc:
                last = str(exc)
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready on port {port} after {timeout:.0f} s ({last}):\n"
                           f"{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        stop_process_group(self.proc, 20)


def default_feast_venv() -> Path:
    home = Path(os.environ.get("FEATURESTREAM_HOME", Path.home() / ".featurestream"))
    return home / "feast-venv"


def ensure_feast_venv(venv: Path, version: str) -> Path:
    """Feast (with its Redis extra) and matplotlib in a virtual environment of their own, created
    when missing; never the project's environment. Returns its python."""
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import feast, matplotlib"], capture_output=True) if python.exists() else None
    if probe is not None and probe.returncode == 0:
        return python
    print(f"creating Feast's virtual environment in {venv} (feast[redis]=={version}, matplotlib)", file=sys.stderr)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"feast[redis]=={version}", "matplotlib"], check=True)
    return python


class OverMemory(RuntimeError):
    """The process passed its memory limit and was stopped."""


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measured(command: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
             memory_limit_mb: float | None = None) -> tuple[float, float, str, str]:
    """Run to completion: (wall seconds, peak memory MB of that process = its ru_maxrss, stdout, stderr).

    With ``memory_limit_mb`` the process is killed once its resident memory passes the limit (a
    shared machine must not meet the OOM killer) and ``OverMemory`` is raised."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    chunks: dict[str, bytes] = {}
    over: list[int] = []
    finished = threading.Event()

    def drain(name: str, stream: IO[bytes]) -> None:  # a chatty child never blocks on a full pipe
        chunks[name] = stream.read()

    def guard() -> None:
        assert memory_limit_mb is not None
        while not finished.wait(0.25):
            rss = _rss_kb(proc.pid)
            if rss > memory_limit_mb * 1024:
                over.append(rss)
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                return

    assert proc.stdout is not None and proc.stderr is not None
    threads = [threading.Thread(target=drain, args=pair) for pair in (("out", proc.stdout), ("err", proc.stderr))]
    if memory_limit_mb:
        threads.append(threading.Thread(target=guard, daemon=True))
    for thread in threads:
        thread.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    finished.set()
    for thread in threads:
        thread.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = chunks.get("out", b"").decode(errors="replace"), chunks.get("err", b"").decode(errors="replace")
    if over:
        raise OverMemory(f"stopped after {seconds:.0f} s: resident memory passed the limit of "
                         f"{memory_limit_mb / 1024:g} GB")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:5])} ... failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, out, err
