"""What an apply would change: field-level diffs of registry objects and the breaking-change rules.

Everything here is pure (no database): ``compute_plan`` takes the registry's current objects and a
desired ``ProjectDefinition`` and returns a ``Plan``. The store applies a plan inside one transaction.

Breaking changes (they need a new feature view version, because stored tiles and online values
computed under the old definition would be wrong under the new one):

* feature view: ``source``, ``entity``, ``filter``; a feature removed; a feature's ``aggregation``,
  ``field``, ``window`` or ``dtype``; and upstream changes the view depends on: its entity's join
  keys, its source's event time field or format, the type of a source field it reads.
* removing any object but a consumer (what reads it breaks); the removed object is kept in history.
* entity: ``join_keys``; source: event time field or format, a field's type, a field removed;
  feature service: a feature reference removed. These objects keep one version (they are updated
  in place); the flag tells people the change can break what reads them.

Everything else (descriptions, owners, tags, examples, pii, max_age, online_ttl, a feature added)
is non-breaking and updates the current version in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from featurestream.definitions.models import FeatureView, ProjectDefinition

Kind = Literal["project", "entity", "source", "feature_view", "feature_service", "consumer"]
KINDS: tuple[Kind, ...] = ("project", "entity", "source", "feature_view", "feature_service", "consumer")
Action = Literal["add", "change", "remove"]
Status = Literal["live", "retired", "removed"]

_NAMED_LISTS = frozenset({"features", "fields", "join_keys"})
"""Lists of objects with a ``name``: diffed item by item, keyed by name."""
_ATOMIC = frozenset({"window", "filter", "avro_schema", "allowed", "example", "tags", "upstream_join_keys"})
"""Values compared as a whole (a window is one thing, not three fields)."""
_FEATURE_BREAKING = frozenset({"aggregation", "field", "window", "dtype"})


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class FieldChange:
    """One changed value; ``old`` is None for an addition and ``new`` is None for a removal."""

    path: str
    old: Any
    new: Any
    breaking: bool

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "old": self.old, "new": self.new, "breaking": self.breaking}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FieldChange:
        return cls(path=data["path"], old=data.get("old"), new=data.get("new"), breaking=data["breaking"])


@dataclass(frozen=True)
class CurrentObject:
    """The latest stored version of one object (any status)."""

    kind: Kind
    name: str
    version: int
    status: Status
    spec: dict[str, Any]
    upstream: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectChange:
    """What an apply does to one object."""

    kind: Kind
    name: str
    action: Action
    breaking: bool
    fields: tuple[FieldChange, ...]
    old_version: int | None
    new_version: int | None
    """The version the object has after the apply (for a removal: the version removed)."""
    spec: dict[str, Any] | None = None
    upstream: dict[str, Any] = field(default_factory=dict)
    readded: bool = False

    @property
    def creates_version(self) -> bool:
        """True when the apply stores a new version beside the old one (a feature view's breaking change)."""
        return self.action != "remove" and self.new_version != self.old_version

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "action": self.action,
            "breaking": self.breaking,
            "readded": self.readded,
            "old_version": self.old_version,
            "new_version": self.new_version,
            "new_view_version": self.kind == "feature_view" and self.creates_version,
            "changes": [change.to_json() for change in self.fields],
        }


@dataclass(frozen=True)
class Plan:
    project: str
    changes: tuple[ObjectChange, ...]

    @property
    def is_empty(self) -> bool:
        return not self.changes

    @property
    def breaking(self) -> tuple[ObjectChange, ...]:
        return tuple(change for change in self.changes if change.breaking)

    def summary(self) -> dict[str, int]:
        counts = {"add": 0, "change": 0, "remove": 0, "breaking": 0, "new_view_versions": 0}
        for change in self.changes:
            counts[change.action] += 1
            counts["breaking"] += change.breaking
            counts["new_view_versions"] += change.kind == "feature_view" and change.creates_version
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "summary": self.summary(),
            "changes": [change.to_json() for change in self.changes],
        }


