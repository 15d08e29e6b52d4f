"""The registry in PostgreSQL: plan, apply and retire (writes) and the read API other code uses.

Writes to one project are serialised by a transaction-scoped advisory lock: an apply locks, reads
the current objects, computes the plan and writes it in one transaction, so concurrent applies of
the same project run one after the other and each sees the previous one's result.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from featurestream.definitions.models import FeatureView, ProjectDefinition
from featurestream.definitions.validate import cross_check
from featurestream.registry.catalog import CatalogData
from featurestream.registry.diff import (
    CurrentObject,
    FieldChange,
    Kind,
    ObjectChange,
    Plan,
    compute_plan,
)
from featurestream.registry.records import (
    ApplyResult,
    ChangeRecord,
    InvalidDefinitionError,
    ObjectNotFoundError,
    ProjectNotFoundError,
    ProjectSnapshot,
    RetireError,
    VersionInfo,
    ViewVersion,
    parse_view_ref,
)
from featurestream.registry.schema import LOCK_CLASS, SCHEMA, ensure_schema
from featurestream.registry.usage import feature_usage

Row = dict[str, Any]
Conn = psycopg.Connection[Row]

_SNAPSHOT_SQL = f"""
select p.registry_version, p.definition,
       coalesce((select jsonb_agg(jsonb_build_object('name', o.name, 'version', o.version,
                                                     'status', o.status, 'spec', o.spec,
                                                     'created_in', o.created_in)
                                  order by o.name, o.version)
                 from {SCHEMA}.objects o
                 where o.project = p.project and o.kind = 'feature_view' and o.status = 'live'),
                '[]'::jsonb) as views
