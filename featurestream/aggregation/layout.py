"""A feature view compiled for aggregation: inputs, filter, and tile groups with row layouts.

Features sharing a tile size share one tile *group*: a tile of the group is one flat row holding
every member's IR at a fixed offset, so a 1-minute tile of 30 features is one struct, not 30;
members with the same aggregation and input (windows 5m, 15m, 1h of one count) share one IR.
"""

from __future__ import annotations

import operator
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from featurestream.aggregation.aggregators import IR, make_aggregator, value_code
from featurestream.aggregation.codec import HeadCodec, RowCodec
from featurestream.aggregation.windows import LIFETIME_TILE, WindowSpec, from_micros, to_micros, to_millis
from featurestream.definitions.models import (
    Condition,
    Feature,
    FeatureView,
    accepted_input_types,
    natural_output_type,
    output_type_allowed,
)
from featurestream.definitions.types import parse_timestamp

Row = list[Any]
GroupColumns = tuple[list[int], list[tuple[Any, ...]]]
"""A tile group's sorted tile starts, and slot k of those tiles as column k."""
STATE_FORMAT = 3
"""Part of every layout fingerprint: bumped when a slot's bytes change meaning (2: distinct sets
replaced HLL sketches; 3: members that differ only in their window share one IR), so states of
an old format are rebuilt rather than misread."""


def _same(value: Any) -> Any:
    return value


def _output_cast(natural: str, declared: str) -> Callable[[Any], Any]:
    if natural == "timestamp":
        return lambda v: None if v is None else from_micros(v)
    if declared == "float64":
        return lambda v: None if v is None else float(v)
    return _same


class FeatureAggregator:
    """One feature: its aggregator, window on the tile grid, and cast to the declared dtype."""

    __slots__ = ("agg", "cast", "feature", "input_type", "output_type", "window")

    def __init__(self, feature: Feature, input_type: str | None) -> None:
        if feature.field is not None and input_type not in accepted_input_types(feature.aggregation):
            raise ValueError(f"feature {feature.name!r}: {feature.aggregation} does not accept {input_type}")
        natural = natural_output_type(feature.aggregation, input_type)
        declared = feature.dtype or natural
        if not output_type_allowed(natural, declared):
            raise ValueError(
                f"feature {feature.name!r}: {feature.aggregation} gives {natural}, not {declared}"
            )
        self.feature = feature
        self.input_type = input_type if feature.field else None
        self.agg = make_aggregator(feature.aggregation, self.input_type)
        self.window = WindowSpec.of(feature.window)
        self.output_type = declared
        self.cast = _output_cast(natural, declared)

    @property
    def name(self) -> str:
        return self.feature.name

    def output(self, ir: IR) -> Any:
        """Finalize an IR and cast it to the declared dtype."""
        return self.cast(self.agg.finalize(ir))