# ---------------------------------------------------------------- desired state


def view_upstream(view: FeatureView, definition: ProjectDefinition) -> dict[str, Any]:
    """What a view's values depend on outside its own spec: join keys, event time, input field types."""
    entity = definition.entity(view.entity)
    source = definition.source(view.source)
    used = sorted({f.field for f in view.features if f.field} | {c.field for c in view.filter})
    input_types: dict[str, Any] = {}
    for name in used:
        source_field = source.field(name) if source else None
        input_types[name] = source_field.type if source_field else None
    return {
        "upstream_join_keys": (
            [key.model_dump(mode="json") for key in entity.join_keys] if entity else None
        ),
        "event_time_field": source.event_time_field if source else None,
        "event_time_format": source.event_time_format if source else None,
        "input_types": input_types,
    }


def desired_objects(
    definition: ProjectDefinition,
) -> dict[tuple[Kind, str], tuple[dict[str, Any], dict[str, Any]]]:
    """Every object a definition declares: (kind, name) -> (spec, upstream)."""
    out: dict[tuple[Kind, str], tuple[dict[str, Any], dict[str, Any]]] = {
        ("project", definition.project.name): (definition.project.model_dump(mode="json"), {})
    }
    for entity in definition.entities:
        out["entity", entity.name] = (entity.model_dump(mode="json"), {})
    for source in definition.sources:
        out["source", source.name] = (source.model_dump(mode="json"), {})
    for view in definition.feature_views:
        out["feature_view", view.name] = (view.model_dump(mode="json"), view_upstream(view, definition))
    for service in definition.feature_services:
        out["feature_service", service.name] = (service.model_dump(mode="json"), {})
    for consumer in definition.consumers:
        out["consumer", consumer.name] = (consumer.model_dump(mode="json"), {})
    return out


# ---------------------------------------------------------------- diffs


def _render(path: Sequence[str]) -> str:
    text = ""
    for segment in path:
        if segment.startswith("["):
            text += segment
        else:
            text += f".{segment}" if text else segment
    return text


def _is_named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) and "name" in item for item in value)


def _walk(path: tuple[str, ...], old: Any, new: Any, out: list[tuple[tuple[str, ...], Any, Any]]) -> None:
    if old == new:
        return
    last = path[-1] if path else ""
    if isinstance(old, dict) and isinstance(new, dict) and last not in _ATOMIC:
        for key in [*old, *(k for k in new if k not in old)]:
            _walk((*path, key), old.get(key, MISSING), new.get(key, MISSING), out)
    elif last in _NAMED_LISTS and _is_named_list(old) and _is_named_list(new):
        old_by = {item["name"]: item for item in old}
        new_by = {item["name"]: item for item in new}
        for name in [*old_by, *(n for n in new_by if n not in old_by)]:
            _walk((*path, f"[{name}]"), old_by.get(name, MISSING), new_by.get(name, MISSING), out)
        old_order = [n for n in old_by if n in new_by]
        new_order = [n for n in new_by if n in old_by]
        if old_order != new_order:
            out.append((path, old_order, new_order))
    else:
        out.append((path, old, new))


def _breaking(kind: Kind, path: tuple[str, ...], old: Any, new: Any) -> bool:
    top = path[0]
    if kind == "feature_view":
        if top in ("source", "entity", "filter", "upstream_join_keys", "event_time_field",
                   "event_time_format", "input_types"):
            return True
        if top == "features" and len(path) == 2:
            return new is MISSING and path[1].startswith("[")  # a feature removed
        return top == "features" and len(path) >= 3 and path[2] in _FEATURE_BREAKING
    if kind == "entity":
        return top == "join_keys"
    if kind == "source":
        if top in ("event_time_field", "event_time_format"):
            return True
        if top == "fields" and len(path) == 2:
            return new is MISSING and path[1].startswith("[")
        return top == "fields" and len(path) >= 3 and path[2] == "type"
    if kind == "feature_service" and top == "features":
        return bool(set(old or ()) - set(new or ()))
    return False


