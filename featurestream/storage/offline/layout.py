"""Names and column types of the offline tables, and time partitioning.

TimescaleDB is used when the extension is available (hypertables with daily chunks and an
optional retention policy); otherwise native range partitions of one day each, created before
a write needs them, and dropped by ``apply_retention``. See docs/storage.md.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg import sql

SCHEMA = "fs_offline"
SQL_TYPES = {
    "string": "text",
    "int64": "bigint",
    "float64": "double precision",
    "bool": "boolean",
    "timestamp": "timestamptz",
}
MAX_IDENTIFIER = 63
DAY_MS = 86_400_000


def table_name(kind: str, name: str, version: int | None = None) -> str:
    """``raw__transactions``, ``hist__user_transactions__v2``; hashed when longer than PostgreSQL allows."""
    full = f"{kind}__{name}" + (f"__v{version}" if version is not None else "")
    if len(full) <= MAX_IDENTIFIER - 10:  # room for the partition suffix _pYYYYMMDD
        return full
    digest = hashlib.sha1(full.encode()).hexdigest()[:10]
    return f"{full[: MAX_IDENTIFIER - 22]}_{digest}"


def qualified(table: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(table))


def table_exists(conn: psycopg.Connection, table: str) -> bool:
    """Whether ``fs_offline.{table}`` exists (``table`` as ``table_name`` gives it)."""
    row = conn.execute("select to_regclass(%s) is not null", [qualified(table).as_string(conn)]).fetchone()
    return bool(row and row[0])


def timescale_available(conn: psycopg.Connection) -> bool:
    row = conn.execute("select 1 from pg_available_extensions where name = 'timescaledb'").fetchone()
    return row is not None


def day_of(epoch_ms: int) -> date:
    return datetime.fromtimestamp(epoch_ms // DAY_MS * 86_400, tz=UTC).date()


class Partitioner:
    """Creates the time partitions a write needs; remembers which exist to stay off the hot path."""

    def __init__(self, use_timescale: bool) -> None:
        self.use_timescale = use_timescale
        self._known: set[tuple[str, date]] = set()

    def create_parent(self, conn: psycopg.Connection, table: str, columns: sql.Composable) -> None:
        if self.use_timescale:
            conn.execute(sql.SQL("create table if not exists {} ({})").format(qualified(table), columns))
            conn.execute(
                "select create_hypertable(%s, 'event_time', chunk_time_interval => interval '1 day', if_not_exists => true)",
                [f"{SCHEMA}.{table}"],
            )
        else:
            conn.execute(
                sql.SQL("create table if not exists {} ({}) partition by range (event_time)").format(
                    qualified(table), columns
                )
            )

    def ensure_days(self, conn: psycopg.Connection, table: str, days: set[date]) -> None:
        if self.use_timescale:
            return
        missing = [day for day in days if (table, day) not in self._known]
        if not missing:
            return
        # Serialise creation across workers: two CREATEs of the same range would conflict.
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", [f"{SCHEMA}.{table}"])
        for day in sorted(missing):
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            conn.execute(
                sql.SQL("create table if not exists {} partition of {} for values from ({}) to ({})").format(
                    qualified(f"{table}_p{day:%Y%m%d}"),
                    qualified(table),
                    sql.Literal(start),
                    sql.Literal(start + timedelta(days=1)),
                )
            )
            self._known.add((table, day))

    def apply_retention(self, conn: psycopg.Connection, table: str, keep: timedelta, now: datetime) -> list[str]:
        """Drop whole days older than ``now - keep``; return what was dropped."""
        cutoff = now - keep
        if self.use_timescale:
            conn.execute("select drop_chunks(%s, older_than => %s)", [f"{SCHEMA}.{table}", cutoff])
            return []
        rows = conn.execute(
            """select c.relname from pg_inherits i
               join pg_class c on c.oid = i.inhrelid join pg_class p on p.oid = i.inhparent
               join pg_namespace n on n.oid = p.relnamespace
               where n.nspname = %s and p.relname = %s""",
            [SCHEMA, table],
        ).fetchall()
        dropped = []
        for (name,) in rows:
            suffix = name.rsplit("_p", 1)[-1]
            if len(suffix) == 8 and suffix.isdigit():
                day_end = datetime.strptime(suffix, "%Y%m%d").replace(tzinfo=UTC) + timedelta(days=1)
                if day_end <= cutoff:
                    conn.execute(sql.SQL("drop table if exists {}").format(qualified(name)))
                    self._known = {k for k in self._known if k[0] != table or f"{k[1]:%Y%m%d}" != suffix}
                    dropped.append(name)
        return sorted(dropped)
