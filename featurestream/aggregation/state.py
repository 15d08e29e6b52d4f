"""One entity's online aggregation state and its byte format.

Layout (all integers little-endian)::

    header = b"FSA1" | u32 layout fingerprint | i64 head_start | i64 latest | u8 groups
             | i64 horizon per group | head
    head   = varint n | n x (i64 event time ms | i64 seq | varint null-mask | non-null values)
    state  = header | per group: varint tiles | tiles x (i64 start | row)

A row is the group's slots encoded by ``RowCodec``. The whole state is one value (``encode``),
or a header plus one value per tile (``encode_header`` / ``encode_tile``) for a Redis hash
whose tiles are upserted one by one.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from featurestream.aggregation.codec import CodecError, HeadEvent, get_varint, put_varint
from featurestream.aggregation.layout import Row, ViewLayout
from featurestream.aggregation.windows import NO_HEAD_START, TileKey

MAGIC = b"FSA1"
_HEADER = struct.Struct("<4sIqqB")
_I64 = struct.Struct("<q")


class StateLayoutError(CodecError):
    """State written for another layout of the view (features added, removed or reordered).

    Rebuild the entity's state from history (``materialize``) rather than guess.
    """


@dataclass(slots=True)
class ViewState:
    """Online state of one entity for one feature view.

    ``tiles[g]`` maps tile start (ms) to the row of group ``g``; those tiles hold only events
    with event time < ``head_start``. Newer events wait raw in ``head``, so a read at any
    T >= head_start is exact at the near edge. ``horizon[g]``: tiles before it were pruned.
    ``latest``: the newest event time folded in (for freshness), NO_HEAD_START if none.
    """

    head_start: int
    head: list[HeadEvent]
    tiles: list[dict[int, Row]]
    horizon: list[int]
    latest: int = NO_HEAD_START

    @classmethod
    def empty(cls, groups: int, head_start: int = NO_HEAD_START) -> ViewState:
        return cls(head_start, [], [{} for _ in range(groups)], [NO_HEAD_START] * groups)


@dataclass(slots=True)
class FoldResult:
    """What folding (or compacting) changed: the tiles to upsert and what went to the head."""

    late: int = 0
    """Events older than every online window's reach: not in the online state (history has them)."""
    touched: set[TileKey] = field(default_factory=set)
    head: int = 0
    """Events that entered the head (fold, merge) or left it for tiles (compact)."""

    def add(self, other: FoldResult) -> None:
        self.late += other.late
        self.touched |= other.touched
        self.head += other.head


def encode_header(layout: ViewLayout, state: ViewState) -> bytes:
    out = bytearray(
        _HEADER.pack(MAGIC, layout.fingerprint, state.head_start, state.latest, len(state.horizon))
    )
    for h in state.horizon:
        out += _I64.pack(h)
    layout.head_codec.encode(out, state.head)
    return bytes(out)


def _decode_header(layout: ViewLayout, buf: bytes | memoryview) -> tuple[ViewState, int]:
    try:
        magic, fingerprint, head_start, latest, groups = _HEADER.unpack_from(buf, 0)
    except struct.error as exc:
        raise CodecError("truncated state header") from exc
    if magic != MAGIC:
        raise CodecError(f"not aggregation state (magic {magic!r})")
    if fingerprint != layout.fingerprint or groups != len(layout.groups):
        raise StateLayoutError(f"state of another layout of view {layout.view.name!r}")
    pos = _HEADER.size
    horizon = [_I64.unpack_from(buf, pos + 8 * g)[0] for g in range(groups)]
    head, pos = layout.head_codec.decode(buf, pos + 8 * groups)
    return ViewState(head_start, head, [{} for _ in range(groups)], horizon, latest), pos


def encode_tile(layout: ViewLayout, state: ViewState, key: TileKey) -> bytes:
    g = layout.group_index[key.size_ms]
    return layout.groups[g].codec.encode(state.tiles[g][key.start_ms])


def encode(layout: ViewLayout, state: ViewState) -> bytes:
    out = bytearray(encode_header(layout, state))
    for group, tiles in zip(layout.groups, state.tiles, strict=True):
        put_varint(out, len(tiles))
        for start, row in tiles.items():
            out += _I64.pack(start)
            out += group.codec.encode(row)
    return bytes(out)


def decode(layout: ViewLayout, raw: bytes) -> ViewState:
    buf = bytes(raw)  # row decoding slices bytes (cheaper to decode than memoryview slices)
    state, pos = _decode_header(layout, buf)
    try:
        for group, tiles in zip(layout.groups, state.tiles, strict=True):
            count, pos = get_varint(buf, pos)
            for _ in range(count):
                start = _I64.unpack_from(buf, pos)[0]
                tiles[start], pos = group.codec.decode(buf, pos + 8)
    except struct.error as exc:
        raise CodecError("truncated state") from exc
    if pos != len(buf):
        raise CodecError(f"{len(buf) - pos} trailing bytes after the state")
    return state


def decode_parts(
    layout: ViewLayout, header: bytes, tiles: Iterable[tuple[TileKey, bytes]], *, shared_rows: bool = False
) -> ViewState:
    """The state from its header and its tiles (e.g. the fields of a Redis hash).

    ``shared_rows``: tile rows may come from the codecs' memo (``RowCodec.decode_shared``), for
    readers that never fold into the state.
    """
    state, end = _decode_header(layout, memoryview(header))
    if end != len(header):
        raise CodecError("trailing bytes after the state header")
    for key, raw in tiles:
        g = layout.group_index.get(key.size_ms)
        if g is None:
            raise StateLayoutError(f"no tile group of {key.size_ms} ms in view {layout.view.name!r}")
        if key.start_ms >= state.horizon[g]:  # a pruned tile whose delete has not landed yet
            codec = layout.groups[g].codec
            state.tiles[g][key.start_ms] = codec.decode_shared(raw) if shared_rows else codec.decode_all(raw)
    return state
