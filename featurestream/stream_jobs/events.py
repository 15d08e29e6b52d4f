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

from featurestream.definitions.models import Source, SourceField
from featurestream.definitions.types import parse_timestamp

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_EVENT_BYTES = 1024 * 1024
MAX_FUTURE_MS = 24 * 3600 * 1000
MIN_EVENT_TIME_MS = 946_684_800_000  # 2000-01-01: older event times are taken as unit mistakes


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
        value = float(value)
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
    if spec.min is not None and value < spec.min:
        raise InvalidEvent(f"field '{name}': {value} is below the minimum {spec.min:g}", name)
    if spec.max is not None and value > spec.max:
        raise InvalidEvent(f"field '{name}': {value} is above the maximum {spec.max:g}", name)
    if spec.allowed is not None and value not in spec.allowed:
        raise InvalidEvent(f"field '{name}': {str(value)[:40]!r} is not one of the allowed values", name)
    return value


class EventDecoder:
    """Turns one source's raw message bytes into validated, typed events."""

    def __init__(self, source: Source, clock_ms: Callable[[], int] | None = None) -> None:
        self.source = source
        self._fields = source.fields
        self._time_field = source.event_time_field
        self._time_format = source.event_time_format
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._avro_schema = fastavro.parse_schema(source.avro_schema) if source.avro_schema is not None else None

    def decode(self, raw: bytes | None) -> tuple[dict[str, Any], int]:
        """(typed fields, event time in epoch ms) or ``InvalidEvent``."""
        if raw is None:
            raise InvalidEvent("empty message (no value)")
        if len(raw) > MAX_EVENT_BYTES:
            raise InvalidEvent(f"message of {len(raw)} bytes exceeds the {MAX_EVENT_BYTES}-byte limit")
        payload = self._parse_avro(raw) if self._avro_schema is not None else self._parse_json(raw)
        event: dict[str, Any] = {}
        for spec in self._fields:
            value = payload.get(spec.name)
            if value is None:
                if spec.required:
                    raise InvalidEvent(f"missing required field '{spec.name}'", spec.name)
                event[spec.name] = None
                continue
            event[spec.name] = _check_field(spec, value, self._time_format if spec.name == self._time_field else "auto")
        event_time = event[self._time_field]
        if event_time < MIN_EVENT_TIME_MS:
            raise InvalidEvent(f"field '{self._time_field}': event time {event_time} is before 2000-01-01", self._time_field)
        if event_time > self._clock_ms() + MAX_FUTURE_MS:
            raise InvalidEvent(f"field '{self._time_field}': event time is more than a day in the future", self._time_field)
        return event, event_time

    @staticmethod
    def _parse_json(raw: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
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
