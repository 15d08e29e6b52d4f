"""The registry snapshot serving reads from, reloaded in the background when the registry changes.

``SnapshotProvider`` is the callable ``OnlineService`` (and the catalog API) is built with:
calling it returns the current ``ProjectSnapshot`` without any I/O, so the request path never
waits on PostgreSQL. A daemon thread polls ``Registry.registry_version(project)`` at most every
``poll_s`` seconds and loads a new snapshot only when the version moved. While PostgreSQL is
unreachable, serving continues with the last snapshot; the error is logged once per outage and
kept in ``last_error``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from featurestream.registry.records import ProjectSnapshot
from featurestream.registry.store import Registry

log = logging.getLogger(__name__)


class SnapshotProvider:
    """``provider()`` -> the current snapshot of ``project``; reloads when its registry version changes."""

    def __init__(
        self,
        registry: Registry,
        project: str,
        *,
        poll_s: float = 5.0,
        start: bool = True,
        on_reload: Callable[[ProjectSnapshot], None] | None = None,
    ) -> None:
        if poll_s <= 0:
            raise ValueError("poll_s must be positive")
        self.registry = registry
        self.project = project
        self.poll_s = poll_s
        self._on_reload: list[Callable[[ProjectSnapshot], None]] = [on_reload] if on_reload else []
        self._snapshot = registry.snapshot(project)  # fails loudly at start-up: no project, no server
        self.loaded_at = time.time()
        self.checked_at = self.loaded_at
        self.last_error: str | None = None
        self.reloads = 0
        self._lock = threading.Lock()  # one check at a time (the poller and refresh())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    def __call__(self) -> ProjectSnapshot:
        return self._snapshot

    @property
    def snapshot(self) -> ProjectSnapshot:
        return self._snapshot

    @property
    def registry_version(self) -> int:
        return self._snapshot.registry_version

    def add_reload_listener(self, listener: Callable[[ProjectSnapshot], None]) -> None:
        """Called (on the polling thread) with each newly loaded snapshot."""
        self._on_reload.append(listener)

    def refresh(self) -> bool:
        """Check the registry now; True when a new snapshot was loaded. Raises on registry errors."""
        with self._lock:
            self.checked_at = time.time()
            version = self.registry.registry_version(self.project)
            if version == self._snapshot.registry_version:
                return False
            snapshot = self.registry.snapshot(self.project)
            if snapshot.registry_version == self._snapshot.registry_version:
                return False
            self._snapshot = snapshot
            self.loaded_at = time.time()
            self.reloads += 1
        log.info("project %s: loaded registry version %d", self.project, snapshot.registry_version)
        for listener in self._on_reload:
            try:
                listener(snapshot)
            except Exception:
                log.exception("snapshot reload listener failed")
        return True

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"snapshot-{self.project}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception as exc:  # keep serving the last snapshot
                message = f"{type(exc).__name__}: {str(exc).strip()}"
                if self.last_error is None:
                    log.warning("project %s: cannot poll the registry, serving version %d: %s",
                                self.project, self._snapshot.registry_version, message)
                self.last_error = message
            else:
                if self.last_error is not None:
                    log.info("project %s: registry reachable again", self.project)
                self.last_error = None

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self.poll_s + 5.0)
