"""Small value types shared by the definition models: names, durations, value types."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Literal

from pydantic import BeforeValidator, PlainSerializer, StringConstraints

Name = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
"""Lower-case identifier: a letter, then letters, digits or underscores (at most 63 characters)."""

ValueType = Literal["string", "int64", "float64", "bool", "timestamp"]
NUMERIC_TYPES: frozenset[str] = frozenset({"int64", "float64"})
ORDERED_TYPES: frozenset[str] = frozenset({"int64", "float64", "timestamp", "string"})

JoinKeyType = Literal["string", "int64"]
Pii = Literal["none", "personal", "sensitive"]

_DURATION_RE = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> timedelta:
    """'90s', '30m', '1h', '7d', '2w' (or seconds as a number, or a timedelta) -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '30m', '1h' or '7d'")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    raise ValueError(f"expected a duration such as '30m', '1h' or '7d', got {value!r}")


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
