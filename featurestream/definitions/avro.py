"""Mapping between Avro schemas and the definitions' field types."""

from __future__ import annotations

from typing import Any

_PRIMITIVES = {
    "string": "string",
    "int": "int64",
    "long": "int64",
    "float": "float64",
    "double": "float64",
    "boolean": "bool",
}
_LOGICAL = {"timestamp-millis": "timestamp", "timestamp-micros": "timestamp"}


def avro_field_type(avro_type: Any) -> tuple[str | None, bool]:
    """(our value type or None if unsupported, nullable) of one Avro field type."""
    nullable = False
    if isinstance(avro_type, list):
        branches = [t for t in avro_type if t != "null"]
        nullable = len(branches) < len(avro_type)
        if len(branches) != 1:
            return None, nullable
        avro_type = branches[0]
    if isinstance(avro_type, dict):
        logical = avro_type.get("logicalType")
        if logical in _LOGICAL:
            return _LOGICAL[logical], nullable
        avro_type = avro_type.get("type")
    if isinstance(avro_type, str) and avro_type in _PRIMITIVES:
        return _PRIMITIVES[avro_type], nullable
    return None, nullable


def avro_record_fields(schema: Any) -> dict[str, Any]:
    if isinstance(schema, dict) and schema.get("type") == "record":
        return {f["name"]: f["type"] for f in schema.get("fields", []) if isinstance(f, dict) and "name" in f}
    return {}


def fields_from_avro(schema: Any) -> tuple[list[dict[str, Any]], str | None]:
    """Source fields derived from an Avro record schema, and why some could not be (or None)."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return [], "an Avro source schema must be a record"
    derived = []
    for name, avro_type in avro_record_fields(schema).items():
        value_type, nullable = avro_field_type(avro_type)
        if value_type is None:
            continue
        derived.append({"name": name, "type": value_type, "required": not nullable})
    # Nested or union-typed fields cannot feed aggregations; they are left out, not refused.
    why = None if derived else "the Avro record has no field of a supported type"
    return derived, why


def yaml_nulls_to_avro(schema: Any) -> Any:
    """YAML reads an unquoted ``null`` in ``type: [null, double]`` as None; Avro means "null"."""
    if isinstance(schema, dict):
        return {k: ("null" if k == "type" and v is None else yaml_nulls_to_avro(v)) for k, v in schema.items()}
    if isinstance(schema, list):
        return ["null" if item is None else yaml_nulls_to_avro(item) for item in schema]
    return schema
