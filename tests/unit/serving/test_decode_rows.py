"""decode_rows (wire bytes -> dicts, with memos) against a decoding through the generated classes."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from featurestream.serving.convert import decode_rows, encode_rows, iso_timestamp, iso_value
from featurestream.serving.service import ServedRow, ServedRows, ServedValue
from featurestream.v1 import featurestream_pb2 as pb

T0 = int(datetime(2026, 11, 27, 10, tzinfo=UTC).timestamp() * 1000)
STATUS = {pb.PRESENT: "PRESENT", pb.MISSING: "MISSING", pb.STALE: "STALE", pb.INVALID: "INVALID"}


def reference(data: bytes, with_timestamp: bool) -> tuple[list[str], list[dict[str, Any]]]:
    """What the client decoded through the generated classes before decode_rows."""
    message = pb.FeatureRows.FromString(data)
    names = list(message.feature_names)
    out = []
    for row in message.rows:
        features = {}
        for name, fv in zip(names, row.values, strict=False):
            kind = fv.value.WhichOneof("kind")
            value: Any = None
            if kind == "timestamp_value":
                value = iso_value(fv.value.timestamp_value)
            elif kind is not None:
                value = getattr(fv.value, kind)
            event_time = iso_timestamp(fv.event_time) if fv.HasField("event_time") else None
            features[name] = {"value": value, "status": STATUS[fv.status], "event_time": event_time}
        result: dict[str, Any] = {"entity": dict(row.entity.join_keys)}
        if with_timestamp:
            result["timestamp"] = iso_timestamp(row.timestamp) if row.HasField("timestamp") else None
        result["features"] = features
        out.append(result)
    return names, out


def random_value(rng: random.Random) -> ServedValue:
    status = rng.choice(["PRESENT", "PRESENT", "STALE", "INVALID", "MISSING"])
    event_time = rng.choice([None, T0, T0 - rng.randint(0, 10**9), -rng.randint(1, 10**6), T0 + rng.randint(0, 999)])
    if status == "MISSING":
        return ServedValue(None, status, event_time)
    value = rng.choice([
        rng.uniform(-1e6, 1e6), float(rng.randint(-5, 5)), -0.0, math.inf, rng.randint(-(2**63), 2**63 - 1),
        rng.randint(0, 200), rng.random() < 0.5, "".join(rng.choice("aZé✓ 0") for _ in range(rng.randint(0, 200))),
        datetime(2026, 11, 27, tzinfo=UTC) + timedelta(microseconds=rng.randint(-10**12, 10**12)),
    ])
    return ServedValue(value, status, event_time)


@pytest.mark.parametrize("seed", range(5))
def test_decode_rows_equals_the_generated_classes(seed: int) -> None:
    rng = random.Random(seed)
    names = [f"v:f{i}" for i in range(rng.randint(1, 60))]
    shared = [random_value(rng) for _ in names]  # some rows repeat another's values: the row memo's case
    rows = [
        ServedRow({"user_id": f"u{rng.randint(0, 30)}", **({"shop": "s1"} if rng.random() < 0.3 else {})},
                  T0 + rng.randint(-5000, 5000), shared if rng.random() < 0.3 else [random_value(rng) for _ in names])
        for _ in range(rng.randint(1, 40))
    ]
    data = encode_rows(ServedRows(names, [], rows))
    for with_timestamp in (False, True):
        expected = reference(data, with_timestamp)
        assert decode_rows(data, with_timestamp) == expected
        assert decode_rows(data, with_timestamp) == expected  # again, from the memos


def test_the_same_value_bytes_under_other_names_decode_under_those_names() -> None:
    values = [ServedValue(1.5, "PRESENT", T0), ServedValue(None, "MISSING", None)]
    first = decode_rows(encode_rows(ServedRows(["a:x", "a:y"], [], [ServedRow({"k": "1"}, T0, values)])))[1]
    second = decode_rows(encode_rows(ServedRows(["b:p", "b:q"], [], [ServedRow({"k": "2"}, T0, values)])))[1]
    assert list(first[0]["features"]) == ["a:x", "a:y"] and list(second[0]["features"]) == ["b:p", "b:q"]
    assert second[0]["features"]["b:p"] == {"value": 1.5, "status": "PRESENT", "event_time": "2026-11-27T10:00:00Z"}
    assert second[0]["entity"] == {"k": "2"}
    second[0]["features"]["b:p"]["value"] = 0.0  # a caller's change stays its own
    assert decode_rows(encode_rows(ServedRows(["b:p", "b:q"], [], [ServedRow({"k": "2"}, T0, values)])))[1] == [
        {"entity": {"k": "2"}, "features": {"b:p": {"value": 1.5, "status": "PRESENT", "event_time": "2026-11-27T10:00:00Z"},
                                            "b:q": {"value": None, "status": "MISSING", "event_time": None}}}]
