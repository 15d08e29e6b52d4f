"""The definitions language: frozen pydantic models of everything a project declares.

Each model checks what it can see on its own; checks across objects (references, types of
source fields, duplicates) live in ``definitions/validate.py``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from featurestream.definitions.types import Duration, JoinKeyType, Name, Pii, ValueType, format_duration

MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
MAX_WINDOW = timedelta(days=90)
MAX_TILES_PER_WINDOW = 1440


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class _Documented(_Model):
    description: str = ""
    owner: str = ""
    tags: tuple[str, ...] = ()


# ---------------------------------------------------------------- windows


def sliding_tile_size(duration: timedelta) -> timedelta:
    """Tile size used for a sliding window; it bounds the error at the window's far edge."""
    if duration <= HOUR:
        return MINUTE
    if duration <= DAY:
        return timedelta(minutes=5)
    return HOUR


class SlidingWindow(_Model):
    """Events with event time in (T - duration, T] for a read at time T; decays with no events."""

    type: Literal["sliding"] = "sliding"
    duration: Duration

    @field_validator("duration")
    @classmethod
    def _computable(cls, duration: timedelta) -> timedelta:
        if duration < MINUTE:
            raise ValueError("a sliding window must be at least 1m")
        if duration > MAX_WINDOW:
            raise ValueError("the longest supported window is 90d")
        tile = sliding_tile_size(duration)
        if duration % tile:
            raise ValueError(
                f"a sliding window of this length is computed from {tile.total_seconds() / 60:g}-minute "
                "tiles and must be a whole number of them"
            )
        return duration

    @property
    def tile(self) -> timedelta:
        return sliding_tile_size(self.duration)

    @property
    def span(self) -> timedelta:
        return self.duration


class TumblingWindow(_Model):
    """Fixed windows [k*size, (k+1)*size); a read at T sees the last window closed at or before T."""

    type: Literal["tumbling"] = "tumbling"
    size: Duration

    @field_validator("size")
    @classmethod
    def _computable(cls, size: timedelta) -> timedelta:
        if size < MINUTE or size % MINUTE:
            raise ValueError("a tumbling window must be a whole number of minutes, at least 1m")
        if size > MAX_WINDOW:
            raise ValueError("the longest supported window is 90d")
        return size

    @property
    def tile(self) -> timedelta:
        return self.size

    @property
    def hop(self) -> timedelta:
        return self.size

    @property
    def span(self) -> timedelta:
        return self.size


class HoppingWindow(_Model):
    """Windows of ``size`` starting every ``hop``; a read at T sees the last one closed at or before T."""

    type: Literal["hopping"] = "hopping"
    size: Duration
    hop: Duration

    @model_validator(mode="after")
    def _computable(self) -> HoppingWindow:
        if self.hop < MINUTE or self.hop % MINUTE:
            raise ValueError("hop must be a whole number of minutes, at least 1m")
        if self.size > MAX_WINDOW:
            raise ValueError("the longest supported window is 90d")
        if self.size < self.hop or self.size % self.hop:
            raise ValueError("size must be a whole multiple of hop")
        if self.size // self.hop > MAX_TILES_PER_WINDOW:
            raise ValueError(f"size / hop must be at most {MAX_TILES_PER_WINDOW}")
        return self

    @property
    def tile(self) -> timedelta:
        return self.hop

    @property
    def span(self) -> timedelta:
        return self.size


Window = Annotated[SlidingWindow | TumblingWindow | HoppingWindow, Field(discriminator="type")]


def _window_shorthand(value: Any) -> Any:
    """``window: 1h`` means a sliding window of one hour."""
    if isinstance(value, str | int | float | timedelta) and not isinstance(value, bool):
        return {"type": "sliding", "duration": value}
    if isinstance(value, dict) and "type" not in value and "duration" in value:
        return {"type": "sliding", **value}
    return value


# ---------------------------------------------------------------- entities and sources


class JoinKey(_Model):
    name: Name
    type: JoinKeyType = "string"


