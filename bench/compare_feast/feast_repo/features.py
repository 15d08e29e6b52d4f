"""Feast definitions of the demo views, built from ``schema.json`` beside this file.

run.py writes ``schema.json`` from featurestream's own definitions: the entity and its join key,
and for each view its Parquet file (file offline store), its TTL and its features with their
types. ``feast apply`` imports this module and registers every object it finds in it.
"""

import json
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Bool, Float64, Int64, String, UnixTimestamp

TYPES = {"int64": Int64, "float64": Float64, "string": String, "timestamp": UnixTimestamp, "bool": Bool}

SCHEMA = json.loads((Path(__file__).resolve().parent / "schema.json").read_text())

user = Entity(name=SCHEMA["entity"], join_keys=[SCHEMA["join_key"]], value_type=ValueType.STRING)

for _view in SCHEMA["views"]:
    globals()[_view["name"]] = FeatureView(
        name=_view["name"],
        entities=[user],
        ttl=timedelta(seconds=_view["ttl_s"]),  # 0: no limit
        schema=[Field(name=name, dtype=TYPES[dtype]) for name, dtype in _view["features"]],
        source=FileSource(
            name=f"{_view['name']}_source", path=_view["path"], timestamp_field="event_timestamp"
        ),
        online=True,
    )