from {SCHEMA}.projects p
where p.project = %s
"""


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _check(definition: ProjectDefinition) -> None:
    """Refuse definitions whose objects do not fit together (the loader checks the same)."""
    problems = cross_check(definition)
    if problems:
        lines = [f"  {section}[{getattr(definition, section)[index].name}]: {message}"
                 for section, index, _, message in problems]
        raise InvalidDefinitionError("the definitions do not fit together:\n" + "\n".join(lines))


def _view_version(row: Row) -> ViewVersion:
    return ViewVersion(
        name=row["name"],
        version=row["version"],
        status=row["status"],
        spec=FeatureView.model_validate(row["spec"]),
        created_in=row["created_in"],
    )


class Registry:
    """Versioned definitions of every project in one PostgreSQL database.

    ``Registry(url)`` opens a connection per call; pass ``pool=`` to share a psycopg pool (serving).
    The tables are created on first use.
    """

    def __init__(self, conninfo: str | None = None, *, pool: ConnectionPool[Any] | None = None) -> None:
        if (conninfo is None) == (pool is None):
            raise ValueError("give either a connection string or a pool")
        self._conninfo = conninfo
        self._pool = pool
        self._schema_ready = False

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        """A connection with dict rows and the registry schema in place."""
        if self._pool is not None:
            with self._pool.connection() as pooled:
                conn = cast(Conn, pooled)
                conn.row_factory = dict_row
                self._ready(conn)
                yield conn
        else:
            with psycopg.connect(cast(str, self._conninfo), row_factory=dict_row) as conn:
                self._ready(conn)
                yield conn

    def _ready(self, conn: Conn) -> None:
        if not self._schema_ready:
            ensure_schema(conn)
            self._schema_ready = True

    # ------------------------------------------------------------ writes

    def plan(self, definition: ProjectDefinition) -> Plan:
        """What ``apply(definition)`` would change now; changes nothing."""
        _check(definition)
        with self.connection() as conn, conn.transaction():
            return compute_plan(definition.project.name, self._current(conn, definition.project.name),
                                definition)

    def apply(self, definition: ProjectDefinition, *, actor: str | None = None, message: str = "") -> ApplyResult:
        """Store the definition as a new registry version, in one transaction; a no-op if nothing changed."""
        _check(definition)
        project = definition.project.name
        with self.connection() as conn, conn.transaction():
            head = self._lock(conn, project)
            plan = compute_plan(project, self._current(conn, project), definition)
            if plan.is_empty:
                return ApplyResult(project, head, plan, applied=False)
            version = head + 1
            spec = definition.model_dump(mode="json")
            conn.execute(
                f"insert into {SCHEMA}.applies (project, registry_version, operation, actor, message, "
                "summary, definition) values (%s, %s, 'apply', %s, %s, %s, %s)",
                (project, version, actor if actor is not None else _default_actor(), message,
                 Jsonb(plan.summary()), Jsonb(spec)),
            )
            revisions = self._revisions(conn, project)
            for change in plan.changes:
                revision = revisions.get((change.kind, change.name), 0) + 1
                self._write(conn, project, version, revision, change)
            conn.execute(
                f"update {SCHEMA}.projects set registry_version = %s, definition = %s, updated_at = now() "
                "where project = %s",
                (version, Jsonb(spec), project),
            )
            return ApplyResult(project, version, plan, applied=True)

    def retire(self, project: str, view: str, version: int, *, actor: str | None = None,
               message: str = "") -> int:
        """Retire one live version of a feature view; returns the new registry version.

        The latest version of a view still in the definitions cannot be retired: remove the view
        from the definitions (or change it) and apply instead.
        """
        with self.connection() as conn, conn.transaction():
            head = self._lock(conn, project, create=False)
            rows = conn.execute(
                f"select version, status from {SCHEMA}.objects where project = %s "
                "and kind = 'feature_view' and name = %s order by version",
                (project, view),
            ).fetchall()
            if not rows:
                raise ObjectNotFoundError(f"no feature view '{view}' in project '{project}'")
            found = next((row for row in rows if row["version"] == version), None)
            if found is None:
                known = ", ".join(str(row["version"]) for row in rows)
                raise RetireError(f"feature view '{view}' has no version {version} (versions: {known})")
            if found["status"] != "live":
                raise RetireError(f"{view}@{version} is already {found['status']}")
            if version == rows[-1]["version"]:
                raise RetireError(
                    f"{view}@{version} is the current version of '{view}': only older versions can be "
                    "retired (remove the view from the definitions and apply to stop it)"
                )
            new_head = head + 1
            conn.execute(
                f"insert into {SCHEMA}.applies (project, registry_version, operation, actor, message, summary) "
                "values (%s, %s, 'retire', %s, %s, %s)",
                (project, new_head, actor if actor is not None else _default_actor(), message,
                 Jsonb({"retired": f"{view}@{version}"})),
            )
            conn.execute(
                f"update {SCHEMA}.objects set status = 'retired', updated_in = %s, updated_at = now() "
                "where project = %s and kind = 'feature_view' and name = %s and version = %s",
                (new_head, project, view, version),
            )
            revision = self._revisions(conn, project).get(("feature_view", view), 0) + 1
            conn.execute(
                f"insert into {SCHEMA}.changes (project, kind, name, revision, registry_version, version, "
                "action, diff) values (%s, 'feature_view', %s, %s, %s, %s, 'retire', %s)",
                (project, view, revision, new_head, version,
                 Jsonb([FieldChange("status", "live", "retired", False).to_json()])),
            )
            conn.execute(
                f"update {SCHEMA}.projects set registry_version = %s, updated_at = now() where project = %s",
                (new_head, project),
            )
            return new_head

    def _lock(self, conn: Conn, project: str, *, create: bool = True) -> int:
        """Take the project's write lock; returns its registry version (creating the project row)."""
        conn.execute("select pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_CLASS, project))
        if create:
            conn.execute(
                f"insert into {SCHEMA}.projects (project) values (%s) on conflict do nothing", (project,)
            )
        row = conn.execute(
            f"select registry_version from {SCHEMA}.projects where project = %s", (project,)
        ).fetchone()
        if row is None:
            raise ProjectNotFoundError(f"no project '{project}' in the registry")
        return int(row["registry_version"])

    def _current(self, conn: Conn, project: str) -> dict[tuple[Kind, str], CurrentObject]:
        rows = conn.execute(
            f"select distinct on (kind, name) kind, name, version, status, spec, upstream "
            f"from {SCHEMA}.objects where project = %s order by kind, name, version desc",
            (project,),
        ).fetchall()
        return {
            (row["kind"], row["name"]): CurrentObject(
                row["kind"], row["name"], row["version"], row["status"], row["spec"], row["upstream"]
            )
            for row in rows
        }

    def _revisions(self, conn: Conn, project: str) -> dict[tuple[str, str], int]:
        rows = conn.execute(
            f"select kind, name, max(revision) as revision from {SCHEMA}.changes where project = %s "
            "group by kind, name",
            (project,),
        ).fetchall()
        return {(row["kind"], row["name"]): int(row["revision"]) for row in rows}

    def _write(self, conn: Conn, project: str, registry_version: int, revision: int,
               change: ObjectChange) -> None:
        key = (project, change.kind, change.name)
        if change.action == "remove":
            conn.execute(
                f"update {SCHEMA}.objects set status = 'removed', updated_in = %s, updated_at = now() "
                "where project = %s and kind = %s and name = %s and status = 'live'",
                (registry_version, *key),
            )
            action = "remove"
        elif change.creates_version:
            conn.execute(
                f"insert into {SCHEMA}.objects (project, kind, name, version, status, spec, upstream, "
                "created_in, updated_in) values (%s, %s, %s, %s, 'live', %s, %s, %s, %s)",
                (*key, change.new_version, Jsonb(change.spec), Jsonb(change.upstream),
                 registry_version, registry_version),
            )
            action = "readd" if change.readded else ("add" if change.action == "add" else "new_version")
        else:
            conn.execute(
                f"update {SCHEMA}.objects set spec = %s, upstream = %s, status = 'live', updated_in = %s, "
                "updated_at = now() where project = %s and kind = %s and name = %s and version = %s",
                (Jsonb(change.spec), Jsonb(change.upstream), registry_version, *key, change.new_version),
            )
            action = "readd" if change.readded else "change"
        conn.execute(
            f"insert into {SCHEMA}.changes (project, kind, name, revision, registry_version, version, "
            "action, breaking, diff, spec) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (*key, revision, registry_version, change.new_version, action, change.breaking,
             Jsonb([f.to_json() for f in change.fields]),
             Jsonb(change.spec) if change.spec is not None else None),
        )

    # ------------------------------------------------------------ reads

    def projects(self) -> list[str]:
        with self.connection() as conn:
            rows = conn.execute(
                f"select project from {SCHEMA}.projects where definition is not null order by project"
            ).fetchall()
            return [row["project"] for row in rows]

    def registry_version(self, project: str) -> int:
        """The project's registry version (0 if never applied): a cheap poll for changes."""
        with self.connection() as conn:
            row = conn.execute(
                f"select registry_version from {SCHEMA}.projects where project = %s", (project,)
            ).fetchone()
            return int(row["registry_version"]) if row else 0

    def snapshot(self, project: str) -> ProjectSnapshot:
        """The current definitions and all live view versions of a project, in one query."""
        with self.connection() as conn:
            row = conn.execute(_SNAPSHOT_SQL, (project,)).fetchone()
        if row is None or row["definition"] is None:
            raise ProjectNotFoundError(f"no project '{project}' in the registry (apply its definitions first)")
        return ProjectSnapshot(
            project=project,
            registry_version=row["registry_version"],
            definition=ProjectDefinition.model_validate(row["definition"]),
            views=tuple(_view_version(view) for view in row["views"]),
        )

    def load_project(self, project: str) -> ProjectDefinition:
        """The project's current definitions (as last applied)."""
        with self.connection() as conn:
            row = conn.execute(
                f"select definition from {SCHEMA}.projects where project = %s", (project,)
            ).fetchone()
        if row is None or row["definition"] is None:
            raise ProjectNotFoundError(f"no project '{project}' in the registry (apply its definitions first)")
        return ProjectDefinition.model_validate(row["definition"])

    def live_views(self, project: str) -> list[ViewVersion]:
        """Every live feature view version of a project, ordered by (name, version)."""
        with self.connection() as conn:
            rows = conn.execute(
                f"select name, version, status, spec, created_in from {SCHEMA}.objects where project = %s "
                "and kind = 'feature_view' and status = 'live' order by name, version",
                (project,),
            ).fetchall()
        return [_view_version(row) for row in rows]

    def view(self, project: str, ref: str) -> ViewVersion:
        """``name``: its latest live version; ``name@version``: that version, whatever its status."""
        name, version = parse_view_ref(ref)
        with self.connection() as conn:
            if version is None:
                row = conn.execute(
                    f"select name, version, status, spec, created_in from {SCHEMA}.objects where project = %s "
                    "and kind = 'feature_view' and name = %s and status = 'live' order by version desc limit 1",
                    (project, name),
                ).fetchone()
            else:
                row = conn.execute(
                    f"select name, version, status, spec, created_in from {SCHEMA}.objects where project = %s "
                    "and kind = 'feature_view' and name = %s and version = %s",
                    (project, name, version),
                ).fetchone()
        if row is None:
            raise ObjectNotFoundError(f"no {'live ' if version is None else ''}feature view '{ref}' "
                                      f"in project '{project}'")
        return _view_version(row)

    def view_versions(self, project: str) -> dict[str, list[VersionInfo]]:
        """Every version of every feature view (any status), for the catalog."""
        with self.connection() as conn:
            return self._view_versions(conn, project)

    def _view_versions(self, conn: Conn, project: str) -> dict[str, list[VersionInfo]]:
        rows = conn.execute(
            f"select name, version, status, spec, created_in, created_at, updated_in from {SCHEMA}.objects "
            "where project = %s and kind = 'feature_view' order by name, version",
            (project,),
        ).fetchall()
        out: dict[str, list[VersionInfo]] = {}
        for row in rows:
            out.setdefault(row["name"], []).append(VersionInfo(**row))
        return out

    def catalog_data(self, project: str) -> CatalogData:
        """Definitions, every view version and read counts of a project (one consistent read)."""
        with self.connection() as conn, conn.transaction():
            conn.execute("set transaction isolation level repeatable read")
            row = conn.execute(
                f"select registry_version, definition from {SCHEMA}.projects where project = %s", (project,)
            ).fetchone()
            if row is None or row["definition"] is None:
                raise ProjectNotFoundError(f"no project '{project}' in the registry (apply its definitions first)")
            return CatalogData(
                definition=ProjectDefinition.model_validate(row["definition"]),
                versions=self._view_versions(conn, project),
                usage=feature_usage(conn, project),
                registry_version=row["registry_version"],
            )

    def history(self, project: str, name: str, kind: Kind | None = None) -> list[ChangeRecord]:
        """Every change to objects called ``name`` (of ``kind`` if given), oldest first."""
        with self.connection() as conn:
            rows = conn.execute(
                f"select c.*, a.created_at, a.actor, a.message from {SCHEMA}.changes c "
                f"join {SCHEMA}.applies a using (project, registry_version) "
                "where c.project = %s and c.name = %s and (%s::text is null or c.kind = %s) "
                "order by c.kind, c.revision",
                (project, name, kind, kind),
            ).fetchall()
        return [
            ChangeRecord(
                project=project, registry_version=row["registry_version"], revision=row["revision"],
                kind=row["kind"], name=row["name"], version=row["version"], action=row["action"],
                breaking=row["breaking"], changes=tuple(FieldChange.from_json(c) for c in row["diff"]),
                created_at=row["created_at"], actor=row["actor"], message=row["message"],
            )
            for row in rows
        ]
