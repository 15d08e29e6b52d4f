"""What a training set asks for: feature references resolved against the registry, column names,
and the groups of views that read the same archive rows (same source, same entity keys).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from featurestream.aggregation.layout import FeatureAggregator
from featurestream.aggregation.view import ViewAggregator
from featurestream.definitions.models import Entity, Feature, FeatureView, Source
from featurestream.registry.records import ProjectSnapshot

STATUS_SUFFIX = "__status"
_REF = re.compile(r"^(?P<view>[a-z][a-z0-9_]*)(@(?P<version>[1-9][0-9]*))?(:(?P<feature>[a-z][a-z0-9_]*))?$")


class TrainingSetError(ValueError):
    """A training-set request that cannot be answered as given (a user error)."""


@dataclass(frozen=True)
class ViewPlan:
    """One live view version to evaluate: its aggregator and the requested features of it."""

    name: str
    version: int
    spec: FeatureView
    agg: ViewAggregator
    features: tuple[RequestedFeature, ...]

    @property
    def ttl_ms(self) -> int | None:
        """How long the online store keeps an entity after its last write (``None``: forever)."""
        ttl = self.spec.effective_online_ttl
        return None if ttl is None else _ms(ttl)

    @property
    def has_lifetime(self) -> bool:
        return any(f.window is None for f in self.spec.features)

    @property
    def reach_ms(self) -> int:
        """How far back of a read time the view's windows can reach (span + one tile)."""
        return max(
            (_ms(f.window.span) + _ms(f.window.tile) for f in self.spec.features if f.window), default=0
        )


@dataclass(frozen=True)
class RequestedFeature:
    view: str
    version: int
    feature: Feature
    aggregator: FeatureAggregator
    column: str
    position: int
    """Where the column goes among the feature columns: the order the features were asked for."""

    @property
    def status_column(self) -> str:
        return self.column + STATUS_SUFFIX

    @property
    def output_type(self) -> str:
        return self.aggregator.output_type

    @property
    def max_age_ms(self) -> float | None:
        age = self.feature.max_age
        return None if age is None else age.total_seconds() * 1000


@dataclass(frozen=True)
class ViewGroup:
    """Views that read the same archive rows: one source, one entity (same join keys)."""

    source: Source
    entity: Entity
    views: tuple[ViewPlan, ...]

    @property
    def key_columns(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.entity.join_keys)

    @property
    def key_types(self) -> tuple[str, ...]:
        return tuple(k.type for k in self.entity.join_keys)

    @property
    def fields(self) -> tuple[str, ...]:
        """Source fields the views read (inputs and filters), in a stable order."""
        names: dict[str, None] = {}
        for plan in self.views:
            names.update(dict.fromkeys(plan.agg.layout.fields))
            names.update(dict.fromkeys(c.field for c in plan.spec.filter))
        return tuple(names)

    def lookback_ms(self) -> int | None:
        """Events older than (earliest read of an entity - this) cannot change any value or status
        in event-time mode; ``None`` when a lifetime feature needs the whole history."""
        if any(p.has_lifetime or p.ttl_ms is None for p in self.views):
            return None
        return max(max(p.reach_ms, p.ttl_ms or 0) for p in self.views)


def _ms(value: timedelta) -> int:
    return int(value.total_seconds() * 1000)


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    match = _REF.match(ref.strip())
    if match is None:
        raise TrainingSetError(
            f"'{ref}' is not a feature reference ('view', 'view:feature', 'view@N:feature')"
        )
    version = match.group("version")
    return match.group("view"), int(version) if version else None, match.group("feature")


