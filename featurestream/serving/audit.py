"""Where reads leave a trace: the PII audit log and the per-feature, per-client usage counts.

``AuditLog`` appends one JSON object per line; each record is a single ``os.write`` on a file
opened with ``O_APPEND``, so records from several threads (a lock) or processes (the kernel's
append) never interleave, and nothing sits in a userspace buffer when the process dies.

``UsageCounter`` counts reads in memory on the request path and hands them to a sink (the
registry's ``record_feature_usage``) from a background thread every few seconds and at close,
so a slow or unreachable registry never delays a request.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurestream.registry.usage import UsageIncrement, record_feature_usage

if TYPE_CHECKING:
    from featurestream.registry.store import Registry

log = logging.getLogger(__name__)

UsageSink = Callable[[list[UsageIncrement]], None]


class AuditLog:
    """An append-only JSON-lines file; ``write`` returns once the record is in the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # 0600: the log names who read which entity's personal data.
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; raises OSError when it cannot be written (disk full, closed)."""
        data = (json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str) + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise OSError(f"the audit log {self.path} is closed")
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


UsageKey = tuple[str, int, str, str]
"""(view, version, feature, client)"""


class UsageCounter:
    """Read counts of one project, flushed to ``sink`` every ``interval_s`` seconds and at ``close``.

    A failed flush keeps its counts for the next one (and logs a warning), so counts are lost
    only when the process dies between flushes.
    """

    def __init__(self, project: str, sink: UsageSink, interval_s: float = 5.0, *, start: bool = True) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.project = project
        self.interval_s = interval_s
        self._sink = sink
        self._counts: dict[UsageKey, tuple[int, datetime]] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time, so re-queued counts stay ordered
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name="featurestream-usage-flush", daemon=True)
            self._thread.start()

    def add(self, view: str, version: int, feature: str, client: str, reads: int, at: datetime) -> None:
        self.add_many([(view, version, feature)], client, reads, at)

    def add_many(self, features: Iterable[tuple[str, int, str]], client: str, reads: int, at: datetime) -> None:
        """``reads`` reads by ``client`` of each (view, version, feature): one request's worth."""
        with self._lock:
            for view, version, feature in features:
                self._merge((view, version, feature, client), reads, at)

    def _merge(self, key: UsageKey, reads: int, at: datetime) -> None:
        old = self._counts.get(key)
        self._counts[key] = (reads, at) if old is None else (old[0] + reads, max(old[1], at))

    def pending(self) -> dict[UsageKey, int]:
        """Counts not yet flushed."""
        with self._lock:
            return {key: reads for key, (reads, _) in self._counts.items()}

    def flush(self) -> int:
        """Hand the counts gathered so far to the sink; the number of rows handed, 0 on failure."""
        with self._flush_lock:
            with self._lock:
                taken, self._counts = self._counts, {}
            if not taken:
                return 0
            increments = [
                UsageIncrement(self.project, view, version, feature, client, reads, at)
                for (view, version, feature, client), (reads, at) in sorted(taken.items())
            ]
            try:
                self._sink(increments)
            except Exception as exc:  # the registry being down must not kill the thread or lose counts
                log.warning("could not record feature usage (kept for the next flush): %s", exc)
                with self._lock:
                    for key, (reads, at) in taken.items():
                        self._merge(key, reads, at)
                return 0
            return len(increments)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def close(self) -> None:
        """Stop the background thread and flush what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()


def registry_sink(registry: Registry) -> UsageSink:
    """A sink adding the counts to the registry's usage table (one transaction per flush)."""

    def write(increments: list[UsageIncrement]) -> None:
        with registry.connection() as conn:
            record_feature_usage(conn, increments)

    return write
