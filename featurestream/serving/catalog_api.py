"""The catalog as the serving API shows it (ListFeatures, DescribeFeature; the REST mirror too).

``RegistryCatalog`` answers from the serving snapshot (the live view versions) plus the read
counts of ``registry.usage``, which it re-reads at most every ``usage_ttl_s`` seconds. Each
feature is a dict with the fields of ``featurestream.v1.FeatureInfo``; a feature view with
several live versions lists each of its features once per version.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from featurestream.definitions.models import Feature, FeatureView, ProjectDefinition
from featurestream.definitions.types import format_duration
from featurestream.registry.catalog import CatalogData, feature_owner, output_type, search, window_text
from featurestream.registry.records import ProjectSnapshot, ViewVersion
from featurestream.registry.store import Registry
from featurestream.registry.usage import UsageRow, feature_usage
from featurestream.serving.refs import ServingError

log = logging.getLogger(__name__)

_FEATURE_REF = re.compile(r"^(?P<view>[a-z][a-z0-9_]*)(@(?P<version>[0-9]+))?(:(?P<feature>[a-z][a-z0-9_]*))?$")


def feature_info(definition: ProjectDefinition, live: ViewVersion, feature: Feature, reads: int = 0) -> dict[str, Any]:
    """The FeatureInfo fields of one feature of one live view version."""
    view: FeatureView = live.spec
    entity = definition.entity(view.entity)
    return {
        "name": f"{live.name}:{feature.name}",
        "view_version": live.version,
        "description": feature.description,
        "owner": feature_owner(view, feature),
        "tags": list(feature.tags),
        "dtype": output_type(definition, view, feature) or "",
        "aggregation": feature.aggregation,
        "window": window_text(feature),
        "pii": feature.pii,
        "max_age": format_duration(feature.max_age) if feature.max_age else "",
        "entity": view.entity,
        "join_keys": [k.name for k in entity.join_keys] if entity else [],
        "source": view.source,
        "reads": reads,
    }


class RegistryCatalog:
    """A ``CatalogReader`` over the registry for the project the server serves."""

    def __init__(
        self,
        registry: Registry,
        snapshot: Callable[[], ProjectSnapshot],
        *,
        usage_ttl_s: float = 10.0,
    ) -> None:
        self.registry = registry
        self._snapshot = snapshot
        self.usage_ttl_s = usage_ttl_s
        self._usage: dict[tuple[str, str], list[UsageRow]] = {}
        self._usage_read_at = float("-inf")
        self._lock = threading.Lock()

    # ------------------------------------------------------------ CatalogReader

    def list_features(self, query: str = "") -> list[dict[str, Any]]:
        """Every feature of every live view version; with a query, those matching all its words
        (names, descriptions, tags, owners), best match first."""
        snapshot = self._snapshot()
        definition = snapshot.definition
        reads = self._reads(snapshot.project)
        pairs = [(live, feature) for live in snapshot.views for feature in live.spec.features]
        if not query.strip():
            pairs.sort(key=lambda p: (p[0].name, p[0].version, p[1].name))
        else:
            scores = {entry.name: score for entry, score in search(CatalogData(definition=definition), query, limit=1 << 30)
                      if entry.kind == "feature"}
            pairs = [p for p in pairs if f"{p[0].name}:{p[1].name}" in scores]
            pairs.sort(key=lambda p: (-scores[f"{p[0].name}:{p[1].name}"], p[0].name, -p[0].version, p[1].name))
        return [feature_info(definition, live, feature, reads.get((live.name, live.version, feature.name), 0))
                for live, feature in pairs]

    def describe_feature(self, name: str) -> dict[str, Any]:
        """One feature: ``view:feature`` (the view's latest live version) or ``view@N:feature``."""
        match = _FEATURE_REF.match(name.strip())
        if match is None or match.group("feature") is None:
            raise ServingError("INVALID_ARGUMENT", f"'{name}' is not a feature name ('view:feature' or 'view@N:feature')")
        view_name, feature_name = match.group("view"), match.group("feature")
        version = int(match.group("version")) if match.group("version") else None
        snapshot = self._snapshot()
        versions = [v for v in snapshot.views if v.name == view_name]
        if not versions:
            raise ServingError("NOT_FOUND", f"no live feature view '{view_name}' in project '{snapshot.project}' (in '{name}')")
        if version is None:
            live = versions[-1]
        else:
            found = next((v for v in versions if v.version == version), None)
            if found is None:
                listed = ", ".join(str(v.version) for v in versions)
                raise ServingError("NOT_FOUND", f"feature view '{view_name}' has no live version {version} "
                                                f"(live: {listed}) (in '{name}')")
            live = found
        feature = live.spec.feature(feature_name)
        if feature is None:
            raise ServingError("NOT_FOUND", f"no feature '{feature_name}' in feature view '{view_name}' "
                                            f"version {live.version} (in '{name}')")
        reads = self._reads(snapshot.project).get((live.name, live.version, feature.name), 0)
        return feature_info(snapshot.definition, live, feature, reads)

    # ------------------------------------------------------------ usage

    def _reads(self, project: str) -> dict[tuple[str, int, str], int]:
        """(view, version, feature) -> reads by every client; the last known counts if PostgreSQL fails."""
        now = time.monotonic()
        with self._lock:
            if now - self._usage_read_at >= self.usage_ttl_s:
                try:
                    with self.registry.connection() as conn:
                        self._usage = feature_usage(conn, project)
                except Exception as exc:
                    log.warning("cannot read feature usage (showing the last counts): %s", exc)
                self._usage_read_at = now
            usage = self._usage
        out: dict[tuple[str, int, str], int] = {}
        for (view, feature), rows in usage.items():
            for row in rows:
                key = (view, row.version, feature)
                out[key] = out.get(key, 0) + row.reads
        return out

    def invalidate(self, _snapshot: object = None) -> None:
        """Re-read the usage counts at the next call (e.g. after a reload)."""
        with self._lock:
            self._usage_read_at = float("-inf")
