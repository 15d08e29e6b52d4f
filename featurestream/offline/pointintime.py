"""One entity's feature values at its label times, with the status serving would have given.

Values come from the one aggregation core (``ViewAggregator.evaluate_history``), so a window
read at T covers exactly what the online state covers at T. Statuses follow
``featurestream.serving.service.value_status`` with T as "now":

* MISSING: no state would exist at T (no event seen yet, or the online key expired: the last
  write is at least ``online_ttl`` before T), or the value is null (a mean of no events);
* INVALID: the value fails the feature's ``validation`` (the value is kept, as served);
* STALE: the entity's newest event is more than ``max_age`` before T (the value is nulled:
  a model must not learn from values serving would flag);
* PRESENT otherwise.

As of arrival, an event is visible at T only if its event time and its arrival are both at
or before T. Reads with the same set of "happened but not yet arrived" events share one
evaluation; each such set costs one more pass over the entity's events up to those reads.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from featurestream.definitions.models import ValueCheck
from featurestream.offline.archive import Row
from featurestream.offline.features import ViewGroup
from featurestream.serving.service import INVALID, MISSING, PRESENT, STALE, value_status

STATUSES = (PRESENT, MISSING, STALE, INVALID)
EVENT_MS_KEY = "__event_ms"


@dataclass(frozen=True, slots=True)
class _Output:
    name: str
    column: int
    max_age_ms: float | None
    check: ValueCheck | None


class EntityEvaluator:
    """Evaluates every requested feature of one view group for one entity at a time."""

    def __init__(self, group: ViewGroup, *, as_of_arrival: bool) -> None:
        self.as_of_arrival = as_of_arrival
        time_field = group.source.event_time_field
        # rows are (kid, arrival ms, offset, event ms, *fields): one dict(zip()) per event
        first = EVENT_MS_KEY if time_field in group.fields else time_field
        self.keys = (first, *group.fields)
        self.views: list[tuple[Any, int | None, list[_Output]]] = []
        column = 0
        for plan in group.views:
            outputs = []
            for f in plan.features:
                outputs.append(_Output(f.feature.name, column, f.max_age_ms, f.feature.validation))
                column += 1
            self.views.append((plan.agg, plan.ttl_ms, outputs))
        self.width = column

    def evaluate(
        self,
        rows: Sequence[Row],
        reads: Sequence[int],
        values: list[list[Any]],
        statuses: list[list[str]],
        at: int,
    ) -> None:
        """Write each feature's value and status at ``reads`` (ascending epoch ms) into
        ``values[column][at + i]`` and ``statuses[column][at + i]``."""
        keys = self.keys
        events = [dict(zip(keys, row[3:], strict=False)) for row in rows]
        seqs = [row[2] for row in rows]
        times = [row[3] for row in rows]
        if self.as_of_arrival:
            arrivals = [row[1] for row in rows]
            newest, written = _visible_newest(times, arrivals, reads)
        else:
            newest = _newest(times, reads)
            written = newest
        for agg, ttl_ms, outputs in self.views:
            if self.as_of_arrival:
                results = _by_arrival(agg, events, seqs, times, arrivals, reads)
            else:
                results = agg.evaluate_history(events, reads, seqs)
            for i, (at_ms, result) in enumerate(zip(reads, results, strict=True)):
                newest_ms, write_ms = newest[i], written[i]
                known = newest_ms is not None and (ttl_ms is None or at_ms - write_ms < ttl_ms)  # type: ignore[operator]
                for out in outputs:
                    value, status = _status(result.get(out.name), known, newest_ms, at_ms, out)
                    values[out.column][at + i] = value
                    statuses[out.column][at + i] = status


def _status(value: Any, known: bool, newest_ms: int | None, at_ms: int, out: _Output) -> tuple[Any, str]:
    """The value and its status as serving gives them at ``at_ms``; a stale or missing value is nulled."""
    status = value_status(value, known, newest_ms, at_ms, out.check, out.max_age_ms)
    return (value if status in (PRESENT, INVALID) else None), status


def _newest(times: Sequence[int], reads: Sequence[int]) -> list[int | None]:
    """Newest event time at or before each read (times and reads ascending)."""
    out: list[int | None] = []
    j, n, last = 0, len(times), None
    for at in reads:
        while j < n and times[j] <= at:
            last = times[j]
            j += 1
        out.append(last)
    return out


def _visible_newest(
    times: Sequence[int], arrivals: Sequence[int], reads: Sequence[int]
) -> tuple[list[int | None], list[int | None]]:
    """Newest event time and latest arrival among the events visible at each read."""
    order = sorted(range(len(times)), key=lambda i: max(times[i], arrivals[i]))
    visible_from = [max(times[i], arrivals[i]) for i in order]
    newest = list(accumulate((times[i] for i in order), max))
    written = list(accumulate((arrivals[i] for i in order), max))
    out_newest: list[int | None] = []
    out_written: list[int | None] = []
    for at in reads:
        k = bisect_right(visible_from, at) - 1
        out_newest.append(newest[k] if k >= 0 else None)
        out_written.append(written[k] if k >= 0 else None)
    return out_newest, out_written


def pending_sets(
    times: Sequence[int], arrivals: Sequence[int], reads: Sequence[int]
) -> dict[tuple[int, ...], list[int]]:
    """Read positions grouped by the events that had happened but not yet arrived at that read.

    ``()`` collects the reads that see every event up to their time: the common case.
    """
    delayed = sorted((times[i], arrivals[i], i) for i in range(len(times)) if arrivals[i] > times[i])
    heap: list[tuple[int, int]] = []
    groups: dict[tuple[int, ...], list[int]] = {}
    j = 0
    for p, at in enumerate(reads):
        while j < len(delayed) and delayed[j][0] <= at:
            heapq.heappush(heap, (delayed[j][1], delayed[j][2]))
            j += 1
        while heap and heap[0][0] <= at:
            heapq.heappop(heap)
        key = tuple(sorted(i for _, i in heap)) if heap else ()
        groups.setdefault(key, []).append(p)
    return groups


def _by_arrival(
    agg: Any,
    events: list[dict[str, Any]],
    seqs: list[int],
    times: Sequence[int],
    arrivals: Sequence[int],
    reads: Sequence[int],
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{} for _ in reads]
    for pending, positions in pending_sets(times, arrivals, reads).items():
        at = [reads[p] for p in positions]
        if pending:  # evaluate again without the events still in flight (and those after the reads)
            hidden = set(pending)
            keep = [i for i in range(bisect_right(times, at[-1])) if i not in hidden]
            got = agg.evaluate_history([events[i] for i in keep], at, [seqs[i] for i in keep])
        else:
            got = agg.evaluate_history(events, at, seqs)
        for p, value in zip(positions, got, strict=True):
            results[p] = value
    return results
