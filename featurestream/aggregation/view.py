"""ViewAggregator: the one entry point both the stream and the batch paths call.

Stream worker, per entity::

    result = agg.fold(state, events, sequences=offsets)   # tiles + head, late events counted
    result.add(agg.compact(state, now_ms - grace))        # head events older than that -> tiles
    removed = agg.prune(state, now_ms)                     # tiles no window reads any more
    # upsert result.touched (encode_tile) and the header, delete `removed`

Serving: ``agg.evaluate(agg.decode_state(raw), now)``. Batch: ``agg.evaluate_history``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import repeat
from typing import Any

from featurestream.aggregation import batch
from featurestream.aggregation import state as codec
from featurestream.aggregation.codec import HeadEvent
from featurestream.aggregation.layout import FeatureAggregator, GroupColumns, Row, TileGroup, ViewLayout
from featurestream.aggregation.state import FoldResult, ViewState
from featurestream.aggregation.windows import NO_HEAD_START, Instant, TileKey, to_millis
from featurestream.definitions.models import FeatureView, Source

Event = Mapping[str, Any]


class ViewAggregator:
    """Folds, merges, prunes and evaluates one feature view's aggregation state per entity.

    ``field_types`` gives the source's field types; ``time_field`` names the event time
    (aware datetime or epoch ms) in each event dict. Field values arrive validated and typed.
    """

    def __init__(
        self, view: FeatureView, field_types: Mapping[str, str], *, time_field: str = "event_time"
    ) -> None:
        self.layout = ViewLayout(view, field_types)
        self.time_field = time_field
        self._tile_sizes = tuple(g.tile_ms for g in self.layout.groups)

    @classmethod
    def from_source(cls, view: FeatureView, source: Source) -> ViewAggregator:
        types = {f.name: f.type for f in source.fields}
        return cls(view, types, time_field=source.event_time_field)

    @property
    def features(self) -> tuple[FeatureAggregator, ...]:
        return self.layout.features

    @property
    def groups(self) -> tuple[TileGroup, ...]:
        return self.layout.groups

    # ------------------------------------------------------------ building state

    def new_state(self, head_start: Instant | None = None) -> ViewState:
        """An empty state; by default every event stays in the head until ``compact``."""
        start = NO_HEAD_START if head_start is None else to_millis(head_start)
        return ViewState.empty(len(self.layout.groups), start)

    def records(self, events: Iterable[Event], sequences: Iterable[int] | None = None) -> Iterator[HeadEvent]:
        """(event time ms, sequence, values) of the events the view's filter keeps."""
        pairs = zip(events, sequences, strict=True) if sequences is not None else zip(events, repeat(0))
        extract, tf = self.layout.extract, self.time_field
        for event, seq in pairs:
            values = extract(event)
            if values is not None:
                yield to_millis(event[tf]), seq, values

    def fold(
        self, state: ViewState, events: Iterable[Event], sequences: Iterable[int] | None = None
    ) -> FoldResult:
        """Fold events, in any order, into ``state``.

        Events at or after ``head_start`` join the head; older ones go to their tiles, or are
        counted late when every group has pruned their tile. ``sequences`` (e.g. Kafka offsets)
        break event-time ties for first/last; without them the greater/lesser value wins.
        """
        result = FoldResult()
        head_start, head, latest = state.head_start, state.head, state.latest
        for rec in self.records(events, sequences):
            if rec[0] > latest:
                latest = rec[0]
            if rec[0] >= head_start:
                head.append(rec)
                result.head += 1
            elif not self._apply(state, rec, result.touched):
                result.late += 1
        state.latest = latest
        return result

    def _apply(self, state: ViewState, rec: HeadEvent, touched: set[TileKey]) -> bool:
        """Fold one record into its tile of every group that still keeps that tile."""
        t, seq, values = rec
        applied = False
        for group, tiles, horizon in zip(self.layout.groups, state.tiles, state.horizon, strict=True):
            tile = group.tile_ms
            start = t - t % tile if tile else 0
            if start < horizon:
                continue
            row = tiles.get(start)
            if row is None:
                row = tiles[start] = group.new_row()
            group.update(row, values, t, seq)
            touched.add(TileKey(tile, start))
            applied = True
        return applied

    def compact(self, state: ViewState, upto: Instant) -> FoldResult:
        """Move head events older than ``upto`` into tiles and advance ``head_start`` to it.

        Reads at T >= head_start stay exact, so pass a time no later than any future read
        (the wall clock minus a few seconds of skew, say). ``head_start`` never moves back.
        """
        result = FoldResult()
        upto_ms = to_millis(upto)
        if upto_ms <= state.head_start:
            return result
        state.head_start = upto_ms
        keep: list[HeadEvent] = []
        for rec in state.head:
            if rec[0] >= upto_ms:
                keep.append(rec)
            elif not self._apply(state, rec, result.touched):
                result.late += 1
        result.head = len(state.head) - len(keep)
        state.head = keep
        return result

    def prune(self, state: ViewState, watermark: Instant) -> list[TileKey]:
        """Drop tiles that no read at or after ``watermark`` needs; returns the removed keys.

        Later events for the dropped range are reported late by ``fold``.
        """
        at = to_millis(watermark)
        removed: list[TileKey] = []
        for g, group in enumerate(self.layout.groups):
            needed = group.oldest_needed(at)
            if needed <= state.horizon[g]:
                continue
            state.horizon[g] = needed
            tiles = state.tiles[g]
            for start in [s for s in tiles if s < needed]:
                del tiles[start]
                removed.append(TileKey(group.tile_ms, start))
        return removed

    def merge(self, state: ViewState, other: ViewState) -> FoldResult:
        """Merge ``other`` (e.g. a partial folded from a new batch) into ``state``.

        ``other`` is left unchanged. The merged head starts at the later of the two head
        starts, so tiles still hold only events before it.
        """
        result = FoldResult()
        for g, group in enumerate(self.layout.groups):
            tiles = state.tiles[g]
            horizon = state.horizon[g] = max(state.horizon[g], other.horizon[g])
            for start in [s for s in tiles if s < horizon]:
                del tiles[start]
            for start, row in other.tiles[g].items():
                if start < horizon:
                    continue
                held = tiles.get(start)
                tiles[start] = group.merge_rows(held if held is not None else group.new_row(), row)
                result.touched.add(TileKey(group.tile_ms, start))
        result.add(self.compact(state, other.head_start))
        for rec in other.head:  # routed like fold: the head keeps only events >= head_start
            if rec[0] >= state.head_start:
                state.head.append(rec)
                result.head += 1
            elif not self._apply(state, rec, result.touched):
                result.late += 1
        state.latest = max(state.latest, other.latest)
        return result

    def build_state(
        self, events: Iterable[Event], now: Instant, sequences: Iterable[int] | None = None
    ) -> ViewState:
        """The online state as of ``now`` rebuilt from history (materialize)."""
        state = self.new_state(now)
        self.prune(state, now)
        self.fold(state, events, sequences)
        return state

    # ------------------------------------------------------------ reading

    def evaluate(
        self, state: ViewState, at: Instant, columns: Sequence[GroupColumns] | None = None
    ) -> dict[str, Any]:
        """Every feature's value at ``at``: tiles in each window plus head events <= ``at``.

        Exact at the near edge for ``at >= state.head_start``; earlier reads may include events
        in (at, head_start) of the tile holding ``at``. ``columns``: ``self.columns(state)``,
        kept by a reader that evaluates one state many times.
        """
        at_ms = to_millis(at)
        pending = [rec for rec in state.head if rec[0] <= at_ms]
        if columns is None or pending:
            columns = self.columns(state, pending)
        out: dict[str, Any] = {}
        for group, (starts, cols) in zip(self.layout.groups, columns, strict=True):
            group.evaluate(out, starts, cols, at_ms)
        return out

    def columns(
        self, state: ViewState, pending: Sequence[HeadEvent] = ()
    ) -> list[GroupColumns]:
        """Per group, the sorted tile starts and the tiles' slots as columns (``TileGroup.columns``),
        with ``pending`` head events merged in."""
        return [
            group.columns(self._with_head(group, tiles, pending) if pending else tiles)
            for group, tiles in zip(self.layout.groups, state.tiles, strict=True)
        ]

    def evaluation_key(self, state: ViewState, at: Instant) -> tuple[int, ...]:
        """Two reads of one state with equal keys evaluate to equal values: a read time matters
        only through the tile holding it, per group, and the head events at or before it (a
        set that only grows with time, so its size names it). Cheap; see also ``window_key``."""
        at_ms = to_millis(at)
        return (
            *[at_ms - at_ms % tile if tile else 0 for tile in self._tile_sizes],
            sum(1 for rec in state.head if rec[0] <= at_ms),
        )

    def window_key(
        self, state: ViewState, at: Instant, columns: Sequence[GroupColumns]
    ) -> tuple[int, ...]:
        """A finer ``evaluation_key``: equal keys, equal values. With no head event at or before
        ``at``, values depend on the read time only through which stored tiles each window
        covers, so a read in a new minute whose windows lost no tile (most entities, most
        minutes) keeps its values. ``columns``: ``self.columns(state)``."""
        at_ms = to_millis(at)
        if any(rec[0] <= at_ms for rec in state.head):  # they add tiles of their own: the coarse key
            return self.evaluation_key(state, at)
        ranges: list[int] = []
        for group, (starts, _) in zip(self.layout.groups, columns, strict=True):
            ranges.extend(group.window_ranges(starts, at_ms))
        ranges.append(-1)  # never equal to a coarse key (whose last item is >= 1 here)
        return tuple(ranges)

    @staticmethod
    def _with_head(group: TileGroup, tiles: dict[int, Row], pending: Sequence[HeadEvent]) -> dict[int, Row]:
        """A copy of ``tiles`` with the pending head events merged in (the state is untouched)."""
        fresh: dict[int, Row] = {}
        tile = group.tile_ms
        for t, seq, values in pending:
            start = t - t % tile if tile else 0
            row = fresh.get(start)
            if row is None:
                row = fresh[start] = group.new_row()
            group.update(row, values, t, seq)
        merged = dict(tiles)
        for start, row in fresh.items():
            held = merged.get(start)
            merged[start] = row if held is None else group.merge_rows(held, row)
        return merged

    def evaluate_history(
        self,
        events: Iterable[Event],
        read_times: Sequence[Instant],
        sequences: Iterable[int] | None = None,
    ) -> list[dict[str, Any]]:
        """Feature values at each read time from an entity's full event history (any order).

        Training sets, backfills and the consistency reference: same aggregators and tile
        grid as ``evaluate``, exact at the near edge, late events included.
        """
        return batch.evaluate_history(self.layout, list(self.records(events, sequences)), read_times)

    # ------------------------------------------------------------ bytes

    def encode_state(self, state: ViewState) -> bytes:
        return codec.encode(self.layout, state)

    def decode_state(self, raw: bytes) -> ViewState:
        return codec.decode(self.layout, raw)

    def encode_header(self, state: ViewState) -> bytes:
        """head_start, horizons and the head.

        With per-tile storage, write it in the same transaction as the touched tiles after every
        fold, compact, prune or merge: a compaction moves events from the head into tiles, so a
        stale header beside fresh tiles would count them twice.
        """
        return codec.encode_header(self.layout, state)

    def encode_tile(self, state: ViewState, key: TileKey) -> bytes:
        return codec.encode_tile(self.layout, state, key)

    def decode_parts(
        self, header: bytes, tiles: Iterable[tuple[TileKey, bytes]], *, shared_rows: bool = False
    ) -> ViewState:
        return codec.decode_parts(self.layout, header, tiles, shared_rows=shared_rows)

    def tile_keys(self, state: ViewState) -> list[TileKey]:
        return [
            TileKey(g.tile_ms, s)
            for g, tiles in zip(self.layout.groups, state.tiles, strict=True)
            for s in tiles
        ]
