"""What the registry hands out: view versions, project snapshots, history records, apply results."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from featurestream.definitions.models import FeatureView, ProjectDefinition
from featurestream.registry.diff import FieldChange, Kind, Plan, Status


class RegistryError(Exception):
    """A registry operation that cannot be done as asked (a user error: no traceback in the CLI)."""


class InvalidDefinitionError(RegistryError):
    """A definition given to the registry directly (not through the loader) whose objects do not fit."""


class ProjectNotFoundError(RegistryError):
    pass


class ObjectNotFoundError(RegistryError):
    pass


class RetireError(RegistryError):
    pass


class SchemaVersionError(RegistryError):
    pass


_REF = re.compile(r"^(?P<name>[a-z][a-z0-9_]{0,62})(?:@(?P<version>[1-9][0-9]*))?$")


def parse_view_ref(ref: str) -> tuple[str, int | None]:
    """``name`` -> (name, None); ``name@3`` -> (name, 3)."""
    match = _REF.match(ref.strip())
    if not match:
        raise ObjectNotFoundError(f"'{ref}' is not a feature view reference (expected 'name' or 'name@version')")
    version = match.group("version")
    return match.group("name"), int(version) if version else None


@dataclass(frozen=True)
class ViewVersion:
    """One stored version of a feature view. Serving and workers key their data by (name, version)."""

    name: str
    version: int
    status: Status
    spec: FeatureView
    created_in: int
    """The registry version (apply) that created this view version."""

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ProjectSnapshot:
    """A project's current definitions and every live view version, read in one query."""

    project: str
    registry_version: int
    definition: ProjectDefinition
    views: tuple[ViewVersion, ...]
    """Live view versions, ordered by (name, version)."""

    def view(self, ref: str) -> ViewVersion:
        """``name`` (its latest live version) or ``name@version`` (that live version)."""
        name, version = parse_view_ref(ref)
        candidates = [v for v in self.views if v.name == name and (version is None or v.version == version)]
        if not candidates:
            raise ObjectNotFoundError(f"no live feature view '{ref}' in project '{self.project}'")
        return candidates[-1]


@dataclass(frozen=True)
class ChangeRecord:
    """One entry of an object's history: what one registry version did to it."""

    project: str
    registry_version: int
    revision: int
    kind: Kind
    name: str
    version: int
    action: str
    """add, readd, change, new_version, remove or retire."""
    breaking: bool
    changes: tuple[FieldChange, ...]
    created_at: datetime
    actor: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            "registry_version": self.registry_version,
            "revision": self.revision,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "action": self.action,
            "breaking": self.breaking,
            "changes": [change.to_json() for change in self.changes],
            "created_at": self.created_at.isoformat(),
            "actor": self.actor,
            "message": self.message,
        }


@dataclass(frozen=True)
class ApplyResult:
    project: str
    registry_version: int
    """The registry version after the apply (unchanged when nothing changed)."""
    plan: Plan
    applied: bool

    def to_json(self) -> dict[str, Any]:
        return {"applied": self.applied, "registry_version": self.registry_version, **self.plan.to_json()}


@dataclass(frozen=True)
class VersionInfo:
    """A view version as the catalog shows it (any status)."""

    name: str
    version: int
    status: Status
    spec: dict[str, Any]
    created_in: int
    created_at: datetime
    updated_in: int

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "status": self.status,
            "created_in": self.created_in,
            "updated_in": self.updated_in,
            "created_at": self.created_at.isoformat(),
        }
