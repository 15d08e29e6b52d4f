"""The point-in-time join of one view group: label rows sorted by entity, merged with the
entities' archived events as they stream out of PostgreSQL.

``GroupLabels.of`` sorts the label rows of a group by (entity key, timestamp) with pyarrow and
numbers the distinct entities in that order; ``compute`` streams their events (``archive.py``),
evaluates each entity at its label times (``pointintime.py``) in blocks of about
``BLOCK_ROWS`` label rows, and hands each block to a ``SpillWriter``. Entities without events
cost nothing: their rows keep the block's defaults (null, MISSING).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc

from featurestream.offline.archive import entity_events
from featurestream.offline.features import RequestedFeature, ViewGroup
from featurestream.offline.pointintime import STATUSES, EntityEvaluator
from featurestream.offline.spill import SpillWriter
from featurestream.serving.service import MISSING

BLOCK_ROWS = 65_536
ARROW_TYPES: dict[str, pa.DataType] = {
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "string": pa.string(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}
STATUS_TYPE = pa.dictionary(pa.int8(), pa.string())
_STATUS_DICTIONARY = pa.array(STATUSES, pa.string())
_STATUS_CODE = {s: i for i, s in enumerate(STATUSES)}

StatusCounts = dict[str, dict[str, int]]


@dataclass
class GroupLabels:
    """The label rows of one view group that have every join key, sorted by (key, time)."""

    entities: pa.Table
    """One row per distinct entity key (columns k0, k1, ...), entity i = kid i."""
    bounds: np.ndarray
    """Entity i owns sorted positions bounds[i]:bounds[i + 1]."""
    rows: np.ndarray
    """Input row number of each sorted position."""
    times: np.ndarray
    """Read time (epoch ms) of each sorted position."""

    @classmethod
    def of(cls, keys: list[pa.Array], times: np.ndarray) -> tuple[GroupLabels, np.ndarray]:
        """The sorted rows, and the input rows lacking a key (they get MISSING)."""
        valid = np.ones(len(times), dtype=bool)
        for key in keys:
            if key.null_count:
                valid &= ~np.asarray(key.is_null().to_numpy(zero_copy_only=False))
        rows = np.flatnonzero(valid)
        mask = pa.array(valid)
        names = [f"k{i}" for i in range(len(keys))]
        ordered = pa.table(
            [*(k if valid.all() else k.filter(mask) for k in keys), times[rows], rows],
            names=[*names, "ts", "row"],
        ).sort_by([*((n, "ascending") for n in names), ("ts", "ascending"), ("row", "ascending")])
        starts = _entity_starts(ordered, names)
        sorted_rows = np.asarray(ordered["row"])
        labels = cls(
            entities=ordered.select(names).take(pa.array(starts, pa.int64())),
            bounds=np.append(starts, len(sorted_rows)).astype(np.int64),
            rows=sorted_rows,
            times=np.asarray(ordered["ts"]),
        )
        return labels, np.flatnonzero(~valid)

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    def split(self, parts: int) -> list[GroupLabels]:
        """About equal shares of label rows, cut between entities."""
        total = int(self.bounds[-1])
        cuts = [0]
        for i in range(1, parts):
            kid = int(np.searchsorted(self.bounds, total * i // parts, side="left"))
            cuts.append(min(max(kid, cuts[-1]), self.count))
        cuts.append(self.count)
        out = []
        for first, last in pairwise(cuts):
            if last > first:
                p0, p1 = int(self.bounds[first]), int(self.bounds[last])
                out.append(
                    GroupLabels(
                        self.entities.slice(first, last - first),
                        self.bounds[first : last + 1] - p0,
                        self.rows[p0:p1],
                        self.times[p0:p1],
                    )
                )
        return out


def _entity_starts(ordered: pa.Table, names: list[str]) -> np.ndarray:
    n = ordered.num_rows
    if n == 0:
        return np.empty(0, np.int64)
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for name in names:
        column = ordered[name].combine_chunks()
        differs = pc.not_equal(column.slice(1), column.slice(0, n - 1))
        change[1:] |= differs.to_numpy(zero_copy_only=False)
    return np.flatnonzero(change)


def output_schema(outputs: list[RequestedFeature]) -> pa.Schema:
    return pa.schema(
        [pa.field(f.column, ARROW_TYPES[f.output_type]) for f in outputs]
        + [pa.field(f.status_column, STATUS_TYPE) for f in outputs]
    )


def compute(
    conn: psycopg.Connection[Any] | None,
    group: ViewGroup,
    labels: GroupLabels,
    writer: SpillWriter,
    *,
    as_of_arrival: bool,
    counts: StatusCounts,
    advance: Callable[[int], None],
) -> None:
    """Evaluate every label row of ``labels``; ``conn`` None: the source has no archive yet."""
    times, bounds = labels.times, labels.bounds
    hi = times[bounds[1:] - 1] + 1 if labels.count else np.empty(0, np.int64)
    lookback = None if as_of_arrival else group.lookback_ms()
    lo = times[bounds[:-1]] - lookback if lookback is not None else None
    stream: Iterator[tuple[int, list[Any]]] = (
        entity_events(conn, group, labels.entities, hi, lo, as_of_arrival=as_of_arrival)
        if conn is not None
        else iter(())
    )
    evaluator = EntityEvaluator(group, as_of_arrival=as_of_arrival)
    outputs = [f for p in group.views for f in p.features]
    try:
        pending = next(stream, None)
        for first, last in _blocks(bounds, BLOCK_ROWS):
            p0, p1 = int(bounds[first]), int(bounds[last])
            values: list[list[Any]] = [[None] * (p1 - p0) for _ in outputs]
            statuses: list[list[str]] = [[MISSING] * (p1 - p0) for _ in outputs]
            block_times = times[p0:p1].tolist()
            while pending is not None and pending[0] < last:
                kid, events = pending
                a, b = int(bounds[kid]) - p0, int(bounds[kid + 1]) - p0
                evaluator.evaluate(events, block_times[a:b], values, statuses, a)
                pending = next(stream, None)
            emit(writer, labels.rows[p0:p1], outputs, values, statuses, counts)
            advance(p1 - p0)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def emit_missing(
    writer: SpillWriter, rows: np.ndarray, outputs: list[RequestedFeature], counts: StatusCounts
) -> None:
    for start in range(0, len(rows), BLOCK_ROWS):
        part = rows[start : start + BLOCK_ROWS]
        n = len(part)
        emit(writer, part, outputs, [[None] * n for _ in outputs], [[MISSING] * n for _ in outputs], counts)


def emit(
    writer: SpillWriter,
    rows: np.ndarray,
    outputs: list[RequestedFeature],
    values: list[list[Any]],
    statuses: list[list[str]],
    counts: StatusCounts,
) -> None:
    arrays: list[pa.Array] = [
        pa.array(v, ARROW_TYPES[f.output_type]) for f, v in zip(outputs, values, strict=True)
    ]
    for f, column in zip(outputs, statuses, strict=True):
        codes = np.fromiter((_STATUS_CODE[s] for s in column), dtype=np.int8, count=len(column))
        arrays.append(pa.DictionaryArray.from_arrays(pa.array(codes), _STATUS_DICTIONARY))
        tally = counts.setdefault(f.column, dict.fromkeys(STATUSES, 0))
        for code, count in enumerate(np.bincount(codes, minlength=len(STATUSES)).tolist()):
            tally[STATUSES[code]] += count
    names = [f.column for f in outputs] + [f.status_column for f in outputs]
    writer.add(rows, pa.RecordBatch.from_arrays(arrays, names=names))


def _blocks(bounds: np.ndarray, rows: int) -> Iterator[tuple[int, int]]:
    """Runs of whole entities [first, last) of about ``rows`` label rows each."""
    entities = len(bounds) - 1
    first = 0
    while first < entities:
        last = int(np.searchsorted(bounds, bounds[first] + rows, side="left"))
        last = min(max(last, first + 1), entities)
        yield first, last
        first = last
