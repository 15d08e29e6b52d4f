"""Python values <-> protobuf, and served rows -> the wire, kept cheap per value.

The hot path is ``encode_rows``: it writes a ``featurestream.v1.FeatureRows`` message straight
to protobuf wire bytes (the gRPC server hands them to the transport as they are). Building the
same message through the generated classes costs about 2 us per value (a 100 x 50 response:
~10 ms); writing the bytes costs about a fifth of that, because each value is one ``struct``
pack between two byte strings shared by every value with the same status and event time.
``rows_to_pb`` parses those bytes back when a message object is wanted (tests, other callers).

The other direction (``decode_rows``, from the same wire bytes) is what the Python client and
the CLI print: ``{"entity": {...}, "features": {name: {"value", "status", "event_time"}}}`` per
row, event times as ISO-8601 UTC strings ending in ``Z``, ``None`` when unknown.

This module imports nothing of the server (the client uses it).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp

from featurestream.generations import Generations
from featurestream.v1 import featurestream_pb2 as pb

if TYPE_CHECKING:
    from featurestream.serving.service import ServedRows, ServedValue

STATUS_CODES: dict[str, int] = {"PRESENT": pb.PRESENT, "MISSING": pb.MISSING, "STALE": pb.STALE, "INVALID": pb.INVALID}
STATUS_NAMES: dict[int, str] = {code: name for name, code in STATUS_CODES.items()}
STATUS_NAMES[pb.FEATURE_STATUS_UNSPECIFIED] = "UNSPECIFIED"

_MASK64 = (1 << 64) - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_pack_double = struct.Struct("<d").pack
_unpack_double = struct.Struct("<d").unpack_from


# ---------------------------------------------------------------- times


def timestamp(ms: int) -> Timestamp:
    """A protobuf Timestamp of epoch milliseconds."""
    seconds, rest = divmod(ms, 1000)
    return Timestamp(seconds=seconds, nanos=rest * 1_000_000)


def timestamp_ms(ts: Timestamp) -> int:
    ms: int = ts.seconds * 1000 + ts.nanos // 1_000_000
    return ms


def to_ms(when: datetime | int | float) -> int:
    """Epoch milliseconds of an aware datetime (or of a number already in milliseconds)."""
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise ValueError(f"naive datetime {when.isoformat()}: give a timezone (UTC)")
        return int(when.timestamp() * 1000)
    return int(when)


@lru_cache(maxsize=4096)
def _iso_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def iso_ms(ms: int) -> str:
    """``2026-11-27T10:00:00Z``, with ``.123`` before the Z when the milliseconds are not zero."""
    seconds, rest = divmod(ms, 1000)
    return f"{_iso_second(seconds)}.{rest:03d}Z" if rest else f"{_iso_second(seconds)}Z"


def iso_timestamp(ts: Timestamp) -> str:
    """An event time: ``...:00Z``, or ``.mmm`` before the Z (finer digits only when present)."""
    return _iso_event(ts.seconds, ts.nanos)


def iso_value(ts: Timestamp) -> str:
    """A timestamp value as ``datetime.isoformat`` writes it (microseconds when not zero) + ``Z``,
    as the REST API does."""
    return _iso_value(ts.seconds, ts.nanos)


def _iso_event(seconds: int, nanos: int) -> str:
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if nanos == 0:
        return f"{text}Z"
    if nanos % 1_000_000 == 0:
        return f"{text}.{nanos // 1_000_000:03d}Z"
    return _iso_value(seconds, nanos)


def _iso_value(seconds: int, nanos: int) -> str:
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    micros = nanos // 1000
    return f"{text}.{micros:06d}Z" if micros else f"{text}Z"


# ---------------------------------------------------------------- single values


def _micros(value: datetime) -> int:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return (aware - _EPOCH) // _MICROSECOND


def to_value(value: Any) -> pb.Value | None:
    """A ``pb.Value`` of a served Python value; ``None`` stays ``None`` (the field is left unset).
    Timestamp features are aware datetimes (naive ones are taken as UTC)."""
    if value is None:
        return None
    kind = type(value)
    if kind is bool:
        return pb.Value(bool_value=value)
    if kind is float:
        return pb.Value(double_value=value)
    if kind is int:
        return pb.Value(int64_value=value)
    if kind is str:
        return pb.Value(string_value=value)
    if isinstance(value, datetime):
        seconds, micros = divmod(_micros(value), 1_000_000)
        return pb.Value(timestamp_value=Timestamp(seconds=seconds, nanos=micros * 1000))
    if isinstance(value, bool):
        return pb.Value(bool_value=bool(value))
    if isinstance(value, int):
        return pb.Value(int64_value=int(value))
    if isinstance(value, float):
        return pb.Value(double_value=float(value))
    return pb.Value(string_value=str(value))


def from_value(value: pb.Value, iso: bool = True) -> Any:
    """The Python value of a ``pb.Value`` (``None`` when unset); timestamps as ISO strings,
    or as aware datetimes with ``iso=False``."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "timestamp_value":
        stamp = value.timestamp_value
        if iso:
            return iso_value(stamp)
        return datetime.fromtimestamp(stamp.seconds, UTC).replace(microsecond=stamp.nanos // 1000)
    return getattr(value, kind)


# ---------------------------------------------------------------- wire encoding of FeatureRows


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return bytes((n,))
    n &= _MASK64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field: tag, length, body."""
    return tag + _varint(len(body)) + body


def _timestamp_body(seconds: int, nanos: int) -> bytes:
    return (b"\x08" + _varint(seconds) if seconds else b"") + (b"\x10" + _varint(nanos) if nanos else b"")


def _ms_body(ms: int) -> bytes:
    seconds, rest = divmod(ms, 1000)
    return _timestamp_body(seconds, rest * 1_000_000)


def _value_field(value: Any) -> bytes:
    """FeatureValue field 1 (a Value) for anything but a float (the fast path handles those)."""
    kind = type(value)
    if kind is int:
        if 0 <= value < 0x80:
            return bytes((0x0A, 2, 0x08, value))
        return _field(b"\x0a", b"\x08" + _varint(value))
    if kind is bool:
        return b"\x0a\x02\x20\x01" if value else b"\x0a\x02\x20\x00"
    if kind is str:
        return _field(b"\x0a", _field(b"\x1a", value.encode()))
    if isinstance(value, datetime):
        seconds, micros = divmod(_micros(value), 1_000_000)
        return _field(b"\x0a", _field(b"\x2a", _timestamp_body(seconds, micros * 1000)))
    message = to_value(value)
    assert message is not None
    return _field(b"\x0a", message.SerializeToString())


def _tail(status: str, event_time_ms: int | None) -> bytes:
    """FeatureValue fields 2 (status) and 3 (event time): shared by many values of a response."""
    code = STATUS_CODES[status]
    if event_time_ms is None:
        return bytes((0x10, code))
    return bytes((0x10, code)) + _field(b"\x1a", _ms_body(event_time_ms))


_NAMES_CACHE: dict[tuple[str, ...], bytes] = {}


def _names_bytes(names: Sequence[str]) -> bytes:
    key = tuple(names)
    cached = _NAMES_CACHE.get(key)
    if cached is None:
        if len(_NAMES_CACHE) > 1024:
            _NAMES_CACHE.clear()
        cached = _NAMES_CACHE[key] = b"".join(_field(b"\x0a", name.encode()) for name in names)
    return cached


class _Shared:
    """What every value with one (status, event time) shares: the bytes around a double, and
    the finished FeatureValue bytes of each int and string seen with them (counts and
    categories repeat across a response)."""

    __slots__ = ("double_prefix", "ints", "missing", "strings", "tail")

    def __init__(self, status: str, event_time_ms: int | None) -> None:
        self.tail = _tail(status, event_time_ms)
        # FeatureValue tag + length, Value tag + length (9), double tag: the packed float follows.
        self.double_prefix = b"\x1a" + _varint(11 + len(self.tail)) + b"\x0a\x09\x11"
        self.missing = _field(b"\x1a", self.tail)
        self.ints: dict[int, bytes] = {}
        self.strings: dict[str, bytes] = {}

    def other(self, value: Any) -> bytes:
        body = _value_field(value) + self.tail
        return b"\x1a" + _varint(len(body)) + body


def _entity_bytes(entity: dict[str, str]) -> bytes:
    return _field(b"\x0a", b"".join(_field(b"\x0a", _field(b"\x0a", k.encode()) + _field(b"\x12", v.encode()))
                                   for k, v in entity.items()))


_VALUES_BYTES: Generations[int, tuple[Sequence[ServedValue], bytes]] = Generations(10_000)


def encode_rows(rows: ServedRows) -> bytes:
    """``rows`` as the wire bytes of a ``pb.FeatureRows`` (what the gRPC server sends).

    The bytes of a row's values are kept with the values list they came from: the service hands
    out the same list while nothing in it can have changed (``_Decoded.served_values``)."""
    shared: dict[tuple[str, int | None], _Shared] = {}
    row_times: dict[int, bytes] = {}
    out = [_names_bytes(rows.feature_names)]
    memo = _VALUES_BYTES
    for row in rows.rows:
        at = row_times.get(row.at_ms)
        if at is None:
            at = row_times[row.at_ms] = _field(b"\x12", _ms_body(row.at_ms))
        values = row.values
        held = memo.get(id(values))
        if held is not None and held[0] is values:
            encoded = held[1]
        else:
            encoded = _values_bytes(values, shared)
            memo.put(id(values), (values, encoded))  # holding the list keeps its id from being reused
        body = _entity_bytes(row.entity) + at + encoded
        out.append(b"\x12" + _varint(len(body)) + body)
    return b"".join(out)


def _values_bytes(values: Sequence[ServedValue], shared: dict[tuple[str, int | None], _Shared]) -> bytes:
    parts: list[bytes] = []
    append = parts.append
    pack = _pack_double
    last_status: str | None = None
    last_time: int | None = None
    common: _Shared | None = None
    for served in values:
        status, event_time = served.status, served.event_time_ms
        if common is None or status is not last_status or event_time != last_time:
            key = (status, event_time)
            common = shared.get(key)
            if common is None:
                common = shared[key] = _Shared(status, event_time)
            last_status, last_time = status, event_time
        value = served.value
        kind = type(value)
        if kind is float:
            append(common.double_prefix + pack(value) + common.tail)
        elif kind is int:
            encoded = common.ints.get(value)
            if encoded is None:
                encoded = common.ints[value] = common.other(value)
            append(encoded)
        elif value is None:
            append(common.missing)
        elif kind is str:
            encoded = common.strings.get(value)
            if encoded is None:
                encoded = common.strings[value] = common.other(value)
            append(encoded)
        else:
            append(common.other(value))
    return b"".join(parts)


def rows_to_pb(rows: ServedRows) -> pb.FeatureRows:
    message: pb.FeatureRows = pb.FeatureRows.FromString(encode_rows(rows))
    return message


def identity(data: bytes) -> bytes:
    """The response serializer of methods whose handlers return wire bytes already."""
    return data


# ---------------------------------------------------------------- FeatureRows -> JSON-able dicts


def decode_rows(data: bytes, with_timestamp: bool = False) -> tuple[list[str], list[dict[str, Any]]]:
    """The wire bytes of a ``pb.FeatureRows``: its feature names, and one ``{"entity",
    "features"}`` dict per row (``"timestamp"`` too with ``with_timestamp``).

    Read straight off the bytes: a value's bytes (value, status, event time) decode to the same
    cell wherever they come, so each distinct one is decoded once and then found in a memo, and
    a row's values seen before as the same bytes are found whole (a 100 x 50 response seen
    before takes about a twelfth of decoding through the generated classes). Each cell is a new
    dict, a copy of the memo's (callers may change what they get): a row of known values is
    built by ``dict.copy`` and ``zip`` in C, not a Python loop per value."""
    names: list[str] = []
    out: list[dict[str, Any]] = []
    cells = _CELLS
    times: dict[bytes, str] = {}
    pos, end = 0, len(data)
    while pos < end:
        tag = data[pos]
        if tag & 0x87 != 0x02:  # not a length-delimited field of a one-byte tag: none of ours
            pos = _skip_field(data, pos)
            continue
        length, pos = _read_varint(data, pos + 1)
        stop = pos + length
        if tag == 0x0A:
            names.append(data[pos:stop].decode())
        elif tag == 0x12:
            out.append(_decode_row(data, pos, stop, names, cells, times, with_timestamp))
        pos = stop
    return names, out


Cell = dict[str, Any]
"""``{"value", "status", "event_time"}``; the memos hold templates, callers get copies."""
_CELLS: Generations[bytes, Cell] = Generations(65_536)
"""Decoded cells by their bytes, shared by every response this process decodes."""
_ROW_CELLS: Generations[bytes, tuple[Cell, ...]] = Generations(4_096)
"""A row's cells by the bytes of all its values: an entity whose values did not change since
(the server then sends the very same bytes) costs one lookup, not one per value."""


def _decode_row(data: bytes, pos: int, end: int, names: list[str], cells: Generations[bytes, Cell],
                times: dict[bytes, str], with_timestamp: bool) -> dict[str, Any]:
    entity: dict[str, str] = {}
    features: dict[str, Cell] = {}
    stamp: str | None = None
    index = 0
    while pos < end:
        tag = data[pos]
        if tag == 0x1A and index == 0:  # the values, the row's last field as servers write it
            span = data[pos:end]
            row_cells = _ROW_CELLS.get(span)
            if row_cells is None:
                row_cells = _decode_values(data, pos, end, cells, times)
                if row_cells is not None:
                    _ROW_CELLS.put(span, row_cells)
            if row_cells is not None:
                if len(row_cells) > len(names):
                    raise ValueError(f"FeatureRows: a row has {len(row_cells)} values for {len(names)} feature names")
                features = dict(zip(names, map(_copy_cell, row_cells), strict=False))
                break
        if tag & 0x87 != 0x02:
            pos = _skip_field(data, pos)
            continue
        length, pos = _read_varint(data, pos + 1)
        stop = pos + length
        if tag == 0x1A:  # a FeatureValue
            features[names[index]] = _cell(data, pos, stop, cells, times).copy()
            index += 1
        elif tag == 0x0A:  # the EntityKey: map entries {1: key, 2: value}
            while pos < stop:
                entry_length, pos = _read_varint(data, pos + 1)
                entry_stop = pos + entry_length
                key = value = ""
                while pos < entry_stop:
                    field = data[pos]
                    size, pos = _read_varint(data, pos + 1)
                    text = data[pos : pos + size].decode()
                    pos += size
                    if field == 0x0A:
                        key = text
                    else:
                        value = text
                entity[key] = value
        elif tag == 0x12 and with_timestamp:
            stamp = _iso_event(*_read_timestamp(data, pos, stop))
        pos = stop
    row: dict[str, Any] = {"entity": entity}
    if with_timestamp:
        row["timestamp"] = stamp
    row["features"] = features
    return row


def _decode_values(data: bytes, pos: int, end: int, cells: Generations[bytes, Cell],
                   times: dict[bytes, str]) -> tuple[Cell, ...] | None:
    """The cells of a run of FeatureValue fields up to ``end``; None if another field is among them."""
    out: list[Cell] = []
    append = out.append
    known = cells.get
    while pos < end:
        if data[pos] != 0x1A:
            return None
        length = data[pos + 1]
        if length < 0x80:  # a one-byte length: nearly every value (inlined for speed)
            pos += 2
        else:
            length, pos = _read_varint(data, pos + 1)
        stop = pos + length
        chunk = data[pos:stop]
        cell = known(chunk)  # _cell, inlined: this loop runs once per value of a response
        if cell is None:
            cell = _decode_cell(data, pos, stop, times)
            cells.put(chunk, cell)
        append(cell)
        pos = stop
    return tuple(out)


def _cell(data: bytes, pos: int, end: int, cells: Generations[bytes, Cell], times: dict[bytes, str]) -> Cell:
    """The FeatureValue in ``data[pos:end]``, from the memo of cells or decoded into it."""
    chunk = data[pos:end]
    cell = cells.get(chunk)
    if cell is None:
        cell = _decode_cell(data, pos, end, times)
        cells.put(chunk, cell)
    return cell


def _decode_cell(data: bytes, pos: int, end: int, times: dict[bytes, str]) -> Cell:
    value: Any = None
    status = 0
    event_time: str | None = None
    while pos < end:
        tag = data[pos]
        if tag == 0x10:
            status, pos = _read_varint(data, pos + 1)
            continue
        if tag & 0x87 != 0x02:
            pos = _skip_field(data, pos)
            continue
        length, pos = _read_varint(data, pos + 1)
        stop = pos + length
        if tag == 0x0A:
            value = _decode_value(data, pos, stop)
        elif tag == 0x1A:
            raw = data[pos:stop]
            event_time = times.get(raw)
            if event_time is None:
                event_time = times[raw] = _iso_event(*_read_timestamp(data, pos, stop))
        pos = stop
    return {"value": value, "status": STATUS_NAMES.get(status, "UNSPECIFIED"), "event_time": event_time}


_copy_cell = dict.copy


def _decode_value(data: bytes, pos: int, end: int) -> Any:
    """A ``Value`` message: its one set field, or None."""
    value: Any = None
    while pos < end:
        tag = data[pos]
        if tag == 0x11:
            value = _unpack_double(data, pos + 1)[0]
            pos += 9
        elif tag == 0x08:
            raw, pos = _read_varint(data, pos + 1)
            value = raw - (1 << 64) if raw >> 63 else raw
        elif tag == 0x20:
            raw, pos = _read_varint(data, pos + 1)
            value = bool(raw)
        elif tag == 0x1A or tag == 0x2A:
            length, pos = _read_varint(data, pos + 1)
            if tag == 0x1A:
                value = data[pos : pos + length].decode()
            else:
                value = _iso_value(*_read_timestamp(data, pos, pos + length))
            pos += length
        else:
            pos = _skip_field(data, pos)
    return value


def _read_timestamp(data: bytes, pos: int, end: int) -> tuple[int, int]:
    seconds = nanos = 0
    while pos < end:
        tag = data[pos]
        raw, pos = _read_varint(data, pos + 1)
        if tag == 0x08:
            seconds = raw - (1 << 64) if raw >> 63 else raw
        elif tag == 0x10:
            nanos = raw
    return seconds, nanos


def _skip_field(data: bytes, pos: int) -> int:
    """Past the field whose tag starts at ``pos`` (a field this client does not know)."""
    tag, pos = _read_varint(data, pos)
    wire_type = tag & 7
    if wire_type == 0:
        return _read_varint(data, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 2:
        length, pos = _read_varint(data, pos)
        return pos + length
    if wire_type == 5:
        return pos + 4
    raise ValueError(f"FeatureRows: unsupported protobuf wire type {wire_type} at byte {pos}")


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    result, shift = byte & 0x7F, 7
    while True:
        pos += 1
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos + 1
        shift += 7


def entity_keys(entities: Sequence[pb.EntityKey]) -> list[dict[str, str]]:
    # iterating the map directly: dict(map) goes through the slower abstract Mapping views
    return [{k: keys[k] for k in keys} for keys in (e.join_keys for e in entities)]


def feature_info(info: dict[str, Any]) -> pb.FeatureInfo:
    """A ``pb.FeatureInfo`` of a catalog dict (unknown keys ignored, ``None`` as the default)."""
    fields = pb.FeatureInfo.DESCRIPTOR.fields_by_name
    return pb.FeatureInfo(**{k: v for k, v in info.items() if k in fields and v is not None})