def diff_specs(
    kind: Kind,
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    old_upstream: Mapping[str, Any] | None = None,
    new_upstream: Mapping[str, Any] | None = None,
) -> tuple[FieldChange, ...]:
    """Field-level changes from ``old`` to ``new`` (JSON specs), each marked breaking or not."""
    raw: list[tuple[tuple[str, ...], Any, Any]] = []
    _walk((), dict(old), dict(new), raw)
    up_old, up_new = dict(old_upstream or {}), dict(new_upstream or {})
    if up_old and up_new:
        # Only a changed type of an input both versions read matters; a field newly read or no
        # longer read comes with a feature added or removed, which is reported on its own.
        shared = set(up_old.get("input_types", {})) & set(up_new.get("input_types", {}))
        up_old["input_types"] = {k: v for k, v in up_old.get("input_types", {}).items() if k in shared}
        up_new["input_types"] = {k: v for k, v in up_new.get("input_types", {}).items() if k in shared}
        # A new entity or source changes what it implies (join keys, event time, input types) anyway.
        if old.get("entity") != new.get("entity"):
            up_old.pop("upstream_join_keys", None)
            up_new.pop("upstream_join_keys", None)
        if old.get("source") != new.get("source"):
            for key in ("event_time_field", "event_time_format", "input_types"):
                up_old.pop(key, None)
                up_new.pop(key, None)
        _walk((), up_old, up_new, raw)
    changes = []
    for path, before, after in raw:
        shown = _render(path)
        if path[0] in ("upstream_join_keys", "event_time_field", "event_time_format", "input_types") and (
            kind == "feature_view"
        ):
            shown = "upstream." + shown.replace("upstream_join_keys", "join_keys")
        changes.append(
            FieldChange(
                path=shown,
                old=None if before is MISSING else before,
                new=None if after is MISSING else after,
                breaking=_breaking(kind, path, before, after),
            )
        )
    return tuple(changes)


# ---------------------------------------------------------------- plans


def _sort_key(change: ObjectChange) -> tuple[int, str]:
    return KINDS.index(change.kind), change.name


def compute_plan(
    project: str,
    current: Mapping[tuple[Kind, str], CurrentObject],
    desired: ProjectDefinition,
) -> Plan:
    """The changes that turn ``current`` (latest stored version of each object) into ``desired``."""
    wanted = desired_objects(desired)
    changes: list[ObjectChange] = []
    for key, (spec, upstream) in wanted.items():
        kind, name = key
        stored = current.get(key)
        if stored is None:
            changes.append(ObjectChange(kind, name, "add", False, (), None, 1, spec, upstream))
            continue
        fields = diff_specs(kind, stored.spec, spec, stored.upstream, upstream)
        if stored.status != "live":
            # Re-added after removal: a view gets a fresh version (its old data may be gone).
            version = stored.version + 1 if kind == "feature_view" else stored.version
            changes.append(
                ObjectChange(
                    kind, name, "add", False, fields, stored.version, version, spec, upstream, readded=True
                )
            )
            continue
        if not fields:
            continue
        breaking = any(change.breaking for change in fields)
        version = stored.version + 1 if breaking and kind == "feature_view" else stored.version
        changes.append(
            ObjectChange(kind, name, "change", breaking, fields, stored.version, version, spec, upstream)
        )
    for key, stored in current.items():
        if key not in wanted and stored.status == "live":
            breaking = stored.kind != "consumer"  # whatever reads a removed object breaks
            changes.append(
                ObjectChange(stored.kind, stored.name, "remove", breaking, (), stored.version, stored.version)
            )
    return Plan(project=project, changes=tuple(sorted(changes, key=_sort_key)))