class TileGroup:
    """The features of a view that share one tile size, and the layout of their rows."""

    def __init__(self, tile_ms: int, members: Sequence[tuple[FeatureAggregator, int]]) -> None:
        self.tile_ms = tile_ms
        self.members = tuple(m for m, _ in members)
        # A tile's IR depends on the aggregation and its input, not on the window: members that
        # differ only in their window (txn_count_5m, _15m, _1h) share one IR in the row.
        shared: dict[tuple[str, int], int] = {}
        offsets, o = [], 0
        owners: list[tuple[FeatureAggregator, int, int]] = []  # (aggregator, offset, value index)
        for m, vi in members:
            key = (m.agg.kind, vi)
            if key not in shared:
                shared[key] = o
                owners.append((m, o, vi))
                o += m.agg.width
            offsets.append(shared[key])
        self.offsets = tuple(offsets)
        self._owners = tuple((m, off) for m, off, _ in owners)
        self.slots = "".join(m.agg.slots for m, _, _ in owners)
        self.codec = RowCodec(self.slots)
        self._identity = tuple(s for m, _, _ in owners for s in m.agg.identity())
        # members share the tile grid, so the oldest tile read is (tile holding T) - reach
        self._reach = max(
            m.window.span_ms - (tile_ms if m.window.kind == "sliding" else 0) for m in self.members
        )
        # (bound update, offset, index into the extracted values): the per-event inner loop
        self._plan = tuple((m.agg.update, off, vi) for m, off, vi in owners)
        # members with equal windows read the same tiles: their range is found once per read
        self._windows = tuple(dict.fromkeys(m.window for m in self.members))
        # evaluate's inner loop, with every lookup done once: (name, merge_columns, finalize,
        # cast or None, offset, width, window index, identity IR)
        self._eval_plan = tuple(
            (m.name, m.agg.merge_columns, m.agg.finalize, None if m.cast is _same else m.cast, off, m.agg.width,
             self._windows.index(m.window), m.agg.identity())
            for m, off in zip(self.members, self.offsets, strict=True)
        )

    def new_row(self) -> Row:
        return list(self._identity)

    def update(self, row: Row, values: tuple[Any, ...], t: int, seq: int) -> None:
        for update, o, vi in self._plan:
            update(row, o, values[vi], t, seq)

    def merge_rows(self, a: Sequence[Any], b: Sequence[Any]) -> Row:
        """A new row merging two; neither input is mutated (sketches are never shared)."""
        out: Row = []
        for m, o in self._owners:
            w = m.agg.width
            out.extend(m.agg.merge_columns(list(zip(a[o : o + w], b[o : o + w], strict=True))))
        return out

    def columns(self, tiles: Mapping[int, Row]) -> GroupColumns:
        """Sorted tile starts, and slot k of those tiles as column k (one C-level transpose)."""
        starts = sorted(tiles)
        if not starts:
            return starts, [()] * len(self.slots)
        return starts, list(zip(*(tiles[s] for s in starts), strict=True))

    def window_ranges(self, starts: Sequence[int], at_ms: int) -> list[int]:
        """Per window of the group, the index range of ``starts`` a read at ``at_ms`` merges
        (as ``evaluate`` finds it without ``partial``), flattened."""
        return [i for a, b, _ in self._ranges(starts, at_ms, None) for i in (a, b)]

    def _ranges(self, starts: Sequence[int], at_ms: int, partial_start: int | None) -> list[tuple[int, int, bool]]:
        """Per window, (first, end) indices into ``starts`` of the tiles a read at ``at_ms``
        merges, and whether the partial row (of the tile at ``partial_start``) replaces the
        stored tile there."""
        out = []
        for window in self._windows:
            lo, hi = window.tile_range(at_ms)
            end = hi if partial_start is None or not lo <= partial_start <= hi else partial_start - 1
            out.append((bisect_left(starts, lo), bisect_right(starts, end), end != hi))
        return out

    def oldest_needed(self, at_ms: int) -> int:
        """Start of the oldest tile any member reads at or after ``at_ms``."""
        if not self.tile_ms:
            return 0
        return at_ms - at_ms % self.tile_ms - self._reach

    def evaluate(
        self,
        out: dict[str, Any],
        starts: Sequence[int],
        cols: Sequence[Sequence[Any]],
        at_ms: int,
        partial: Row | None = None,
    ) -> None:
        """Write every member's value at ``at_ms`` into ``out``.

        ``starts`` are the sorted tile starts and ``cols[k]`` slot k of those tiles. With
        ``partial``, that row replaces the tile holding ``at_ms`` (the batch path's exact near
        edge); without it, every tile in range is merged as stored.
        """
        c = at_ms - at_ms % self.tile_ms if self.tile_ms else 0
        ranges = self._ranges(starts, at_ms, c if partial is not None else None)
        for name, merge, finalize, cast, o, w, wi, identity in self._eval_plan:
            a, b, with_partial = ranges[wi]
            if with_partial:
                assert partial is not None
                ir = merge([(*col[a:b], p) for col, p in zip(cols[o : o + w], partial[o : o + w], strict=True)])
            elif a >= b:
                ir = identity
            elif w == 1:
                ir = merge((cols[o][a:b],))
            else:
                ir = merge([col[a:b] for col in cols[o : o + w]])
            value = finalize(ir)
            out[name] = value if cast is None else cast(value)


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "in": lambda v, ref: v in ref,
    "not_in": lambda v, ref: v not in ref,
}


