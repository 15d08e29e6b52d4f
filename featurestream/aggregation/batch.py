"""Offline evaluation: feature values at many read times from an entity's whole history.

Same aggregators, same tile rows and same window ranges as the online path. Per tile group:
fold every event into its tile once (O(events)), then sweep the read times in order, growing
one *partial* row for the tile that holds the read time, so the near edge is exact without the
head: O(events + reads x tiles per window).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from featurestream.aggregation.codec import HeadEvent
from featurestream.aggregation.layout import Row, ViewLayout
from featurestream.aggregation.windows import Instant, to_millis


def evaluate_history(
    layout: ViewLayout, records: list[HeadEvent], read_times: Sequence[Instant]
) -> list[dict[str, Any]]:
    """Values at each read time (results in the order of ``read_times``)."""
    records.sort(key=itemgetter(0, 1))  # tiles do not care; the sweep needs time order
    times = [rec[0] for rec in records]
    reads = [to_millis(t) for t in read_times]
    order = sorted(range(len(reads)), key=reads.__getitem__)
    out: list[dict[str, Any]] = [{} for _ in reads]
    for group in layout.groups:
        tile = group.tile_ms
        tiles: dict[int, Row] = {}
        for t, seq, values in records:
            start = t - t % tile if tile else 0
            row = tiles.get(start)
            if row is None:
                row = tiles[start] = group.new_row()
            group.update(row, values, t, seq)
        starts, cols = group.columns(tiles)

        current: int | None = None
        partial = group.new_row()
        i = 0
        for r in order:
            at = reads[r]
            c = at - at % tile if tile else 0
            if c != current:  # a new tile: restart the partial at its first event
                current = c
                partial = group.new_row()
                i = bisect_left(times, c) if tile else 0
            while i < len(records) and times[i] <= at:
                t, seq, values = records[i]
                group.update(partial, values, t, seq)
                i += 1
            group.evaluate(out[r], starts, cols, at, partial)
    return out
