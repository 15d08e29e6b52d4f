"""Time on the tile grid: epoch milliseconds, tile starts, and which tiles a read merges.

All window arithmetic happens on integer epoch milliseconds: it is exact, cheap, and the same
on the stream and batch paths. Tiles are aligned to epoch multiples of their size.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple

from featurestream.definitions.models import HoppingWindow, SlidingWindow, TumblingWindow

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_US = timedelta(microseconds=1)
LIFETIME_TILE = 0
"""Tile size of lifetime features: one tile (start 0) holds everything."""
NO_HEAD_START = -(2**63)
"""``head_start`` of a fresh state: every event stays raw until the first compaction."""

Instant = datetime | int
"""An aware datetime, or epoch milliseconds."""


def to_millis(t: Instant) -> int:
    """Epoch milliseconds of an aware datetime (floored) or of an int taken as milliseconds."""
    if isinstance(t, datetime):
        if t.tzinfo is None:
            raise ValueError(f"naive datetime {t.isoformat()}: times must be timezone-aware")
        return (t - EPOCH) // _MS
    if isinstance(t, bool) or not isinstance(t, int):
        raise TypeError(f"expected an aware datetime or epoch milliseconds, got {type(t).__name__}")
    return t


def from_millis(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def to_micros(t: datetime) -> int:
    """Timestamp *values* keep microseconds (a datetime's full precision); event times use millis."""
    if t.tzinfo is None:
        raise ValueError(f"naive datetime {t.isoformat()}: timestamps must be timezone-aware")
    return (t - EPOCH) // _US


def from_micros(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def tile_start(t_ms: int, tile_ms: int) -> int:
    """Start of the tile holding ``t_ms``; the lifetime tile (size 0) always starts at 0."""
    return t_ms - t_ms % tile_ms if tile_ms else 0


class TileKey(NamedTuple):
    """One tile of one entity's state: its size (the tile group) and its start, in epoch ms."""

    size_ms: int
    start_ms: int

    def encode(self) -> bytes:
        """``b"60000:1700000040000"``: a readable Redis hash field name."""
        return b"%d:%d" % (self.size_ms, self.start_ms)

    @classmethod
    def decode(cls, raw: bytes | str) -> TileKey:
        text = raw.decode() if isinstance(raw, bytes) else raw
        size, _, start = text.partition(":")
        return cls(int(size), int(start))


WindowKind = Literal["sliding", "tumbling", "hopping", "lifetime"]


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """A feature's window reduced to integers: kind, span and tile size in ms (0 for lifetime)."""

    kind: WindowKind
    span_ms: int
    tile_ms: int

    @classmethod
    def of(cls, window: SlidingWindow | TumblingWindow | HoppingWindow | None) -> WindowSpec:
        if window is None:
            return cls("lifetime", 0, LIFETIME_TILE)
        span = window.span // _MS
        tile = window.tile // _MS
        if isinstance(window, SlidingWindow):
            return cls("sliding", span, tile)
        return cls("tumbling" if isinstance(window, TumblingWindow) else "hopping", span, tile)

    def tile_range(self, at_ms: int) -> tuple[int, int]:
        """Starts (both inclusive) of the tiles a read at ``at_ms`` merges.

        Sliding: the tiles whose start lies in (T - span, T], i.e. from the tile holding T back
        span/tile tiles. Tumbling/hopping: the tiles of [e - span, e), e = T floored to the hop.
        """
        if not self.tile_ms:
            return 0, 0
        c = at_ms - at_ms % self.tile_ms
        if self.kind == "sliding":
            return c - self.span_ms + self.tile_ms, c
        return c - self.span_ms, c - self.tile_ms

    def coverage(self, at_ms: int) -> tuple[int | None, int]:
        """Event times (both inclusive, ms) a read at ``at_ms`` covers; ``None`` = unbounded."""
        if not self.tile_ms:
            return None, at_ms
        lo, hi = self.tile_range(at_ms)
        if self.kind == "sliding":
            return lo, at_ms
        return lo, hi + self.tile_ms - 1