def _coerce(value: Any, value_type: str) -> Any:
    """A condition's JSON value comparable with the field's typed values.

    Timestamps (ISO-8601 text, UTC if no offset, or epoch ms) become epoch ms, like event values.
    """
    if isinstance(value, list):
        return frozenset(_coerce(v, value_type) for v in value)
    if value_type == "timestamp" and value is not None:
        return parse_timestamp(value)
    return value


def _timestamp_ms(value: Any) -> int:
    """Timestamp field values arrive as epoch ms (the decoder's form) or aware datetimes."""
    return value if isinstance(value, int) else to_millis(value)


def _timestamp_micros(value: Any) -> int:
    return value * 1000 if isinstance(value, int) else to_micros(value)


def _predicate(cond: Condition, value_type: str) -> Callable[[Mapping[str, Any]], bool]:
    compare, ref, name = _COMPARE[cond.op], _coerce(cond.value, value_type), cond.field
    normalise = _timestamp_ms if value_type == "timestamp" else None

    # SQL-like: a null field fails every condition, "ne" and "not_in" included
    def check(event: Mapping[str, Any]) -> bool:
        v = event.get(name)
        if v is None:
            return False
        return compare(normalise(v) if normalise else v, ref)

    return check


_CONVERT: dict[str, Callable[[Any], Any] | None] = {
    "int64": None,
    "float64": float,  # 3 and 3.0 must aggregate (and hash into sketches) alike
    "bool": None,
    "string": None,
    "timestamp": _timestamp_micros,
}


class ViewLayout:
    """Everything fixed about aggregating one feature view, computed once."""

    def __init__(self, view: FeatureView, field_types: Mapping[str, str]) -> None:
        self.view = view
        self.fields: tuple[str, ...] = tuple(dict.fromkeys(f.field for f in view.features if f.field))
        for name in (*self.fields, *(c.field for c in view.filter)):
            if name not in field_types:
                raise ValueError(f"view {view.name!r}: unknown source field {name!r}")
        self.field_types = {name: field_types[name] for name in self.fields}
        self.features = tuple(
            FeatureAggregator(f, field_types[f.field] if f.field else None) for f in view.features
        )
        by_tile: dict[int, list[tuple[FeatureAggregator, int]]] = {}
        for fa in self.features:
            vi = self.fields.index(fa.feature.field) + 1 if fa.feature.field else 0
            by_tile.setdefault(fa.window.tile_ms, []).append((fa, vi))
        self.groups = tuple(TileGroup(tile, members) for tile, members in sorted(by_tile.items()))
        self.group_index = {g.tile_ms: i for i, g in enumerate(self.groups)}
        self.head_codec = HeadCodec("".join(value_code(self.field_types[n]) for n in self.fields))
        self._filters = tuple(_predicate(c, field_types[c.field]) for c in view.filter)
        self._inputs = tuple((n, _CONVERT[self.field_types[n]]) for n in self.fields)
        shape = [(g.tile_ms, g.slots, g.offsets, [(m.agg.kind, m.input_type) for m in g.members]) for g in self.groups]
        self.fingerprint = zlib.crc32(repr((STATE_FORMAT, shape, self.head_codec.codes)).encode())
        self.has_lifetime = LIFETIME_TILE in self.group_index

    def extract(self, event: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """The event's input values (``values[0]`` is True), or None if the filter drops it."""
        for keep in self._filters:
            if not keep(event):
                return None
        values: list[Any] = [True]
        for name, convert in self._inputs:
            v = event.get(name)
            values.append(v if v is None or convert is None else convert(v))
        return tuple(values)
