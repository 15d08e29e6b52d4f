"""``featurestream.OnlineReader``: the serving layer called in-process, without a server.

For scripts, notebooks and services that sit next to Redis: the same resolution, one-round-trip
read, request-time evaluation and statuses as the gRPC and REST servers, minus the network hop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from featurestream.registry import Registry
from featurestream.registry.records import ProjectSnapshot
from featurestream.serving.service import OnlineService, ServedRows, ServingLimits


class OnlineReader:
    """Reads features of one project; the registry is read once (``refresh()`` reloads it)."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        postgres_url: str | None = None,
        project: str | None = None,
        cache_ttl_ms: int = 0,
        limits: ServingLimits | None = None,
        memo_entries: int = 4096,
    ) -> None:
        from featurestream.config import require

        self._registry = Registry(postgres_url or require("postgres_url"))
        if project is None:
            projects = self._registry.projects()
            if len(projects) != 1:
                raise ValueError(f"name the project (the registry holds: {', '.join(projects) or 'none'})")
            project = projects[0]
        self.project = project
        self._snapshot: ProjectSnapshot = self._registry.snapshot(project)
        self.service = OnlineService(
            lambda: self._snapshot, redis_url or require("redis_url"), cache_ttl_ms=cache_ttl_ms, limits=limits,
            memo_entries=memo_entries,
        )

    def refresh(self) -> None:
        """Pick up a new registry version (an apply or a retire)."""
        self._snapshot = self._registry.snapshot(self.project)

    def get_rows(
        self, entities: Sequence[dict[str, str]], features: Sequence[str] = (), feature_service: str = ""
    ) -> ServedRows:
        return self.service.get_online(entities, features, feature_service)

    def get(
        self, entities: Sequence[dict[str, str]], features: Sequence[str] = (), feature_service: str = ""
    ) -> dict[str, Any]:
        """``{"results": [{"entity": ..., "features": {"view:feature": {"value", "status", "event_time"}}}]}``."""
        from featurestream.serving.rest import rows_to_json

        return rows_to_json(self.get_rows(entities, features, feature_service))

    def close(self) -> None:
        self.service.close()
