"""Checks across objects: references, duplicates, and types of the fields features read.

``cross_check`` yields ``(section, index, path inside the object, message)`` so the loader can
name file and line; it never stops at the first problem.
"""

from __future__ import annotations

from collections.abc import Iterator

from featurestream.definitions.avro import avro_field_type, avro_record_fields
from featurestream.definitions.models import (
    SECTIONS,
    Condition,
    FeatureView,
    ProjectDefinition,
    Source,
    accepted_input_types,
    natural_output_type,
    output_type_allowed,
)
from featurestream.definitions.types import parse_timestamp

CrossProblem = tuple[str, int, tuple[str | int, ...], str]
Invalid = dict[str, frozenset[str]]
"""Names refused on their own, per section; 'feature_views:features' holds 'view:feature'."""
_TIME_FORMAT_CLASHES = {
    ("string", "epoch_millis"),
    ("string", "epoch_seconds"),
    ("int64", "iso8601"),
}
_VALUE_AGGREGATIONS = ("first", "last", "min", "max")
_PII_RANK = {"none": 0, "personal": 1, "sensitive": 2}
EVENT_TIME_TYPES = ("timestamp", "int64", "string")
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int64": (int,),
    "float64": (int, float),
    "bool": (bool,),
    "timestamp": (str, int),
}


def _is_json_type(value: object, value_type: str) -> bool:
    if isinstance(value, bool) != (value_type == "bool"):
        return False
    if not isinstance(value, _JSON_TYPES[value_type]):
        return False
    if value_type == "timestamp":
        try:
            parse_timestamp(value)
        except ValueError:
            return False
    return True


def _duplicates(definition: ProjectDefinition) -> Iterator[CrossProblem]:
    for section in SECTIONS:
        seen: dict[str, int] = {}
        for index, obj in enumerate(getattr(definition, section)):
            if obj.name in seen:
                yield section, index, ("name",), f"duplicate name '{obj.name}' (first declared as item {seen[obj.name]})"
            else:
                seen[obj.name] = index
    for index, source in enumerate(definition.sources):
        yield from _duplicate_members(
            "sources", index, "fields", [f.name for f in source.fields], "field"
        )
    for index, entity in enumerate(definition.entities):
        yield from _duplicate_members("entities", index, "join_keys", [k.name for k in entity.join_keys], "join key")
    for index, view in enumerate(definition.feature_views):
        yield from _duplicate_members("feature_views", index, "features", [f.name for f in view.features], "feature")
    topics: dict[str, str] = {}
    for index, source in enumerate(definition.sources):
        if source.topic in topics and topics[source.topic] != source.name:
            yield "sources", index, ("topic",), f"topic '{source.topic}' is already the topic of source '{topics[source.topic]}'"
        topics.setdefault(source.topic, source.name)


def _duplicate_members(section: str, index: int, key: str, names: list[str], what: str) -> Iterator[CrossProblem]:
    seen: set[str] = set()
    for position, name in enumerate(names):
        if name in seen:
            yield section, index, (key, position, "name"), f"duplicate {what} '{name}'"
        seen.add(name)


def _check_source(index: int, source: Source) -> Iterator[CrossProblem]:
    time_field = source.field(source.event_time_field)
    if time_field is None:
        yield "sources", index, ("event_time_field",), f"'{source.event_time_field}' is not one of the source's fields"
    elif time_field.type not in EVENT_TIME_TYPES:
        yield "sources", index, ("event_time_field",), f"the event-time field must be timestamp, int64 (epoch) or string (ISO-8601), not {time_field.type}"
    elif not time_field.required:
        yield "sources", index, ("event_time_field",), "the event-time field must be required"
    elif (time_field.type, source.event_time_format) in _TIME_FORMAT_CLASHES:
        yield "sources", index, ("event_time_format",), f"{source.event_time_format} cannot be read from a {time_field.type} field"
    for position, field in enumerate(source.fields):
        for value in field.allowed or ():
            if not _is_json_type(value, field.type):
                yield "sources", index, ("fields", position, "allowed"), f"allowed value {value!r} is not a {field.type}"
    if source.format != "avro" or source.avro_schema is None:
        return
    avro_fields = avro_record_fields(source.avro_schema)
    for position, declared in enumerate(source.fields):
        if declared.name not in avro_fields:
            yield "sources", index, ("fields", position, "name"), f"'{declared.name}' is not in the Avro schema"
            continue
        avro_type, nullable = avro_field_type(avro_fields[declared.name])
        compatible = avro_type == declared.type or (declared.type == "timestamp" and avro_type in ("int64", "string"))
        if not compatible:
            yield "sources", index, ("fields", position, "type"), f"declared {declared.type} but the Avro schema says {avro_fields[declared.name]!r}"
        elif nullable and declared.required:
            yield "sources", index, ("fields", position, "required"), "the Avro schema allows null; declare required: false"


