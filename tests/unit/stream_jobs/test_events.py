"""Decoding and validating raw events: JSON and Avro (bare and Confluent wire format)."""

from __future__ import annotations

import io
import json
import struct
from datetime import UTC, datetime
from pathlib import Path

import fastavro
import pytest

from featurestream.definitions.loader import load_project
from featurestream.definitions.models import Source
from featurestream.stream_jobs.events import EventDecoder, InvalidEvent, parse_timestamp_ms

DEMO = Path(__file__).resolve().parents[3] / "definitions"
NOW_MS = int(datetime(2026, 11, 27, 12, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture(scope="module")
def transactions() -> Source:
    source = load_project(DEMO).source("transactions")
    assert source is not None
    return source


@pytest.fixture
def decoder(transactions: Source) -> EventDecoder:
    return EventDecoder(transactions, clock_ms=lambda: NOW_MS)


def event(**overrides: object) -> bytes:
    body: dict[str, object] = {"user_id": "u1", "amount": 12.5, "merchant": "m1", "country": "DE", "ts": "2026-11-27T10:00:00Z"}
    body.update(overrides)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def test_valid_json_event_is_typed(decoder: EventDecoder) -> None:
    fields, event_time = decoder.decode(event(amount=3, extra="ignored"))
    expected_ms = int(datetime(2026, 11, 27, 10, tzinfo=UTC).timestamp() * 1000)
    assert event_time == expected_ms
    assert fields == {"user_id": "u1", "amount": 3.0, "merchant": "m1", "country": "DE", "ts": expected_ms}
    assert isinstance(fields["amount"], float)


def test_epoch_millis_and_iso_agree(decoder: EventDecoder) -> None:
    _, from_iso = decoder.decode(event(ts="2026-11-27T10:00:00.250+01:00"))
    _, from_millis = decoder.decode(event(ts=from_iso))
    assert from_iso == from_millis == int(datetime(2026, 11, 27, 9, 0, 0, 250000, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b"\xff\xfe", "not valid JSON"),
        (event(user_id=...), "missing required field 'user_id'"),
        (event(amount=None), "missing required field 'amount'"),
        (event(amount="12"), "field 'amount': expected a number, got str"),
        (event(amount=True), "field 'amount': expected a number, got bool"),
        (event(amount=-1), "field 'amount': -1.0 is below the minimum 0"),
        (event(country="DEU"), "field 'country': longer than 2 characters"),
        (event(user_id=7), "field 'user_id': expected a string, got int"),
        (event(ts="yesterday"), "field 'ts': 'yesterday' is not an ISO-8601 timestamp"),
        (event(ts=1700), "event time 1700 is before 2000-01-01"),
        (event(ts="2026-11-29T12:00:00Z"), "more than a day in the future"),
        (event(ts=[1]), "field 'ts': expected an ISO-8601 string or epoch milliseconds, got list"),
    ],
)
def test_invalid_json_events_name_the_reason(decoder: EventDecoder, raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decoder.decode(raw)
    assert reason in info.value.reason


def test_nan_is_refused(decoder: EventDecoder) -> None:
    with pytest.raises(InvalidEvent, match="not a finite number"):
        decoder.decode(b'{"user_id": "u", "amount": NaN, "merchant": "m", "country": "DE", "ts": 1764237600000}')


def test_oversized_and_empty_messages(decoder: EventDecoder) -> None:
    with pytest.raises(InvalidEvent, match="exceeds"):
        decoder.decode(b" " * (1024 * 1024 + 1))
    with pytest.raises(InvalidEvent, match="empty message"):
        decoder.decode(None)


def test_timestamp_formats() -> None:
    assert parse_timestamp_ms(1_764_237_600, "ts", "epoch_seconds") == 1_764_237_600_000
    assert parse_timestamp_ms("2026-11-27T10:00:00", "ts") == parse_timestamp_ms("2026-11-27T10:00:00Z", "ts")
    with pytest.raises(InvalidEvent, match="expected an ISO-8601 string"):
        parse_timestamp_ms(5, "ts", "iso8601")


AVRO_SCHEMA = {
    "type": "record",
    "name": "Txn",
    "fields": [
        {"name": "user_id", "type": "string"},
        {"name": "amount", "type": "double"},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ],
}


@pytest.fixture
def avro_decoder() -> EventDecoder:
    source = Source.model_validate(
        {
            "name": "txn",
            "topic": "txn",
            "format": "avro",
            "avro_schema": AVRO_SCHEMA,
            "event_time_field": "ts",
            "fields": [
                {"name": "user_id", "type": "string"},
                {"name": "amount", "type": "float64", "min": 0},
                {"name": "note", "type": "string", "required": False},
                {"name": "ts", "type": "timestamp"},
            ],
        }
    )
    return EventDecoder(source, clock_ms=lambda: NOW_MS)


def avro_bytes(record: dict[str, object]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(AVRO_SCHEMA), record)
    return buffer.getvalue()


def test_avro_bare_and_confluent_wire_format(avro_decoder: EventDecoder) -> None:
    moment = datetime(2026, 11, 27, 10, tzinfo=UTC)
    body = avro_bytes({"user_id": "u9", "amount": 4.5, "note": None, "ts": moment})
    expected = ({"user_id": "u9", "amount": 4.5, "note": None, "ts": int(moment.timestamp() * 1000)}, int(moment.timestamp() * 1000))
    assert avro_decoder.decode(body) == expected
    assert avro_decoder.decode(b"\x00" + struct.pack(">I", 42) + body) == expected


def test_avro_bare_record_starting_with_a_zero_byte(avro_decoder: EventDecoder) -> None:
    moment = datetime(2026, 11, 27, 10, tzinfo=UTC)
    body = avro_bytes({"user_id": "", "amount": 1.0, "note": "x", "ts": moment})
    assert body[0] == 0  # an empty string encodes as length 0
    fields, _ = avro_decoder.decode(body)
    assert fields["user_id"] == "" and fields["note"] == "x"


def test_avro_garbage_and_constraint_failures(avro_decoder: EventDecoder) -> None:
    with pytest.raises(InvalidEvent, match="not a valid Avro record"):
        avro_decoder.decode(b"\x07garbage-bytes")
    moment = datetime(2026, 11, 27, 10, tzinfo=UTC)
    with pytest.raises(InvalidEvent, match="below the minimum"):
        avro_decoder.decode(avro_bytes({"user_id": "u", "amount": -2.0, "note": None, "ts": moment}))
    with pytest.raises(InvalidEvent, match="bytes left over"):
        avro_decoder.decode(avro_bytes({"user_id": "u", "amount": 2.0, "note": None, "ts": moment}) + b"\x01\x02")
