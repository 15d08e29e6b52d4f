"""The registry's tables, created on first use and migrated by numbered steps.

All tables live in the PostgreSQL schema ``featurestream_registry`` and are keyed by project
name, so several projects share one database. ``schema_version`` records the steps applied;
``ensure_schema`` runs the missing ones under an advisory lock, so concurrent first uses are safe.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import tuple_row

from featurestream.registry.records import SchemaVersionError

SCHEMA = "featurestream_registry"

LOCK_CLASS = 1179865671
"""First key of the registry's advisory locks ('FSRG'); the second is 0 for migrations or a project hash."""

_V1 = """
create schema if not exists featurestream_registry;

create table if not exists featurestream_registry.schema_version (
    version     integer primary key,
    description text not null,
    applied_at  timestamptz not null default now()
);

create table if not exists featurestream_registry.projects (
    project          text primary key,
    registry_version integer not null default 0,
    definition       jsonb,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now()
);

create table if not exists featurestream_registry.applies (
    project          text not null references featurestream_registry.projects (project),
    registry_version integer not null check (registry_version >= 1),
    operation        text not null check (operation in ('apply', 'retire')),
    actor            text not null default '',
    message          text not null default '',
    summary          jsonb not null default '{}'::jsonb,
    definition       jsonb,
    created_at       timestamptz not null default now(),
    primary key (project, registry_version)
);

create table if not exists featurestream_registry.objects (
    project     text not null references featurestream_registry.projects (project),
    kind        text not null check (kind in ('project', 'entity', 'source', 'feature_view',
                                              'feature_service', 'consumer')),
    name        text not null,
    version     integer not null check (version >= 1),
    status      text not null check (status in ('live', 'retired', 'removed')),
    spec        jsonb not null,
    upstream    jsonb not null default '{}'::jsonb,
    created_in  integer not null,
    updated_in  integer not null,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    primary key (project, kind, name, version),
    foreign key (project, created_in) references featurestream_registry.applies (project, registry_version),
    foreign key (project, updated_in) references featurestream_registry.applies (project, registry_version)
);
create index if not exists objects_live
    on featurestream_registry.objects (project, kind, name, version) where status = 'live';

create table if not exists featurestream_registry.changes (
    project          text not null,
    kind             text not null,
    name             text not null,
    revision         integer not null check (revision >= 1),
    registry_version integer not null,
    version          integer not null,
    action           text not null check (action in ('add', 'readd', 'change', 'new_version',
                                                     'remove', 'retire')),
    breaking         boolean not null default false,
    diff             jsonb not null default '[]'::jsonb,
    spec             jsonb,
    primary key (project, kind, name, revision),
    foreign key (project, registry_version) references featurestream_registry.applies (project, registry_version)
);
create index if not exists changes_by_registry_version
    on featurestream_registry.changes (project, registry_version);

-- Filled by the serving layer (featurestream.registry.usage.record_feature_usage); read by 'describe'.
create table if not exists featurestream_registry.feature_usage (
    project      text not null,
    view         text not null,
    version      integer not null,
    feature      text not null,
    client       text not null,
    reads        bigint not null default 0 check (reads >= 0),
    last_read_at timestamptz,
    primary key (project, view, version, feature, client)
);
"""

MIGRATIONS: tuple[tuple[int, str, str], ...] = ((1, "registry, history and feature usage tables", _V1),)
CURRENT_VERSION = MIGRATIONS[-1][0]


def _installed_version(conn: psycopg.Connection[Any]) -> int:
    with conn.cursor(row_factory=tuple_row) as cur:
        # A catalog query, not to_regclass(): after waiting on the lock, this backend's catalog
        # cache may not yet know the table another session just created.
        row = cur.execute(
            "select exists (select 1 from pg_catalog.pg_tables where schemaname = %s "
            "and tablename = 'schema_version')",
            (SCHEMA,),
        ).fetchone()
        if not row or not row[0]:
            return 0
        found = cur.execute(f"select coalesce(max(version), 0) from {SCHEMA}.schema_version").fetchone()
        return int(found[0]) if found else 0


def ensure_schema(conn: psycopg.Connection[Any]) -> int:
    """Create or migrate the registry tables; returns the schema version. Safe to call concurrently."""
    with conn.transaction():
        installed = _installed_version(conn)
    if installed == CURRENT_VERSION:
        return installed
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s, 0)", (LOCK_CLASS,))
        installed = _installed_version(conn)
        if installed > CURRENT_VERSION:
            raise SchemaVersionError(
                f"the registry database has schema version {installed}, newer than this featurestream "
                f"understands ({CURRENT_VERSION}): upgrade featurestream"
            )
        for version, description, ddl in MIGRATIONS:
            if version > installed:
                conn.execute(ddl)
                conn.execute(
                    f"insert into {SCHEMA}.schema_version (version, description) values (%s, %s) "
                    "on conflict (version) do nothing",
                    (version, description),
                )
    return CURRENT_VERSION
