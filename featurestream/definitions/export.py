"""Write a ``ProjectDefinition`` back to YAML that ``load_project`` reads to the same model.

Layout: ``project.yaml`` and one file per non-empty section (``entities.yaml``, ``sources.yaml``,
``feature_views.yaml``, ``feature_services.yaml``, ``consumers.yaml``). Default values are left
out, ``name`` and the documentation keys come first, a sliding window is written in its short
form (``window: 1h``), and small mappings (other windows, filter conditions, plain source fields)
on one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from featurestream.definitions.models import (
    SECTIONS,
    Feature,
    FeatureView,
    ProjectDefinition,
    SlidingWindow,
)
from featurestream.definitions.types import format_duration

_DOC_KEYS = ("description", "owner", "tags")
_LATE_KEYS = ("example", "pii", "max_age", "avro_schema", "feature_services", "fields", "features")
_SHORT_LISTS = ("tags", "feature_services")


class _Flow(dict[str, Any]):
    """A mapping written on one line."""


class _FlowList(list[Any]):
    """A list written on one line."""


_Dumper: Any = type("_Dumper", (yaml.SafeDumper,), {})


def _represent_flow(dumper: Any, data: _Flow) -> Any:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True)


def _represent_flow_list(dumper: Any, data: _FlowList) -> Any:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


def _represent_str(dumper: Any, data: str) -> Any:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(_Flow, _represent_flow)
_Dumper.add_representer(_FlowList, _represent_flow_list)
_Dumper.add_representer(str, _represent_str)


def _ordered(data: dict[str, Any]) -> dict[str, Any]:
    """``name``, what defines the object, its documentation, then examples and long lists."""
    head = ["name"] if "name" in data else []
    docs = [k for k in _DOC_KEYS if k in data]
    late = [k for k in _LATE_KEYS if k in data]
    middle = [k for k in data if k not in (*head, *docs, *late)]
    ordered = {k: data[k] for k in (*head, *middle, *docs, *late)}
    for key in _SHORT_LISTS:
        if key in ordered and all(isinstance(item, str) for item in ordered[key]):
            ordered[key] = _FlowList(ordered[key])
    return ordered


def _compact(model: BaseModel) -> dict[str, Any]:
    data = model.model_dump(mode="json", exclude_defaults=True)
    return _ordered(data)


def _feature(feature: Feature) -> dict[str, Any]:
    data = _compact(feature)
    if isinstance(feature.window, SlidingWindow):
        data["window"] = format_duration(feature.window.duration)
    elif feature.window is not None:
        data["window"] = _Flow(feature.window.model_dump(mode="json"))
    return data


def _view(view: FeatureView) -> dict[str, Any]:
    data = _compact(view)
    if "filter" in data:
        data["filter"] = [_Flow(condition) for condition in data["filter"]]
    data["features"] = [_feature(feature) for feature in view.features]
    return data


def _object(section: str, obj: BaseModel) -> dict[str, Any]:
    if isinstance(obj, FeatureView):
        return _view(obj)
    data = _compact(obj)
    if section == "entities":
        keys = [key["name"] if set(key) == {"name"} else _Flow(key) for key in data["join_keys"]]
        data["join_keys"] = _FlowList(keys) if all(isinstance(k, str) for k in keys) else keys
    if section == "sources":
        data["fields"] = [
            _Flow(_ordered(f)) if "description" not in f else _ordered(f) for f in data.get("fields", [])
        ]
    return data


def export_documents(definition: ProjectDefinition) -> dict[str, dict[str, Any]]:
    """File name -> YAML mapping, for every file the export writes."""
    documents: dict[str, dict[str, Any]] = {"project.yaml": {"project": _compact(definition.project)}}
    for section in SECTIONS:
        objects = getattr(definition, section)
        if objects:
            documents[f"{section}.yaml"] = {section: [_object(section, obj) for obj in objects]}
    return documents


def to_yaml(document: dict[str, Any], header: str = "") -> str:
    body: str = yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
    lines, first = [], True
    for line in body.splitlines():
        if line.startswith("- "):  # a blank line between the objects of a section
            if not first:
                lines.append("")
            first = False
        lines.append(line)
    body = "\n".join(lines) + "\n"
    comment = "".join(f"# {line}\n" for line in header.splitlines()) if header else ""
    return comment + body


def export_definitions(
    definition: ProjectDefinition, directory: Path, *, overwrite: bool = False, header: str = ""
) -> list[Path]:
    """Write the definitions as YAML files in ``directory``; returns the files written.

    Refuses (``FileExistsError``) when the directory already holds YAML files, unless ``overwrite``:
    ``load_project`` reads every YAML file under a directory, so leftovers would be merged in.
    """
    directory = Path(directory)
    existing = sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml")) if directory.is_dir() else []
    documents = export_documents(definition)
    if existing and not overwrite:
        names = ", ".join(str(p) for p in existing[:5])
        more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        raise FileExistsError(f"{directory} already holds YAML files ({names}{more})")
    directory.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in existing:
            path.unlink()
    written = []
    for name, document in documents.items():
        path = directory / name
        path.write_text(to_yaml(document, header), encoding="utf-8")
        written.append(path)
    return written
