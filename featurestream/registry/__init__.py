"""The versioned registry of definitions (PostgreSQL) and the catalog built on it.

Read API for the stream worker, serving and offline code::

    registry = Registry(postgres_url)            # or Registry(pool=psycopg_pool.ConnectionPool(...))
    snapshot = registry.snapshot("shop")         # definitions + every live view version, one query
    snapshot.view("user_txn")                    # latest live version; "user_txn@1" for that version
    registry.live_views("shop")                  # [ViewVersion(name, version, status, spec, created_in)]
    registry.registry_version("shop")            # cheap poll: changes whenever anything is applied

Data keyed per view version uses ``(ViewVersion.name, ViewVersion.version)``; versions are ints
from 1 per view. See docs/registry.md.
"""

from __future__ import annotations

from featurestream.registry.diff import FieldChange, ObjectChange, Plan
from featurestream.registry.records import (
    ApplyResult,
    ChangeRecord,
    InvalidDefinitionError,
    ObjectNotFoundError,
    ProjectNotFoundError,
    ProjectSnapshot,
    RegistryError,
    RetireError,
    ViewVersion,
    parse_view_ref,
)
from featurestream.registry.store import Registry

__all__ = [
    "ApplyResult",
    "ChangeRecord",
    "FieldChange",
    "InvalidDefinitionError",
    "ObjectChange",
    "ObjectNotFoundError",
    "Plan",
    "ProjectNotFoundError",
    "ProjectSnapshot",
    "Registry",
    "RegistryError",
    "RetireError",
    "ViewVersion",
    "parse_view_ref",
]
