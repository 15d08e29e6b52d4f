"""The catalog: list, search, describe and documentation coverage over a project's definitions.

Pure functions over ``CatalogData`` (definitions, plus view versions and read counts when they come
from the registry); the CLI renders the JSON-able results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from featurestream.definitions.models import (
    Feature,
    FeatureView,
    HoppingWindow,
    ProjectDefinition,
    SlidingWindow,
    TumblingWindow,
    natural_output_type,
)
from featurestream.definitions.types import format_duration
from featurestream.registry.lineage import NODE_KINDS, LineageGraph, Node, build_graph
from featurestream.registry.records import ObjectNotFoundError, VersionInfo, parse_view_ref
from featurestream.registry.usage import UsageRow


@dataclass(frozen=True)
class CatalogData:
    definition: ProjectDefinition
    versions: dict[str, list[VersionInfo]] = field(default_factory=dict)
    """View name -> every stored version (empty when read from a directory)."""
    usage: dict[tuple[str, str], list[UsageRow]] = field(default_factory=dict)
    registry_version: int | None = None


@dataclass(frozen=True)
class CatalogEntry:
    kind: str
    name: str
    description: str
    owner: str
    tags: tuple[str, ...]
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "description": self.description, "owner": self.owner,
                "tags": list(self.tags), "detail": self.detail}


# ---------------------------------------------------------------- small helpers


def window_text(feature: Feature) -> str:
    window = feature.window
    if isinstance(window, SlidingWindow):
        return f"sliding {format_duration(window.duration)}"
    if isinstance(window, TumblingWindow):
        return f"tumbling {format_duration(window.size)}"
    if isinstance(window, HoppingWindow):
        return f"hopping {format_duration(window.size)} every {format_duration(window.hop)}"
    return "lifetime"


def output_type(definition: ProjectDefinition, view: FeatureView, feature: Feature) -> str | None:
    if feature.dtype:
        return feature.dtype
    source = definition.source(view.source)
    source_field = source.field(feature.field) if source and feature.field else None
    try:
        return natural_output_type(feature.aggregation, source_field.type if source_field else None)
    except ValueError:
        return None


def feature_owner(view: FeatureView, feature: Feature) -> str:
    """A feature's owner, else its view's."""
    return feature.owner or view.owner


def _feature_detail(definition: ProjectDefinition, view: FeatureView, feature: Feature) -> str:
    target = f"({feature.field})" if feature.field else "(*)"
    return f"{feature.aggregation}{target} {window_text(feature)} -> {output_type(definition, view, feature)}"


def entries(data: CatalogData) -> list[CatalogEntry]:
    """Every object of the project, fields and features included, in catalog order."""
    d = data.definition
    out = [CatalogEntry("entity", e.name, e.description, e.owner, e.tags,
                        "join keys: " + ", ".join(f"{k.name} ({k.type})" for k in e.join_keys))
           for e in d.entities]
    for s in d.sources:
        out.append(CatalogEntry("source", s.name, s.description, s.owner, s.tags,
                                f"topic {s.topic}, {s.format}, {len(s.fields)} fields"))
        out += [CatalogEntry("field", f"{s.name}.{f.name}", f.description, s.owner, (),
                             f"{f.type}{'' if f.required else ', optional'}"
                             + (f", pii {f.pii}" if f.pii != "none" else ""))
                for f in s.fields]
    for v in d.feature_views:
        live = [str(x.version) for x in data.versions.get(v.name, []) if x.status == "live"]
        versions = f", live versions {', '.join(live)}" if live else ""
        out.append(CatalogEntry("view", v.name, v.description, v.owner, v.tags,
                                f"entity {v.entity}, source {v.source}, {len(v.features)} features{versions}"))
        out += [CatalogEntry("feature", f"{v.name}:{f.name}", f.description, feature_owner(v, f), f.tags,
                             _feature_detail(d, v, f)) for f in v.features]
    out += [CatalogEntry("service", s.name, s.description, s.owner, s.tags, f"{len(s.features)} feature refs")
            for s in d.feature_services]
    out += [CatalogEntry("consumer", c.name, c.description, c.owner, c.tags,
                         f"{c.kind}; services: {', '.join(c.feature_services) or '-'}")
            for c in d.consumers]
    return out


def list_entries(data: CatalogData, kinds: set[str] | None = None, owner: str | None = None,
                 tag: str | None = None) -> list[CatalogEntry]:
    """Entries of the given kinds (default: all but source fields), filtered by owner and tag."""
    wanted = kinds or {k for k in NODE_KINDS if k != "field"}
    return [e for e in entries(data) if e.kind in wanted and (owner is None or e.owner == owner)
            and (tag is None or tag in e.tags)]


# ---------------------------------------------------------------- search


def _name_score(entry: CatalogEntry, token: str) -> int:
    """A feature's or field's own name counts more than its view's or source's."""
    context, _, own = entry.name.rpartition(":" if entry.kind == "feature" else ".")
    if entry.kind not in ("feature", "field"):
        context, own = "", entry.name
    own = own.lower()
    parts = own.split("_")
    if own == token or entry.name.lower() == token:
        return 100
    if token in parts:
        return 60
    if any(part.startswith(token) for part in parts):
        return 45
    if token in own:
        return 25
    if any(part.startswith(token) for part in context.lower().split("_")):
        return 20
    return 0


def _token_score(entry: CatalogEntry, token: str) -> int:
    score = _name_score(entry, token)
    tags = [t.lower() for t in entry.tags]
    if token in tags:
        score += 30
    elif any(token in t for t in tags):
        score += 15
    owner = entry.owner.lower()
    if owner == token or token in re.split(r"[@._\s-]", owner):
        score += 25
    elif token in owner:
        score += 12
    description = entry.description.lower()
    if re.search(rf"\b{re.escape(token)}\b", description):
        score += 10
    elif re.search(rf"\b{re.escape(token)}", description):
        score += 8
    elif token in description:
        score += 4
    return score


def search(data: CatalogData, text: str, limit: int = 50) -> list[tuple[CatalogEntry, int]]:
    """Entries matching every word of ``text`` (names, tags, owners, descriptions), best first."""
    tokens = [t for t in re.split(r"\s+", text.lower().strip()) if t]
    if not tokens:
        return []
    hits = []
    for entry in entries(data):
        scores = [_token_score(entry, token) for token in tokens]
        if all(scores):
            phrase = 10 if len(tokens) > 1 and text.lower().strip() in entry.description.lower() else 0
            hits.append((entry, sum(scores) + phrase))
    hits.sort(key=lambda hit: (-hit[1], NODE_KINDS.index(hit[0].kind), hit[0].name))
    return hits[:limit]


# ---------------------------------------------------------------- documentation coverage


@dataclass(frozen=True)
class ViewCoverage:
    view: str
    features: int
    described: int
    owned: int
    exampled: int
    documented: int
    missing: dict[str, list[str]]
    """feature -> what it lacks (description, owner, example)."""

    @property
    def percent(self) -> float:
        return 100.0 * self.documented / self.features if self.features else 100.0

    def to_json(self) -> dict[str, Any]:
        return {"view": self.view, "features": self.features, "described": self.described,
                "owned": self.owned, "exampled": self.exampled, "documented": self.documented,
                "percent": round(self.percent, 2), "missing": self.missing}


def coverage(definition: ProjectDefinition) -> list[ViewCoverage]:
    """Per view: features with a description, an owner (the view's counts) and an example."""
    out = []
    for view in definition.feature_views:
        missing: dict[str, list[str]] = {}
        for feature in view.features:
            lacks = [what for what, ok in (("description", bool(feature.description)),
                                           ("owner", bool(feature_owner(view, feature))),
                                           ("example", feature.example is not None)) if not ok]
            if lacks:
                missing[feature.name] = lacks
        count = len(view.features)
        out.append(ViewCoverage(
            view=view.name, features=count,
            described=sum(1 for f in view.features if f.description),
            owned=sum(1 for f in view.features if feature_owner(view, f)),
            exampled=sum(1 for f in view.features if f.example is not None),
            documented=count - len(missing), missing=missing,
        ))
    return out


def total_percent(report: list[ViewCoverage]) -> float:
    features = sum(v.features for v in report)
    return 100.0 * sum(v.documented for v in report) / features if features else 100.0


# ---------------------------------------------------------------- describe

def _usage(rows: list[UsageRow]) -> dict[str, Any]:
    last = max((r.last_read_at for r in rows if r.last_read_at), default=None)
    return {"total_reads": sum(r.reads for r in rows), "last_read_at": last.isoformat() if last else None,
            "by_client": [r.to_json() for r in rows]}


def _lineage_summary(graph: LineageGraph, node: Node) -> dict[str, list[str]]:
    return {"upstream": [n.id for n in graph.upstream(node.id)],
            "downstream": [n.id for n in graph.downstream(node.id) if n.kind != "field"]}


def _docs(obj: Any) -> dict[str, Any]:
    return {"description": obj.description, "owner": obj.owner, "tags": list(obj.tags)}


def _feature_def(definition: ProjectDefinition, view: FeatureView, feature: Feature) -> dict[str, Any]:
    return {"aggregation": feature.aggregation, "field": feature.field, "window": window_text(feature),
            "tile": format_duration(feature.window.tile) if feature.window else None,
            "dtype": output_type(definition, view, feature)}


def _describe_feature(data: CatalogData, graph: LineageGraph, node: Node) -> dict[str, Any]:
    view_name, feature_name = node.name.split(":", 1)
    view = data.definition.feature_view(view_name)
    assert view is not None  # the graph was built from this definition
    feature = view.feature(feature_name)
    assert feature is not None
    versions = []
    for info in data.versions.get(view_name, []):
        spec = FeatureView.model_validate(info.spec)
        old = spec.feature(feature_name)
        versions.append({**info.to_json(), "has_feature": old is not None,
                         "definition": _feature_def(data.definition, spec, old) if old else None})
    return {
        "kind": "feature", "name": node.name, "view": view_name, "feature": feature_name,
        **_docs(feature), "owner": feature_owner(view, feature), "owner_inherited": not feature.owner,
        "pii": feature.pii, "example": feature.example,
        "max_age": format_duration(feature.max_age) if feature.max_age else None,
        "definition": _feature_def(data.definition, view, feature),
        "versions": versions,
        "lineage": _lineage_summary(graph, node),
        "usage": _usage(data.usage.get((view_name, feature_name), [])),
    }


def _describe_view(data: CatalogData, graph: LineageGraph, node: Node, version: int | None) -> dict[str, Any]:
    view = data.definition.feature_view(node.name)
    assert view is not None
    infos = data.versions.get(view.name, [])
    if version is not None:
        chosen = next((i for i in infos if i.version == version), None)
        if chosen is None:
            raise ObjectNotFoundError(f"feature view '{view.name}' has no version {version}")
        view = FeatureView.model_validate(chosen.spec)
    rows = [r for (v, _), rs in data.usage.items() if v == view.name for r in rs
            if version is None or r.version == version]
    return {
        "kind": "view", "name": view.name, "version": version, **_docs(view),
        "entity": view.entity, "source": view.source,
        "filter": [c.model_dump(mode="json") for c in view.filter],
        "online_ttl": format_duration(view.online_ttl) if view.online_ttl else None,
        "features": [{"name": f.name, **_feature_def(data.definition, view, f), "owner": feature_owner(view, f),
                      "description": f.description} for f in view.features],
        "versions": [i.to_json() for i in infos],
        "lineage": _lineage_summary(graph, node),
        "usage": _usage(rows),
    }


def describe(data: CatalogData, name: str, kind: str | None = None) -> dict[str, Any]:
    """Everything the catalog knows about one object, as JSON-able data."""
    d = data.definition
    if kind == "project" or (kind is None and name == d.project.name and not _named(d, name)):
        return {"kind": "project", "name": d.project.name, **_docs(d.project),
                "registry_version": data.registry_version,
                "counts": {s: len(getattr(d, s)) for s in
                           ("entities", "sources", "feature_views", "feature_services", "consumers")}}
    graph = build_graph(d)
    version = None
    if "@" in name and ":" not in name:
        name, version = parse_view_ref(name)
        kind = kind or "view"
    node = graph.resolve(name, kind)
    if node.kind == "feature":
        return _describe_feature(data, graph, node)
    if node.kind == "view":
        return _describe_view(data, graph, node, version)
    base = {"kind": node.kind, "name": node.name, "lineage": _lineage_summary(graph, node)}
    if node.kind == "field":
        source_name, field_name = node.name.split(".", 1)
        source = d.source(source_name)
        assert source is not None
        source_field = source.field(field_name)
        assert source_field is not None
        return {**base, "source": source_name, **source_field.model_dump(mode="json", exclude={"name"}),
                "event_time": field_name == source.event_time_field}
    section = {"entity": "entities", "source": "sources", "service": "feature_services",
               "consumer": "consumers"}[node.kind]
    obj: Any = next(o for o in getattr(d, section) if o.name == node.name)
    spec = obj.model_dump(mode="json", exclude={"name", "description", "owner", "tags"})
    if node.kind == "source":
        spec["dead_letter_topic"] = obj.dlq_topic
    if node.kind == "consumer":
        spec["consumer_kind"] = spec.pop("kind")
    return {**base, **_docs(obj), **spec}


def _named(definition: ProjectDefinition, name: str) -> bool:
    return any(obj.name == name for section in ("entities", "sources", "feature_views", "feature_services",
                                                "consumers") for obj in getattr(definition, section))
