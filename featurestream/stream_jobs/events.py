"""Decode and validate the raw bytes of one source's events.

A valid event becomes a dict of typed values (timestamps as epoch milliseconds, UTC) with its
event time; anything else raises ``InvalidEvent`` with a reason that names the field, so the
worker can send it to the dead-letter topic. Nothing here trusts the producer.
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import fastavro
import orjson

from featurestream.definitions.models import Source, SourceField
from featurestream.definitions.types import parse_timestamp

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_EVENT_BYTES = 1024 * 1024
MAX_FUTURE_MS = 24 * 3600 * 1000
_INT_AS_FLOAT = 2**1000  # integers beyond this may not convert to a double
MIN_EVENT_TIME_MS = 946_684_800_000
TIMESTAMP_MIN_MS, TIMESTAMP_MAX_MS = -62_135_596_800_000, 253_402_300_799_999
"""Timestamps a datetime (and the archive) can hold: years 1 to 9999."""  # 2000-01-01: older event times are taken as unit mistakes


class InvalidEvent(Exception):
    """An event that failed decoding or validation; ``reason`` says what and where."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


def parse_timestamp_ms(value: Any, field: str, time_format: str = "auto") -> int:
    try:
        return parse_timestamp(value, time_format)
    except ValueError as exc:
        raise InvalidEvent(f"field '{field}': {exc}", field) from None


def _check_field(spec: SourceField, value: Any, time_format: str) -> Any:
    name = spec.name
    kind = spec.type
    if kind == "string":
        if not isinstance(value, str):
            raise InvalidEvent(f"field '{name}': expected a string, got {type(value).__name__}", name)
        if spec.max_length is not None and len(value) > spec.max_length:
            raise InvalidEvent(f"field '{name}': longer than {spec.max_length} characters", name)
    elif kind == "float64":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidEvent(f"field '{name}': expected a number, got {type(value).__name__}", name)
        try:
            value = float(value)
        except OverflowError:  # an integer too large for a double
            raise InvalidEvent(f"field '{name}': {str(value)[:40]}... is not a finite number", name) from None
        if not math.isfinite(value):
            raise InvalidEvent(f"field '{name}': {value} is not a finite number", name)
    elif kind == "int64":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidEvent(f"field '{name}': expected an integer, got {type(value).__name__}", name)
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidEvent(f"field '{name}': {value} does not fit in int64", name)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise InvalidEvent(f"field '{name}': expected true or false, got {type(value).__name__}", name)
    else:  # timestamp
        value = parse_timestamp_ms(value, name, time_format)
        if not TIMESTAMP_MIN_MS <= value <= TIMESTAMP_MAX_MS:
            raise InvalidEvent(f"field '{name}': timestamp {str(value)[:40]} is outside the years 1 to 9999", name)
    if spec.min is not None and value < spec.min:
        raise InvalidEvent(f"field '{name}': {value} is below the minimum {spec.min:g}", name)
    if spec.max is not None and value > spec.max:
        raise InvalidEvent(f"field '{name}': {value} is above the maximum {spec.max:g}", name)
    if spec.allowed is not None and value not in spec.allowed:
        raise InvalidEvent(f"field '{name}': {str(value)[:40]!r} is not one of the allowed values", name)
    return value


def _fast_check(spec: SourceField, time_format: str) -> Callable[[Any], Any]:
    """A checker of one field specialised to its type and constraints, for the common valid case.

    It returns the typed value when the value is plainly valid and otherwise defers to
    ``_check_field``, which is the authority on what is valid and words every refusal; so the
    fast path can only be faster, never different. Exact ``type(...) is`` tests keep bools
    (an ``int`` subclass) and other subclasses on the slow path.
    """
    kind = spec.type
    low, high = spec.min, spec.max
    try:
        allowed = frozenset(spec.allowed) if spec.allowed is not None else None
    except TypeError:  # unhashable allowed values (lists): the slow path compares them
        return lambda value: _check_field(spec, value, time_format)

    def slow(value: Any) -> Any:
        return _check_field(spec, value, time_format)

    if allowed is not None:
        return slow
    if kind == "string":
        longest = spec.max_length

        def check_string(value: Any) -> Any:
            if type(value) is str and (longest is None or len(value) <= longest):
                return value
            return slow(value)

        return check_string
    if kind == "float64":
        lo = -math.inf if low is None else low
        hi = math.inf if high is None else high

        def check_float(value: Any) -> Any:
            t = type(value)
            if t is float or (t is int and -_INT_AS_FLOAT <= value <= _INT_AS_FLOAT):
                number = float(value)
                if lo <= number <= hi and number - number == 0.0:  # finite: inf - inf and nan are nan
                    return number
            return slow(value)

        return check_float
    if kind == "int64":
        ilo = INT64_MIN if low is None else max(INT64_MIN, math.ceil(low))
        ihi = INT64_MAX if high is None else min(INT64_MAX, math.floor(high))

        def check_int(value: Any) -> Any:
            if type(value) is int and ilo <= value <= ihi:
                return value
            return slow(value)

        return check_int
    if kind == "bool":
        return lambda value: value if type(value) is bool else slow(value)

    # timestamp as epoch milliseconds (an int) or ISO-8601 text; timestamps take no min/max.
    # The text branch is ``parse_timestamp``'s for strings, without its type dispatch.
    fromisoformat = datetime.fromisoformat
    ints = time_format in ("auto", "epoch_millis")
    texts = time_format in ("auto", "iso8601")

    def check_timestamp(value: Any) -> Any:
        t = type(value)
        if t is int and ints and TIMESTAMP_MIN_MS <= value <= TIMESTAMP_MAX_MS:
            return value
        if t is str and texts:
            text = value.strip()
            if text.endswith(("Z", "z")):
                text = text[:-1] + "+00:00"
            try:
                moment = fromisoformat(text)
            except ValueError:
                return slow(value)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            ms = round(moment.timestamp() * 1000)
            if TIMESTAMP_MIN_MS <= ms <= TIMESTAMP_MAX_MS:
                return ms
        return slow(value)

    return check_timestamp


