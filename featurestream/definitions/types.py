"""Small value types shared by the definition models: names, durations, value types."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import BeforeValidator, PlainSerializer, StringConstraints

Name = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
"""Lower-case identifier: a letter, then letters, digits or underscores (at most 63 characters)."""

ValueType = Literal["string", "int64", "float64", "bool", "timestamp"]

JoinKeyType = Literal["string", "int64"]
Pii = Literal["none", "personal", "sensitive"]

_DURATION_RE = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


MAX_DURATION = timedelta(days=3650)


def parse_duration(value: object) -> timedelta:
    """'90s', '30m', '1h', '7d', '2w' (or a timedelta) -> timedelta.

    Bare numbers are refused: YAML reads ``1:00:00`` as the integer 3600, and a unit-less
    number is ambiguous anyway.
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            if seconds > MAX_DURATION.total_seconds():
                raise ValueError(f"{value!r} is longer than the longest duration accepted (3650d)")
            return timedelta(seconds=seconds)
    raise ValueError(f"expected a duration with a unit such as '30m', '1h' or '7d', got {value!r}")


def format_duration(value: timedelta) -> str:
    """The shortest exact spelling: timedelta(hours=24) -> '1d', timedelta(minutes=90) -> '90m'."""
    millis = round(value.total_seconds() * 1000)
    for unit in ("w", "d", "h", "m", "s"):
        unit_ms = round(_UNIT_SECONDS[unit] * 1000)
        if millis and millis % unit_ms == 0:
            return f"{millis // unit_ms}{unit}"
    return f"{millis}ms"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json-unless-none"),
]


def parse_timestamp(value: object, time_format: str = "auto") -> int:
    """ISO-8601 text (UTC when it names no zone) or epoch milliseconds (or seconds) -> epoch ms.

    ``time_format`` is a source's ``event_time_format``: auto, iso8601, epoch_millis, epoch_seconds.
    """
    if isinstance(value, bool):
        raise ValueError("expected a timestamp, got a bool")
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return round(moment.timestamp() * 1000)
    if isinstance(value, int | float) and time_format in ("auto", "epoch_millis", "epoch_seconds"):
        if not math.isfinite(value):
            raise ValueError("timestamp is not a finite number")
        return round(value * 1000) if time_format == "epoch_seconds" else round(value)
    if isinstance(value, str) and time_format in ("auto", "iso8601"):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{value[:40]!r} is not an ISO-8601 timestamp") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return round(moment.timestamp() * 1000)
    expected = {"iso8601": "an ISO-8601 string", "epoch_millis": "epoch milliseconds", "epoch_seconds": "epoch seconds"}
    raise ValueError(
        f"expected {expected.get(time_format, 'an ISO-8601 string or epoch milliseconds')}, got {type(value).__name__}"
    )
