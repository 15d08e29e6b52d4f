"""Load a project directory of YAML files into one validated ``ProjectDefinition``.

Every object is validated on its own so that one bad object does not hide the problems of the
next; then the whole project is checked across objects (``validate.py``). All problems are
reported at once, each with file, line and field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from pydantic import BaseModel, ValidationError

from featurestream.definitions.avro import fields_from_avro, yaml_nulls_to_avro
from featurestream.definitions.errors import DefinitionError, Problem
from featurestream.definitions.models import SECTIONS, Project, ProjectDefinition
from featurestream.definitions.validate import cross_check
from featurestream.definitions.yaml_source import PathKey, YamlDocument, YamlReadError, read_yaml

TOP_LEVEL_KEYS = ("project", *SECTIONS)
# Objects whose refused list items can be left out for the cross-object checks. Sources and
# entities are not: a source without a refused field would make every view on it complain.
SALVAGEABLE = ("feature_views", "feature_services", "consumers")
MAX_FILES = 500


@dataclass(frozen=True)
class Origin:
    """Where an object was declared, to turn a field path into a line."""

    document: YamlDocument
    path: PathKey
    kept: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """For a salvaged object: the original positions of the list items that were kept."""

    def original(self, rel: PathKey) -> PathKey:
        for key, positions in self.kept:
            if len(rel) >= 2 and rel[0] == key and isinstance(rel[1], int) and rel[1] < len(positions):
                return (key, positions[rel[1]], *rel[2:])
        return rel

    def locate(self, rel: PathKey) -> tuple[str, int | None]:
        return str(self.document.path), self.document.line_of((*self.path, *rel))


def _dotted(prefix: str, loc: tuple[str | int, ...], raw: Any = None) -> str:
    """``feature_views[user_transactions].features[txn_count_1h].window``: list items by name when named."""
    text = prefix
    for part in loc:
        if isinstance(part, int):
            item = raw[part] if isinstance(raw, list) and part < len(raw) else None
            name = item.get("name") if isinstance(item, dict) else None
            text += f"[{name}]" if isinstance(name, str) else f"[{part}]"
            raw = item
        else:
            text += f".{part}" if text else str(part)
            raw = raw.get(part) if isinstance(raw, dict) else None
    return text


def _label(section: str, raw: Any, index: int) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"{section}[{name}]" if isinstance(name, str) else f"{section}[{index}]"


def _pydantic_problems(exc: ValidationError, origin: Origin, label: str, raw: Any) -> list[Problem]:
    problems = []
    errors = exc.errors(include_url=False)
    item_errors = {tuple(e["loc"][:i]) for e in errors for i, part in enumerate(e["loc"]) if isinstance(part, int)}
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "too_short" and loc in item_errors:
            continue  # pydantic's echo of a list whose items all failed; the item errors say why
        file, line = origin.locate(loc)
        visible = _visible(loc, origin)
        if error["type"] == "missing" and loc and loc[-1] not in visible:
            visible = (*visible, loc[-1])  # name the missing key, though the file lacks it
        problems.append(Problem(file, line, _dotted(label, visible, raw), _friendly(error)))
    return problems


_FRIENDLY = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "union_tag_invalid": "window type must be sliding, tumbling or hopping",
    "union_tag_not_found": "a window mapping needs 'type' (sliding, tumbling or hopping)",
}


def _friendly(error: Any) -> str:
    kind = error["type"]
    if kind in _FRIENDLY:
        return _FRIENDLY[kind]
    if kind == "string_pattern_mismatch":
        pattern = error.get("ctx", {}).get("pattern", "")
        if pattern.startswith("^[a-z][a-z0-9_]"):
            return "a name must start with a lower-case letter and hold only a-z, 0-9 and _ (at most 63)"
        if pattern.startswith("^[A-Za-z0-9._-]"):
            return "a topic name holds only letters, digits, '.', '_' and '-'"
    return str(error["msg"]).removeprefix("Value error, ")


def _visible(loc: tuple[str | int, ...], origin: Origin) -> tuple[str | int, ...]:
    """Drop parts of a pydantic location that are not in the file (union tags, validator names)."""
    kept: list[str | int] = []
    for part in loc:
        if (*origin.path, *kept, part) in origin.document.lines or isinstance(part, int):
            kept.append(part)
    return tuple(kept)


def _inline_avro(raw: dict[str, Any], document: YamlDocument, path: PathKey) -> list[Problem]:
    """Resolve ``avro_schema_file`` relative to its YAML file, check the schema, derive fields."""
    problems: list[Problem] = []
    if raw.get("avro_schema") is not None and raw.get("avro_schema_file") is not None:
        return problems  # the model refuses both at once, with its own message
    file_name = raw.pop("avro_schema_file", None)
    if file_name is not None:
        schema_path = (document.path.parent / str(file_name)).resolve()
        try:
            raw["avro_schema"] = json.loads(schema_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            line = document.line_of((*path, "avro_schema_file"))
            problems.append(Problem(str(document.path), line, "avro_schema_file", f"cannot read {schema_path}: {exc}"))
            return problems
    if raw.get("avro_schema") is None:
        return problems
    schema = raw["avro_schema"] = yaml_nulls_to_avro(raw["avro_schema"])
    try:
        fastavro.parse_schema(schema)
    except Exception as exc:  # fastavro raises several unrelated types for bad schemas
        line = document.line_of((*path, "avro_schema"))
        problems.append(Problem(str(document.path), line, "avro_schema", f"invalid Avro schema: {exc}"))
        return problems
    if not raw.get("fields"):
        derived, why = fields_from_avro(schema)
        if why:
            line = document.line_of((*path, "avro_schema"))
            problems.append(Problem(str(document.path), line, "avro_schema", why))
        raw["fields"] = derived
    return problems


def _salvage(model: type[BaseModel], raw: Any, exc: ValidationError, origin: Origin) -> tuple[BaseModel, Origin] | None:
    """The object without its refused list items and unknown keys, so cross-object checks can
    still report on the rest of it; None when what failed cannot simply be left out."""
    if not isinstance(raw, dict):
        return None
    trimmed = dict(raw)
    drop: dict[str, set[int]] = {}
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        if error["type"] == "extra_forbidden" and len(loc) == 1:
            trimmed.pop(str(loc[0]), None)
        elif len(loc) >= 2 and isinstance(loc[1], int) and isinstance(raw.get(str(loc[0])), list):
            drop.setdefault(str(loc[0]), set()).add(loc[1])
        else:
            return None
    kept = []
    for key, indexes in drop.items():
        positions = tuple(i for i in range(len(raw[key])) if i not in indexes)
        trimmed[key] = [raw[key][i] for i in positions]
        kept.append((key, positions))
    try:
        return model.model_validate(trimmed), Origin(origin.document, origin.path, tuple(kept))
    except ValidationError:
        return None


def _read_files(directory: Path) -> tuple[list[YamlDocument], list[Problem]]:
    if not directory.is_dir():
        raise DefinitionError([Problem(str(directory), None, "", "not a directory")])
    paths = sorted(
        p
        for p in directory.rglob("*")
        if p.suffix.lower() in (".yaml", ".yml")
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not paths:
        raise DefinitionError([Problem(str(directory), None, "", "no .yaml or .yml files found")])
    if len(paths) > MAX_FILES:
        raise DefinitionError([Problem(str(directory), None, "", f"more than {MAX_FILES} YAML files")])
    documents, problems = [], []
    for path in paths:
        try:
            documents.append(read_yaml(path))
        except YamlReadError as exc:
            problems.append(Problem(str(path), exc.line, "", str(exc)))
    return documents, problems


def load_project(directory: Path) -> ProjectDefinition:
    """Read, validate and cross-check every YAML file under ``directory``; raise ``DefinitionError``."""
    documents, problems = _read_files(Path(directory))
    unreadable = bool(problems)
    projects: list[tuple[Project, Origin]] = []
    objects: dict[str, list[tuple[BaseModel, Origin]]] = {section: [] for section in SECTIONS}
    invalid: dict[str, set[str]] = {}

    for document in documents:
        data = document.data
        if data is None:
            continue
        if not isinstance(data, dict):
            problems.append(Problem(str(document.path), 1, "", "expected a mapping with keys " + ", ".join(TOP_LEVEL_KEYS)))
            continue
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                line = document.line_of((key,))
                problems.append(Problem(str(document.path), line, str(key), "unknown top-level key; expected one of " + ", ".join(TOP_LEVEL_KEYS)))
        if "project" in data:
            origin = Origin(document, ("project",))
            try:
                projects.append((Project.model_validate(data["project"]), origin))
            except ValidationError as exc:
                problems += _pydantic_problems(exc, origin, "project", data["project"])
        for section, model in SECTIONS.items():
            items = data.get(section)
            if items is None:
                continue
            if not isinstance(items, list):
                problems.append(Problem(str(document.path), document.line_of((section,)), section, "expected a list"))
                continue
            for index, raw in enumerate(items):
                origin = Origin(document, (section, index))
                label = _label(section, raw, index)
                if section == "sources" and isinstance(raw, dict):
                    for problem in _inline_avro(raw, document, (section, index)):
                        problems.append(Problem(problem.file, problem.line, f"{label}.{problem.field}", problem.message))
                try:
                    objects[section].append((model.model_validate(raw), origin))
                except ValidationError as exc:
                    problems += _pydantic_problems(exc, origin, label, raw)
                    salvaged = _salvage(model, raw, exc, origin) if section in SALVAGEABLE else None
                    name = raw.get("name") if isinstance(raw, dict) else None
                    if salvaged is not None:
                        objects[section].append(salvaged)
                        if section == "feature_views":
                            kept = {f.name for f in salvaged[0].features}  # type: ignore[attr-defined]
                            dropped = {item.get("name") for item in raw.get("features", []) if isinstance(item, dict)}
                            invalid.setdefault("feature_views:features", set()).update(
                                f"{name}:{feature}" for feature in dropped - kept if isinstance(feature, str)
                            )
                    elif isinstance(name, str):
                        invalid.setdefault(section, set()).add(name)

    if not projects and not unreadable:  # an unreadable file may be the one declaring it
        problems.append(Problem(str(directory), None, "project", "no file declares the project (a top-level 'project' mapping with a name)"))
    for _, origin in projects[1:]:
        file, line = origin.locate(())
        first_file, first_line = projects[0][1].locate(())
        problems.append(Problem(file, line, "project", f"the project is already declared at {first_file}:{first_line}"))
    # Cross-check what did validate, so one run reports every problem; references to objects
    # that failed on their own are not reported a second time.
    project = projects[0][0] if projects else Project(name="unnamed")
    definition = ProjectDefinition.model_validate(
        {"project": project, **{section: [obj for obj, _ in objs] for section, objs in objects.items()}}
    )
    origins = {section: [origin for _, origin in objs] for section, objs in objects.items()}
    # With a file unreadable, its objects are unknown: references to them would all look dangling.
    cross = [] if unreadable else cross_check(definition, {k: frozenset(v) for k, v in invalid.items()})
    for section, index, rel, message in cross:
        origin = origins[section][index]
        rel = origin.original(rel)
        file, line = origin.locate(rel)
        raw = origin.document.data[origin.path[0]][origin.path[1]]
        problems.append(Problem(file, line, _dotted(_label(section, raw, index), rel, raw), message))
    if problems:
        raise DefinitionError(problems)
    return definition