class EventDecoder:
    """Turns one source's raw message bytes into validated, typed events."""

    def __init__(self, source: Source, clock_ms: Callable[[], int] | None = None) -> None:
        self.source = source
        self._fields = source.fields
        self._time_field = source.event_time_field
        self._time_format = source.event_time_format
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._avro_schema = fastavro.parse_schema(source.avro_schema) if source.avro_schema is not None else None
        self._plan = tuple(
            (
                spec.name,
                spec.required,
                _fast_check(spec, self._time_format if spec.name == self._time_field else "auto"),
            )
            for spec in source.fields
        )

    def decode(self, raw: bytes | None, now_ms: int | None = None) -> tuple[dict[str, Any], int]:
        """(typed fields, event time in epoch ms) or ``InvalidEvent``.

        ``now_ms`` (default: the decoder's clock) bounds event times in the future; a caller
        decoding a batch passes one reading for all of it.
        """
        if raw is None:
            raise InvalidEvent("empty message (no value)")
        if len(raw) > MAX_EVENT_BYTES:
            raise InvalidEvent(f"message of {len(raw)} bytes exceeds the {MAX_EVENT_BYTES}-byte limit")
        now = self._clock_ms() if now_ms is None else now_ms
        if self._avro_schema is not None:
            return self._validate(self._parse_avro(raw), now)
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            payload = None
        if type(payload) is dict:
            try:
                return self._validate(payload, now)
            except InvalidEvent:
                pass
        # Refused or unusual: the standard parser's reading decides and words the reason. (orjson
        # reads integers beyond 64 bits as floats and refuses NaN; validity is the same, but the
        # wording would differ.)
        return self._validate(self._parse_json(raw), now)

    def _validate(self, payload: dict[str, Any], now_ms: int) -> tuple[dict[str, Any], int]:
        event: dict[str, Any] = {}
        get = payload.get
        for name, required, check in self._plan:
            value = get(name)
            if value is None:
                if required:
                    raise InvalidEvent(f"missing required field '{name}'", name)
                event[name] = None
            else:
                event[name] = check(value)
        event_time = event[self._time_field]
        if event_time < MIN_EVENT_TIME_MS:
            raise InvalidEvent(f"field '{self._time_field}': event time {event_time} is before 2000-01-01", self._time_field)
        if event_time > now_ms + MAX_FUTURE_MS:
            raise InvalidEvent(f"field '{self._time_field}': event time is more than a day in the future", self._time_field)
        return event, event_time

    @staticmethod
    def _parse_json(raw: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidEvent(f"not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise InvalidEvent(f"expected a JSON object, got {type(payload).__name__}")
        return payload

    def _parse_avro(self, raw: bytes) -> dict[str, Any]:
        schema = self._avro_schema
        if schema is None:
            raise InvalidEvent("source has no Avro schema")
        # The Confluent wire format prefixes a zero byte and a 4-byte schema id; a bare record may
        # also start with a zero byte, so accept whichever reading consumes the message exactly.
        candidates = [raw[5:], raw] if len(raw) > 5 and raw[0] == 0 else [raw]
        last_error = "empty message"
        for body in candidates:
            buffer = io.BytesIO(body)
            try:
                record = fastavro.schemaless_reader(buffer, schema, None)
            except (EOFError, ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            if buffer.tell() == len(body) and isinstance(record, dict):
                return record
            last_error = f"{len(body) - buffer.tell()} bytes left over after the record"
        raise InvalidEvent(f"not a valid Avro record of the declared schema ({last_error})")


def utc_from_ms(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
