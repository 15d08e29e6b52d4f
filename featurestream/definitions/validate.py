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

CrossProblem = tuple[str, int, tuple[str | int, ...], str]
EVENT_TIME_TYPES = ("timestamp", "int64", "string")
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int64": (int,),
    "float64": (int, float),
    "bool": (bool,),
    "timestamp": (str, int),
}


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
    expected = _JSON_TYPES[field.type]
    for value in values:
        if value is None and condition.op in ("eq", "ne"):
            continue
        if not isinstance(value, expected) or (isinstance(value, bool) and field.type != "bool"):
            yield "feature_views", view_index, (*where, "value"), f"{value!r} is not a {field.type} like field '{field.name}'"
    if condition.op in ("lt", "le", "gt", "ge") and field.type == "bool":
        yield "feature_views", view_index, (*where, "op"), f"'{condition.op}' cannot compare bool field '{field.name}'"


def _check_view(index: int, view: FeatureView, definition: ProjectDefinition) -> Iterator[CrossProblem]:
    entity = definition.entity(view.entity)
    source = definition.source(view.source)
    if entity is None:
        yield "feature_views", index, ("entity",), f"no entity named '{view.entity}'"
    if source is None:
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
        natural = natural_output_type(feature.aggregation, input_type)
        if feature.dtype is not None and not output_type_allowed(natural, feature.dtype):
            yield "feature_views", index, (*where, "dtype"), f"{feature.aggregation} of {input_type or 'events'} gives {natural}, not {feature.dtype}"
        if feature.max_age is not None and feature.max_age.total_seconds() <= 0:
            yield "feature_views", index, (*where, "max_age"), "max_age must be positive"


def _check_refs(section: str, index: int, key: str, refs: tuple[str, ...], definition: ProjectDefinition) -> Iterator[CrossProblem]:
    for position, ref in enumerate(refs):
        view_name, _, feature_name = ref.partition(":")
        view = definition.feature_view(view_name)
        if view is None:
            yield section, index, (key, position), f"no feature view named '{view_name}'"
        elif feature_name and view.feature(feature_name) is None:
            yield section, index, (key, position), f"feature view '{view_name}' has no feature '{feature_name}'"


def cross_check(definition: ProjectDefinition, invalid_names: frozenset[str] = frozenset()) -> list[CrossProblem]:
    """Problems across objects; references to ``invalid_names`` (objects refused on their own) are skipped."""
    problems: list[CrossProblem] = list(_duplicates(definition))
    for index, source in enumerate(definition.sources):
        problems += _check_source(index, source)
    for index, view in enumerate(definition.feature_views):
        problems += _check_view(index, view, definition)
    for index, service in enumerate(definition.feature_services):
        problems += _check_refs("feature_services", index, "features", service.features, definition)
    for index, consumer in enumerate(definition.consumers):
        problems += _check_refs("consumers", index, "features", consumer.features, definition)
        for position, name in enumerate(consumer.feature_services):
            if definition.feature_service(name) is None:
                problems.append(("consumers", index, ("feature_services", position), f"no feature service named '{name}'"))
    return [p for p in problems if not _refers_to(p[3], invalid_names)]


def _refers_to(message: str, names: frozenset[str]) -> bool:
    return message.startswith("no ") and any(message.endswith(f"named '{name}'") for name in names)

