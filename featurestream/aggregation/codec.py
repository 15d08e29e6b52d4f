"""Byte formats of aggregation state: slot rows (tiles, IRs) and raw head events.

A row is a flat list of slots; each slot has a one-letter code:
``q`` int64, ``d`` float64, ``?`` bool (struct codes), ``S`` UTF-8 string, ``H`` distinct set
(``distinct.py``, its own serialisation). All integers are little-endian.
"""

from __future__ import annotations

import atexit
import struct
import weakref
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from featurestream.aggregation.distinct import DistinctSet
from featurestream.generations import Generations

FIXED_CODES = frozenset("qd?")
SHARED_ROWS_KEPT = 20_000
"""Decoded rows a codec keeps for ``decode_shared`` (``Generations``: the recently used ones)."""
VAR_CODES = frozenset("SH")
_QQ = struct.Struct("<qq")


class CodecError(ValueError):
    """Bytes that do not decode as the expected layout."""


def put_varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def get_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        try:
            b = buf[pos]
        except IndexError:
            raise CodecError("truncated varint") from None
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7


def _var_bytes(code: str, value: Any) -> bytes:
    if code == "S":
        return bytes(value.encode())
    return value.to_bytes() if value is not None else b""  # absent set: empty


def _sketch(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return DistinctSet.from_bytes(raw)
    except ValueError as exc:
        raise CodecError(str(exc)) from None


def _var_value(code: str, raw: bytes | memoryview) -> Any:
    return str(raw, "utf-8") if code == "S" else _sketch(bytes(raw))


def _put_var(out: bytearray, code: str, value: Any) -> None:
    raw = _var_bytes(code, value)
    put_varint(out, len(raw))
    out += raw


def _get_var(buf: bytes | memoryview, pos: int, code: str) -> tuple[Any, int]:
    n, pos = get_varint(buf, pos)
    end = pos + n
    if end > len(buf):
        raise CodecError("truncated value")
    return _var_value(code, buf[pos:end]), end


def _getter(indices: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """itemgetter that always returns a tuple (itemgetter(i) alone returns a bare item)."""
    if len(indices) == 1:
        i = indices[0]
        return lambda row: (row[i],)
    if not indices:
        return lambda row: ()
    return itemgetter(*indices)


_CODECS: weakref.WeakSet[RowCodec] = weakref.WeakSet()


@atexit.register
def forget_shared_rows() -> None:
    """Drop every codec's memo of decoded rows (at exit, so the sketches in them are freed
    before their extension module goes)."""
    for codec in list(_CODECS):
        codec.shared_rows.clear()


class RowCodec:
    """Encodes and decodes rows of slots with a fixed layout (``codes``).

    Bytes: one struct of the fixed slots followed by a u32 length per variable slot, then the
    variable slots' bytes in slot order. Lengths inside the struct keep decoding to one
    ``unpack_from`` plus a slice per variable slot.
    """

    def __init__(self, codes: str) -> None:
        unknown = set(codes) - FIXED_CODES - VAR_CODES
        if unknown:
            raise ValueError(f"unknown slot codes {sorted(unknown)}")
        self.codes = codes
        fixed = [i for i, c in enumerate(codes) if c in FIXED_CODES]
        self._var = tuple((i, c) for i, c in enumerate(codes) if c in VAR_CODES)
        self._struct = struct.Struct("<" + "".join(codes[i] for i in fixed) + "I" * len(self._var))
        self._fixed = _getter(fixed)
        self._n_fixed = len(fixed)
        self._size = self._struct.size
        self._decoders = tuple(bytes.decode if c == "S" else _sketch for _, c in self._var)
        # decode yields the fixed slots, then the variable ones: this puts them in slot order
        # (None when the variable slots come last already)
        arrival = fixed + [i for i, _ in self._var]
        self._in_slot_order = (
            None if arrival == sorted(arrival) else _getter([arrival.index(k) for k in range(len(codes))])
        )
        self.shared_rows: Generations[bytes, list[Any]] = Generations(SHARED_ROWS_KEPT)
        _CODECS.add(self)

    def encode(self, row: Sequence[Any]) -> bytes:
        var = [_var_bytes(code, row[i]) for i, code in self._var]
        try:
            packed = self._struct.pack(*self._fixed(row), *map(len, var))
        except struct.error as exc:  # e.g. an int64 sum beyond the int64 range
            raise CodecError(f"row does not fit layout {self.codes!r}: {exc}") from exc
        return packed + b"".join(var) if var else packed

    def decode(self, buf: bytes | memoryview, pos: int = 0) -> tuple[list[Any], int]:
        """The row starting at ``pos`` and the position after it."""
        try:
            values = self._struct.unpack_from(buf, pos)
        except struct.error as exc:
            raise CodecError(f"truncated row for layout {self.codes!r}") from exc
        pos += self._size
        if not self._var:
            return list(values), pos
        n = self._n_fixed
        row = list(values[:n])
        append = row.append
        raw = bytes(buf) if isinstance(buf, memoryview) else buf  # bytes.decode needs bytes
        try:
            for decode, size in zip(self._decoders, values[n:], strict=True):
                end = pos + size
                append(decode(raw[pos:end]))
                pos = end
        except ValueError as exc:  # a broken sketch or string: name the layout
            raise CodecError(f"bad value in a row of layout {self.codes!r}: {exc}") from None
        if pos > len(raw):
            raise CodecError("truncated value")
        order = self._in_slot_order
        return (row if order is None else list(order(row))), pos

    def decode_all(self, buf: bytes | memoryview) -> list[Any]:
        row, end = self.decode(buf)
        if end != len(buf):
            raise CodecError(f"{len(buf) - end} trailing bytes after a row")
        return row

    def decode_shared(self, raw: bytes) -> list[Any]:
        """``decode_all`` memoised by the bytes, for readers: most tiles of an entity do not change
        between two reads, and decoding (sketches above all) is the costly part of a read. The row
        is shared between callers: never mutate it."""
        row = self.shared_rows.get(raw)
        if row is None:
            row = self.decode_all(raw)
            self.shared_rows.put(raw, row)
        return row


HeadEvent = tuple[int, int, tuple[Any, ...]]
"""A raw event kept in the head: (event time ms, sequence, extracted values).

``values[0]`` is always True (the input of a field-less count); values[1:] are the view's input
fields in order, ``None`` where null.
"""


class HeadCodec:
    """Raw head events: ``q`` time, ``q`` sequence, varint null-mask, then the non-null values."""

    def __init__(self, codes: str) -> None:
        self.codes = codes
        self._fixed = {c: struct.Struct("<" + c) for c in FIXED_CODES}

    def encode(self, out: bytearray, events: Sequence[HeadEvent]) -> None:
        put_varint(out, len(events))
        for t, seq, values in events:
            out += _QQ.pack(t, seq)
            fields = values[1:]
            put_varint(out, sum(1 << i for i, v in enumerate(fields) if v is None))
            for code, v in zip(self.codes, fields, strict=True):
                if v is None:
                    continue
                if code in VAR_CODES:
                    _put_var(out, code, v)
                else:
                    out += self._fixed[code].pack(v)

    def decode(self, buf: bytes | memoryview, pos: int) -> tuple[list[HeadEvent], int]:
        count, pos = get_varint(buf, pos)
        events: list[HeadEvent] = []
        try:
            for _ in range(count):
                t, seq = _QQ.unpack_from(buf, pos)
                nulls, pos = get_varint(buf, pos + _QQ.size)
                values: list[Any] = [True]
                for i, code in enumerate(self.codes):
                    if nulls >> i & 1:
                        values.append(None)
                    elif code in VAR_CODES:
                        v, pos = _get_var(buf, pos, code)
                        values.append(v)
                    else:
                        fixed = self._fixed[code]
                        values.append(fixed.unpack_from(buf, pos)[0])
                        pos += fixed.size
                events.append((t, seq, tuple(values)))
        except struct.error as exc:
            raise CodecError("truncated head event") from exc
        return events, pos
