"""The lineage graph of a project: what feeds what, from source fields to consumers.

Nodes are named the way the CLI accepts them: ``transactions`` (source), ``transactions.amount``
(source field), ``user`` (entity), ``user_txn`` (feature view), ``user_txn:amount_sum_1h``
(feature), services and consumers by name. Edges point downstream:

    source -> field          field -> feature (input)      field -> view (filter, event time)
    source -> view           entity -> view                view -> feature
    feature -> service       service -> consumer           feature -> consumer (direct reference)
"""

from __future__ import annotations

import difflib
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from featurestream.definitions.models import ProjectDefinition
from featurestream.registry.records import ObjectNotFoundError, RegistryError

NodeKind = Literal["entity", "source", "field", "view", "feature", "service", "consumer"]
NODE_KINDS: tuple[NodeKind, ...] = ("source", "field", "entity", "view", "feature", "service", "consumer")
KIND_ALIASES: dict[str, NodeKind] = {
    "entity": "entity", "entities": "entity", "source": "source", "sources": "source",
    "field": "field", "fields": "field", "view": "view", "views": "view", "feature_view": "view",
    "feature_views": "view", "feature": "feature", "features": "feature", "service": "service",
    "services": "service", "feature_service": "service", "feature_services": "service",
    "consumer": "consumer", "consumers": "consumer",
}


class AmbiguousNameError(RegistryError):
    pass


@dataclass(frozen=True)
class Node:
    kind: NodeKind
    name: str

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "kind": self.kind, "name": self.name}


def _order(node: Node) -> tuple[int, str]:
    return NODE_KINDS.index(node.kind), node.name