class Entity(_Documented):
    name: Name
    join_keys: tuple[JoinKey, ...] = Field(min_length=1)

    @field_validator("join_keys", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        """``join_keys: [user_id]`` is short for a string key."""
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value


class SourceField(_Model):
    name: Name
    type: ValueType
    required: bool = True
    min: float | None = None
    max: float | None = None
    allowed: tuple[JsonValue, ...] | None = None
    max_length: int | None = Field(default=None, gt=0)
    description: str = ""
    pii: Pii = "none"

    @model_validator(mode="after")
    def _constraints_fit_type(self) -> SourceField:
        if (self.min is not None or self.max is not None) and self.type not in ("int64", "float64"):
            raise ValueError(f"min/max apply to int64 or float64 fields, not {self.type}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        if self.max_length is not None and self.type != "string":
            raise ValueError("max_length applies to string fields")
        return self


EventTimeFormat = Literal["auto", "iso8601", "epoch_millis", "epoch_seconds"]


class Source(_Documented):
    """A Kafka topic of events with a declared schema."""

    name: Name
    topic: str = Field(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$")
    format: Literal["json", "avro"] = "json"
    partitions: int = Field(default=4, ge=1, le=1024)
    event_time_field: Name
    event_time_format: EventTimeFormat = "auto"
    fields: tuple[SourceField, ...] = ()
    avro_schema: dict[str, JsonValue] | None = None
    avro_schema_file: str | None = None
    dead_letter_topic: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")

    @model_validator(mode="after")
    def _format_has_schema(self) -> Source:
        if self.avro_schema is not None and self.avro_schema_file:
            raise ValueError("give avro_schema or avro_schema_file, not both")
        if self.format == "avro" and self.avro_schema is None:
            raise ValueError("an avro source needs avro_schema (inline) or avro_schema_file")
        if self.format == "json" and (self.avro_schema is not None or self.avro_schema_file):
            raise ValueError("avro_schema only applies to format: avro")
        if not self.fields:
            raise ValueError("a source must declare its fields")
        return self

    @property
    def dlq_topic(self) -> str:
        return self.dead_letter_topic or f"{self.topic}.dlq"

    def field(self, name: str) -> SourceField | None:
        return next((f for f in self.fields if f.name == name), None)


# ---------------------------------------------------------------- features and views

Aggregation = Literal[
    "count", "sum", "mean", "min", "max", "first", "last", "stddev", "approx_count_distinct"
]
FilterOp = Literal["eq", "ne", "lt", "le", "gt", "ge", "in", "not_in"]


class Condition(_Model):
    """One condition of a view's filter; a view keeps events that meet all of them."""

    field: Name
    op: FilterOp = "eq"
    value: JsonValue

    @model_validator(mode="after")
    def _list_for_membership(self) -> Condition:
        if self.op in ("in", "not_in") and not isinstance(self.value, list):
            raise ValueError(f"op '{self.op}' needs a list value")
        if self.op in ("in", "not_in") and not self.value:
            raise ValueError(f"op '{self.op}' needs at least one value")
        if self.value is None or (isinstance(self.value, list) and None in self.value):
            raise ValueError("null never matches a condition (events lack the field or it is null); leave the condition out")
        return self


class ValueCheck(_Model):
    """What a served value must satisfy; one that does not is served with status INVALID."""

    min: float | None = None
    max: float | None = None
    allowed: tuple[JsonValue, ...] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> ValueCheck:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self

    def accepts(self, value: Any) -> bool:
        if value is None:
            return True
        if self.min is not None and value < self.min:
            return False
        if self.max is not None and value > self.max:
            return False
        return self.allowed is None or value in self.allowed


class Feature(_Documented):
    name: Name
    aggregation: Aggregation
    field: Name | None = None
    window: Annotated[Window | None, Field(default=None)] = None
    dtype: ValueType | None = None
    example: JsonValue = None
    pii: Pii = "none"
    max_age: Duration | None = None
    validation: ValueCheck | None = None

    @field_validator("window", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _window_shorthand(value)

    @model_validator(mode="after")
    def _needs_field(self) -> Feature:
        if self.field is None and self.aggregation != "count":
            raise ValueError(f"aggregation '{self.aggregation}' needs an input field")
        return self


class FeatureView(_Documented):
    name: Name
    entity: Name
    source: Name
    features: tuple[Feature, ...] = Field(min_length=1)
    filter: tuple[Condition, ...] = ()
    online_ttl: Duration | None = None
    """How long Redis keeps an entity's values after its last event; default: the longest window + 1d."""

    @model_validator(mode="after")
    def _ttl_covers_windows(self) -> FeatureView:
        if self.online_ttl is None:
            return self
        if self.online_ttl < MINUTE:
            raise ValueError("online_ttl must be at least 1m")
        longest = self.longest_window
        if longest is not None and self.online_ttl < longest:
            raise ValueError(f"online_ttl must be at least the longest window of the view ({format_duration(longest)})")
        return self

    @property
    def longest_window(self) -> timedelta | None:
        spans = [f.window.span for f in self.features if f.window is not None]
        return max(spans) if spans else None

    @property
    def effective_online_ttl(self) -> timedelta | None:
        """online_ttl, else the longest window + 1d; None (no expiry) for lifetime-only views."""
        if self.online_ttl is not None:
            return self.online_ttl
        longest = self.longest_window
        return longest + DAY if longest is not None else None

    def feature(self, name: str) -> Feature | None:
        return next((f for f in self.features if f.name == name), None)


FeatureRef = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*(:[a-z][a-z0-9_]*)?$")]
"""``view`` (every feature of it) or ``view:feature``."""


class FeatureService(_Documented):
    """A named list of features that one model reads together."""

    name: Name
    features: tuple[FeatureRef, ...] = Field(min_length=1)


class Consumer(_Documented):
    """A model or service that uses features; recorded for lineage and impact analysis."""

    name: Name
    kind: Literal["model", "service", "dashboard", "job"] = "model"
    feature_services: tuple[Name, ...] = ()
    features: tuple[FeatureRef, ...] = ()


class Project(_Documented):
    name: Name


class ProjectDefinition(_Model):
    """Everything a project directory declares, merged from its YAML files."""

    project: Project
    entities: tuple[Entity, ...] = ()
    sources: tuple[Source, ...] = ()
    feature_views: tuple[FeatureView, ...] = ()
    feature_services: tuple[FeatureService, ...] = ()
    consumers: tuple[Consumer, ...] = ()

    def entity(self, name: str) -> Entity | None:
        return next((e for e in self.entities if e.name == name), None)

    def source(self, name: str) -> Source | None:
        return next((s for s in self.sources if s.name == name), None)

    def feature_view(self, name: str) -> FeatureView | None:
        return next((v for v in self.feature_views if v.name == name), None)

    def feature_service(self, name: str) -> FeatureService | None:
        return next((s for s in self.feature_services if s.name == name), None)


# Keys of a project file, in the order they are exported.
SECTIONS: dict[str, type[_Model]] = {
    "entities": Entity,
    "sources": Source,
    "feature_views": FeatureView,
    "feature_services": FeatureService,
    "consumers": Consumer,
}


# ---------------------------------------------------------------- aggregation type rules

_ACCEPTS: dict[str, frozenset[str]] = {
    "count": frozenset({"string", "int64", "float64", "bool", "timestamp"}),
    "sum": frozenset({"int64", "float64"}),
    "mean": frozenset({"int64", "float64"}),
    "stddev": frozenset({"int64", "float64"}),
    "min": frozenset({"int64", "float64", "timestamp"}),
    "max": frozenset({"int64", "float64", "timestamp"}),
    "first": frozenset({"string", "int64", "float64", "bool", "timestamp"}),
    "last": frozenset({"string", "int64", "float64", "bool", "timestamp"}),
    "approx_count_distinct": frozenset({"string", "int64", "float64", "bool", "timestamp"}),
}


def accepted_input_types(aggregation: str) -> frozenset[str]:
    return _ACCEPTS[aggregation]


def natural_output_type(aggregation: str, input_type: str | None) -> str:
    """The type an aggregation produces from an input type (count needs none)."""
    if aggregation in ("count", "approx_count_distinct"):
        return "int64"
    if aggregation in ("mean", "stddev"):
        return "float64"
    if input_type is None:
        raise ValueError(f"aggregation '{aggregation}' needs an input field")
    return input_type


def output_type_allowed(natural: str, declared: str) -> bool:
    """A declared dtype may widen int64 to float64; anything else must match."""
    return declared == natural or (natural == "int64" and declared == "float64")