def resolve(
    snapshot: ProjectSnapshot,
    features: Sequence[str],
    services: Iterable[str] = (),
    taken: Iterable[str] = (),
) -> list[ViewGroup]:
    """Resolve references to groups of view plans; names every column (see docs/training_sets.md).

    ``taken``: the labels' own columns, which a feature column may not overwrite.
    """
    definition = snapshot.definition
    refs = list(features)
    for name in services:
        service = definition.feature_service(name)
        if service is None:
            raise TrainingSetError(f"no feature service '{name}' in project '{snapshot.project}'")
        refs += service.features
    if not refs:
        raise TrainingSetError("name at least one feature (--feature VIEW[:FEATURE]) or a feature service")
    latest: dict[str, int] = {}
    for live in snapshot.views:
        latest[live.name] = max(latest.get(live.name, 0), live.version)
    chosen: dict[tuple[str, int], list[Feature]] = {}
    order: dict[tuple[str, int, str], int] = {}
    for ref in refs:
        view_name, version, feature_name = parse_ref(ref)
        if view_name not in latest:
            raise TrainingSetError(f"unknown or retired feature view '{view_name}' (in '{ref}')")
        version = version or latest[view_name]
        found = next((v for v in snapshot.views if v.name == view_name and v.version == version), None)
        if found is None:
            raise TrainingSetError(f"feature view '{view_name}' has no live version {version} (in '{ref}')")
        wanted = chosen.setdefault((view_name, version), [])
        picked = found.spec.features if feature_name is None else [found.spec.feature(feature_name)]
        for feature in picked:
            if feature is None:
                raise TrainingSetError(f"unknown feature '{feature_name}' of view '{view_name}' (in '{ref}')")
            if feature not in wanted:
                wanted.append(feature)
                order[(view_name, version, feature.name)] = len(order)
    columns = _column_names(chosen, set(taken))

    groups: dict[tuple[str, tuple[str, ...]], list[ViewPlan]] = {}
    entities: dict[tuple[str, tuple[str, ...]], tuple[Source, Entity]] = {}
    for (view_name, version), wanted in chosen.items():
        spec = next(v.spec for v in snapshot.views if v.name == view_name and v.version == version)
        source, entity = definition.source(spec.source), definition.entity(spec.entity)
        if source is None or entity is None:
            raise TrainingSetError(f"view '{view_name}': its source or entity is not in the project")
        agg = ViewAggregator.from_source(spec, source)
        by_name = {fa.name: fa for fa in agg.features}
        requested = tuple(
            RequestedFeature(
                view_name,
                version,
                f,
                by_name[f.name],
                columns[(view_name, version, f.name)],
                order[(view_name, version, f.name)],
            )
            for f in wanted
        )
        key = (source.name, tuple(k.name for k in entity.join_keys))
        groups.setdefault(key, []).append(ViewPlan(view_name, version, spec, agg, requested))
        entities[key] = (source, entity)
    return [ViewGroup(*entities[key], tuple(plans)) for key, plans in groups.items()]


def _column_names(
    chosen: dict[tuple[str, int], list[Feature]], taken: set[str]
) -> dict[tuple[str, int, str], str]:
    """``feature``; ``view__feature`` when two views share the name; ``view_vN__feature`` when
    two versions of one view do."""
    owners: dict[str, set[str]] = {}
    versions: dict[tuple[str, str], int] = {}
    for (view, _), wanted in chosen.items():
        for f in wanted:
            owners.setdefault(f.name, set()).add(view)
            versions[(view, f.name)] = versions.get((view, f.name), 0) + 1
    out: dict[tuple[str, int, str], str] = {}
    for (view, version), wanted in chosen.items():
        for f in wanted:
            if versions[(view, f.name)] > 1:
                name = f"{view}_v{version}__{f.name}"
            elif len(owners[f.name]) > 1:
                name = f"{view}__{f.name}"
            else:
                name = f.name
            out[(view, version, f.name)] = name
    clash = sorted({n for n in out.values() for c in (n, n + STATUS_SUFFIX) if c in taken})
    if clash:
        raise TrainingSetError(
            f"the labels already have column(s) named like requested features: {', '.join(clash)} "
            "(rename them, or drop those features)"
        )
    return out