@dataclass
class LineageGraph:
    nodes: dict[str, Node] = field(default_factory=dict)
    down: dict[str, set[str]] = field(default_factory=dict)
    up: dict[str, set[str]] = field(default_factory=dict)

    def add(self, kind: NodeKind, name: str) -> str:
        node = Node(kind, name)
        self.nodes.setdefault(node.id, node)
        self.down.setdefault(node.id, set())
        self.up.setdefault(node.id, set())
        return node.id

    def link(self, src: str, dst: str) -> None:
        if src in self.nodes and dst in self.nodes and src != dst:
            self.down[src].add(dst)
            self.up[dst].add(src)

    def _reach(self, start: str, edges: dict[str, set[str]]) -> list[Node]:
        seen: set[str] = {start}
        queue = deque([start])
        while queue:
            for nxt in edges[queue.popleft()]:
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        seen.discard(start)
        return sorted((self.nodes[i] for i in seen), key=_order)

    def upstream(self, node_id: str) -> list[Node]:
        return self._reach(node_id, self.up)

    def downstream(self, node_id: str) -> list[Node]:
        return self._reach(node_id, self.down)

    def edges_among(self, ids: set[str]) -> list[tuple[str, str]]:
        return sorted((s, d) for s in ids for d in self.down[s] if d in ids)

    def resolve(self, name: str, kind: str | None = None) -> Node:
        """The node a user means by ``name`` (optionally of ``kind``); clear errors otherwise."""
        name = name.strip()
        wanted = None
        if kind is not None:
            if kind not in KIND_ALIASES:
                raise RegistryError(f"unknown kind '{kind}' (expected one of {', '.join(NODE_KINDS)})")
            wanted = KIND_ALIASES[kind]
        if ":" in name:
            wanted = wanted or "feature"
        candidates = [n for n in self.nodes.values() if n.name == name and wanted in (None, n.kind)]
        if not candidates and ":" not in name and "." not in name and wanted in (None, "feature"):
            candidates = [n for n in self.nodes.values() if n.kind == "feature" and n.name.endswith(":" + name)]
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            listed = ", ".join(f"{n.kind} {n.name}" for n in sorted(candidates, key=_order))
            raise AmbiguousNameError(f"'{name}' could be {listed}: pass --kind (or view:feature for a feature)")
        close = difflib.get_close_matches(name, sorted({n.name for n in self.nodes.values()}), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ObjectNotFoundError(f"nothing named '{name}'{' of kind ' + wanted if wanted else ''}{hint}")


def _refs(definition: ProjectDefinition, refs: tuple[str, ...]) -> list[str]:
    """Feature node ids a list of ``view`` / ``view:feature`` references names."""
    out = []
    for ref in refs:
        view_name, _, feature = ref.partition(":")
        view = definition.feature_view(view_name)
        if view is None:
            continue
        out += [f"feature:{view.name}:{f.name}" for f in view.features if not feature or f.name == feature]
    return out


def build_graph(definition: ProjectDefinition) -> LineageGraph:
    graph = LineageGraph()
    for entity in definition.entities:
        graph.add("entity", entity.name)
    for source in definition.sources:
        src = graph.add("source", source.name)
        for source_field in source.fields:
            graph.link(src, graph.add("field", f"{source.name}.{source_field.name}"))
    for view in definition.feature_views:
        vid = graph.add("view", view.name)
        graph.link(f"source:{view.source}", vid)
        graph.link(f"entity:{view.entity}", vid)
        view_source = definition.source(view.source)
        if view_source is not None:
            graph.link(f"field:{view_source.name}.{view_source.event_time_field}", vid)
        for condition in view.filter:
            graph.link(f"field:{view.source}.{condition.field}", vid)
        for feature in view.features:
            fid = graph.add("feature", f"{view.name}:{feature.name}")
            graph.link(vid, fid)
            if feature.field:
                graph.link(f"field:{view.source}.{feature.field}", fid)
    for service in definition.feature_services:
        sid = graph.add("service", service.name)
        for fid in _refs(definition, service.features):
            graph.link(fid, sid)
    for consumer in definition.consumers:
        cid = graph.add("consumer", consumer.name)
        for name in consumer.feature_services:
            graph.link(f"service:{name}", cid)
        for fid in _refs(definition, consumer.features):
            graph.link(fid, cid)
    return graph


def impact(graph: LineageGraph, node: Node) -> list[Node]:
    """Everything transitively downstream (a source's own fields are part of it, not impacted)."""
    return [n for n in graph.downstream(node.id) if n.kind != "field"]


# ---------------------------------------------------------------- renderings


@dataclass(frozen=True)
class Lineage:
    root: Node
    upstream: list[Node]
    downstream: list[Node]
    edges: list[tuple[str, str]]

    @property
    def nodes(self) -> list[Node]:
        return sorted({self.root, *self.upstream, *self.downstream}, key=_order)


def lineage(graph: LineageGraph, node: Node) -> Lineage:
    up, down = graph.upstream(node.id), graph.downstream(node.id)
    ids = {node.id, *(n.id for n in up), *(n.id for n in down)}
    # Only edges on a path through the root: upstream nodes feed it, downstream nodes follow it.
    up_ids, down_ids = {n.id for n in up} | {node.id}, {n.id for n in down} | {node.id}
    edges = [(s, d) for s, d in graph.edges_among(ids) if (s in up_ids and d in up_ids) or
             (s in down_ids and d in down_ids)]
    return Lineage(node, up, down, edges)


def to_json(result: Lineage) -> dict[str, Any]:
    return {
        "root": result.root.to_json(),
        "upstream": [n.to_json() for n in result.upstream],
        "downstream": [n.to_json() for n in result.downstream],
        "nodes": [n.to_json() for n in result.nodes],
        "edges": [{"from": s, "to": d} for s, d in result.edges],
    }


_MERMAID_SHAPES: dict[NodeKind, tuple[str, str]] = {
    "source": ("[(", ")]"), "field": ("(", ")"), "entity": ("([", "])"), "view": ("[[", "]]"),
    "feature": ("[", "]"), "service": ("{{", "}}"), "consumer": ("[/", "/]"),
}


def to_mermaid(result: Lineage) -> str:
    ids = {node.id: f"n{i}" for i, node in enumerate(result.nodes)}
    lines = ["flowchart LR"]
    for node in result.nodes:
        left, right = _MERMAID_SHAPES[node.kind]
        label = f"{node.kind}: {node.name}".replace('"', "#quot;")
        lines.append(f'  {ids[node.id]}{left}"{label}"{right}')
    lines += [f"  {ids[s]} --> {ids[d]}" for s, d in result.edges]
    lines.append("  classDef root stroke-width:3px")
    lines.append(f"  class {ids[result.root.id]} root")
    return "\n".join(lines) + "\n"


_DOT_SHAPES: dict[NodeKind, str] = {
    "source": "cylinder", "field": "ellipse", "entity": "oval", "view": "box3d", "feature": "box",
    "service": "hexagon", "consumer": "parallelogram",
}


def to_dot(result: Lineage) -> str:
    lines = ["digraph lineage {", "  rankdir=LR;", '  node [fontname="Helvetica"];']
    for node in result.nodes:
        extra = ", penwidth=3" if node == result.root else ""
        label = json.dumps(f"{node.name}\n({node.kind})")
        lines.append(f"  {json.dumps(node.id)} [label={label}, shape={_DOT_SHAPES[node.kind]}{extra}];")
    lines += [f"  {json.dumps(s)} -> {json.dumps(d)};" for s, d in result.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_text(result: Lineage) -> str:
    width = max((len(n.kind) for n in result.nodes), default=8)
    lines = [f"{result.root.kind} {result.root.name}"]
    for title, nodes in (("upstream", result.upstream), ("downstream", result.downstream)):
        lines.append(f"{title}:" if nodes else f"{title}: (none)")
        lines += [f"  {n.kind:<{width}}  {n.name}" for n in nodes]
    return "\n".join(lines) + "\n"
