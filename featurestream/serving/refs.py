"""Resolving what a request asks for: feature references and entity keys.

Every problem is a ``ServingError`` with a gRPC-style code and a message naming the offending
item, so both the gRPC and the REST front ends report it the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from featurestream.aggregation.view import ViewAggregator
from featurestream.definitions.models import Entity, Feature, FeatureView, ProjectDefinition, ValueCheck
from featurestream.generations import Generations
from featurestream.registry.records import ProjectSnapshot

_REF = re.compile(r"^(?P<view>[a-z][a-z0-9_]*)(@(?P<version>[0-9]+))?(:(?P<feature>[a-z][a-z0-9_]*))?$")


class ServingError(Exception):
    """A request that cannot be answered; ``code`` is a gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ServedView:
    """A live view version with what serving needs of it, built once per registry version."""

    view: FeatureView
    version: int
    entity: Entity
    agg: ViewAggregator
    feature_index: dict[str, int]

    @property
    def key_fields(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.entity.join_keys)


@dataclass(frozen=True)
class FeatureRef:
    served: ServedView
    feature: Feature
    name: str
    """As the response names it: ``view:feature``, or ``view@N:feature`` when a version was asked for."""
    view_key: tuple[str, int] = field(init=False)
    check: ValueCheck | None = field(init=False)
    max_age_ms: float | None = field(init=False)

    def __post_init__(self) -> None:
        # looked up for every value served: computed once
        object.__setattr__(self, "view_key", (self.served.view.name, self.served.version))
        object.__setattr__(self, "check", self.feature.validation)
        max_age = self.feature.max_age
        object.__setattr__(self, "max_age_ms", max_age.total_seconds() * 1000 if max_age is not None else None)


class Catalog:
    """The live views of one registry snapshot, indexed for request resolution."""

    def __init__(self, snapshot: ProjectSnapshot) -> None:
        self.snapshot = snapshot
        definition: ProjectDefinition = snapshot.definition
        self.views: dict[tuple[str, int], ServedView] = {}
        self.latest: dict[str, int] = {}
        for live in snapshot.views:
            spec = live.spec
            entity = definition.entity(spec.entity)
            source = definition.source(spec.source)
            if entity is None or source is None:
                continue
            served = ServedView(
                spec, live.version, entity, ViewAggregator.from_source(spec, source),
                {f.name: i for i, f in enumerate(spec.features)},
            )
            self.views[(live.name, live.version)] = served
            self.latest[live.name] = max(self.latest.get(live.name, 0), live.version)
        # Clients repeat the same feature lists: resolve each list once per snapshot.
        self._resolved: Generations[tuple[tuple[str, ...], str], tuple[FeatureRef, ...]] = Generations(2048)

    def resolve(self, features: list[str], feature_service: str = "") -> tuple[FeatureRef, ...]:
        """The refs a request names, in order, each once; a ``ServingError`` names a bad one.
        Equal requests get the same tuple (results derived from it can be reused)."""
        memo_key = (tuple(features), feature_service)
        refs = self._resolved.get(memo_key)
        if refs is None:
            refs = tuple(self._resolve(features, feature_service))
            self._resolved.put(memo_key, refs)
        return refs

    def _resolve(self, features: list[str], feature_service: str) -> list[FeatureRef]:
        refs: list[str] = list(features)
        if feature_service:
            service = self.snapshot.definition.feature_service(feature_service)
            if service is None:
                raise ServingError("NOT_FOUND", f"no feature service '{feature_service}'")
            refs += list(service.features)
        if not refs:
            raise ServingError("INVALID_ARGUMENT", "name at least one feature (view:feature or view) or a feature service")
        out: list[FeatureRef] = []
        seen: set[str] = set()
        for ref in refs:
            for resolved in self._resolve_one(ref):
                if resolved.name not in seen:
                    seen.add(resolved.name)
                    out.append(resolved)
        return out

    def _resolve_one(self, ref: str) -> list[FeatureRef]:
        match = _REF.match(ref.strip())
        if match is None:
            raise ServingError("INVALID_ARGUMENT", f"feature reference '{ref}' is not 'view', 'view:feature' or 'view@N:feature'")
        name, version_text, feature_name = match.group("view"), match.group("version"), match.group("feature")
        if name not in self.latest:
            raise ServingError("INVALID_ARGUMENT", f"unknown or retired feature view '{name}' (in '{ref}')")
        version = int(version_text) if version_text else self.latest[name]
        served = self.views.get((name, version))
        if served is None:
            raise ServingError("INVALID_ARGUMENT", f"feature view '{name}' has no live version {version} (in '{ref}')")
        prefix = f"{name}@{version}" if version_text else name
        if feature_name is None:
            return [FeatureRef(served, f, f"{prefix}:{f.name}") for f in served.view.features]
        feature = served.view.feature(feature_name)
        if feature is None:
            raise ServingError("INVALID_ARGUMENT", f"unknown feature '{feature_name}' of view '{name}' (in '{ref}')")
        return [FeatureRef(served, feature, f"{prefix}:{feature_name}")]


_CATALOGS: dict[int, Catalog] = {}
_CATALOGS_KEPT = 8


def catalog_for(snapshot: ProjectSnapshot) -> Catalog:
    """The catalog of a snapshot, built once and shared by every service of the process (online,
    as-of, updates), so a registry reload compiles the views once."""
    catalog = _CATALOGS.get(id(snapshot))
    if catalog is None or catalog.snapshot is not snapshot:
        catalog = Catalog(snapshot)
        if len(_CATALOGS) >= _CATALOGS_KEPT:
            _CATALOGS.pop(next(iter(_CATALOGS)))
        _CATALOGS[id(snapshot)] = catalog
    return catalog


def parse_entity(row: int, keys: dict[str, str], entity: Entity) -> tuple[Any, ...]:
    """The typed key of ``entity`` from a request row's text join keys."""
    out: list[Any] = []
    for key in entity.join_keys:
        text = keys.get(key.name)
        if text is None or text == "":
            raise ServingError("INVALID_ARGUMENT", f"entity row {row}: missing join key '{key.name}' of entity '{entity.name}'")
        if len(text) > 256:
            raise ServingError("INVALID_ARGUMENT", f"entity row {row}: join key '{key.name}' is longer than 256 characters")
        if key.type == "int64":
            try:
                out.append(int(text))
            except ValueError:
                raise ServingError(
                    "INVALID_ARGUMENT", f"entity row {row}: join key '{key.name}' must be an integer, got '{text[:40]}'"
                ) from None
        else:
            out.append(text)
    return tuple(out)