def _check_condition(view_index: int, position: int, condition: Condition, source: Source) -> Iterator[CrossProblem]:
    where = ("filter", position)
    field = source.field(condition.field)
    if field is None:
        yield "feature_views", view_index, (*where, "field"), f"source '{source.name}' has no field '{condition.field}'"
        return
    values = condition.value if isinstance(condition.value, list) else [condition.value]
    for value in values:
        if not _is_json_type(value, field.type):
            yield "feature_views", view_index, (*where, "value"), f"{value!r} is not a {field.type} like field '{field.name}'"
    if condition.op in ("lt", "le", "gt", "ge") and field.type == "bool":
        yield "feature_views", view_index, (*where, "op"), f"'{condition.op}' cannot compare bool field '{field.name}'"


def _check_view(index: int, view: FeatureView, definition: ProjectDefinition, invalid: Invalid) -> Iterator[CrossProblem]:
    entity = definition.entity(view.entity)
    source = definition.source(view.source)
    if entity is None and view.entity not in invalid.get("entities", ()):
        yield "feature_views", index, ("entity",), f"no entity named '{view.entity}'"
    if source is None:
        if view.source not in invalid.get("sources", ()):
            yield "feature_views", index, ("source",), f"no source named '{view.source}'"
        return
    if entity is not None:
        for key in entity.join_keys:
            field = source.field(key.name)
            if field is None:
                yield "feature_views", index, ("entity",), f"source '{source.name}' has no field '{key.name}' (join key of entity '{entity.name}')"
            elif field.type != key.type:
                yield "feature_views", index, ("entity",), f"join key '{key.name}' is {key.type} but source field '{key.name}' is {field.type}"
    for position, condition in enumerate(view.filter):
        yield from _check_condition(index, position, condition, source)
    for position, feature in enumerate(view.features):
        where = ("features", position)
        input_type = None
        if feature.field is not None:
            field = source.field(feature.field)
            if field is None:
                yield "feature_views", index, (*where, "field"), f"source '{source.name}' has no field '{feature.field}'"
                continue
            input_type = field.type
            if input_type not in accepted_input_types(feature.aggregation):
                accepted = ", ".join(sorted(accepted_input_types(feature.aggregation)))
                yield "feature_views", index, (*where, "field"), f"{feature.aggregation} cannot take {input_type} field '{field.name}' (it takes {accepted})"
                continue
            if feature.aggregation in _VALUE_AGGREGATIONS and _PII_RANK[feature.pii] < _PII_RANK[field.pii]:
                yield "feature_views", index, (*where, "pii"), f"{feature.aggregation} returns values of field '{field.name}', which is pii {field.pii}; declare pii: {field.pii} (or stricter)"
        natural = natural_output_type(feature.aggregation, input_type)
        if feature.dtype is not None and not output_type_allowed(natural, feature.dtype):
            yield "feature_views", index, (*where, "dtype"), f"{feature.aggregation} of {input_type or 'events'} gives {natural}, not {feature.dtype}"
        check = feature.validation
        if check is not None and (check.min is not None or check.max is not None) and natural not in ("int64", "float64") and feature.dtype not in ("int64", "float64"):
            yield "feature_views", index, (*where, "validation"), f"min/max apply to numeric features, not {feature.dtype or natural}"
        if feature.max_age is not None and feature.max_age.total_seconds() <= 0:
            yield "feature_views", index, (*where, "max_age"), "max_age must be positive"


def _check_refs(section: str, index: int, key: str, refs: tuple[str, ...], definition: ProjectDefinition, invalid: Invalid) -> Iterator[CrossProblem]:
    for position, ref in enumerate(refs):
        view_name, _, feature_name = ref.partition(":")
        view = definition.feature_view(view_name)
        if view is None:
            if view_name not in invalid.get("feature_views", ()):
                yield section, index, (key, position), f"no feature view named '{view_name}'"
        elif feature_name and view.feature(feature_name) is None and ref not in invalid.get("feature_views:features", ()):
            yield section, index, (key, position), f"feature view '{view_name}' has no feature '{feature_name}'"


def cross_check(definition: ProjectDefinition, invalid: Invalid | None = None) -> list[CrossProblem]:
    """Problems across objects; references to ``invalid`` objects (refused on their own, and
    already reported) are not reported again."""
    invalid = invalid or {}
    problems: list[CrossProblem] = list(_duplicates(definition))
    for index, source in enumerate(definition.sources):
        problems += _check_source(index, source)
    for index, view in enumerate(definition.feature_views):
        problems += _check_view(index, view, definition, invalid)
    for index, service in enumerate(definition.feature_services):
        problems += _check_refs("feature_services", index, "features", service.features, definition, invalid)
    for index, consumer in enumerate(definition.consumers):
        problems += _check_refs("consumers", index, "features", consumer.features, definition, invalid)
        for position, name in enumerate(consumer.feature_services):
            if definition.feature_service(name) is None and name not in invalid.get("feature_services", ()):
                problems.append(("consumers", index, ("feature_services", position), f"no feature service named '{name}'"))
    return problems

