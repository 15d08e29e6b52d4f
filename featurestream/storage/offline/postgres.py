"""The offline store in PostgreSQL (TimescaleDB hypertables when available).

Batched writes in binary COPY format. The common case (nothing of the batch stored yet) COPYs
straight into the table; if that meets a row already stored (a replay after a crash or a
rebalance), the COPY is rolled back (its own transaction, a savepoint, or the caller's whole
transaction with ``assume_new``) and the batch goes the idempotent way: COPY into a temporary
table, then ``INSERT ... ON CONFLICT DO NOTHING`` on the primary key (which holds the Kafka
partition and offset), so replays store nothing twice. Event and arrival times
travel as epoch milliseconds and are written as binary ``timestamptz`` without a Python
``datetime`` per value.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.adapt import Dumper
from psycopg.pq import Format, TransactionStatus
from psycopg.types.datetime import DatetimeBinaryDumper

from featurestream.definitions.models import FeatureView, Source
from featurestream.storage.offline.base import ArchivedEvent, FeatureRow
from featurestream.storage.offline.layout import (
    DAY_MS,
    SCHEMA,
    SQL_TYPES,
    Partitioner,
    day_of,
    qualified,
    table_name,
    timescale_available,
)


def _ts(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


_PG_EPOCH_MS = 946_684_800_000  # 2000-01-01, where PostgreSQL's timestamps count from
_PACK_I64 = struct.Struct(">q").pack
_COPY_TYPES = {
    "string": "text",
    "int64": "int8",
    "float64": "float8",
    "bool": "bool",
    "timestamp": "timestamptz",
}
"""Binary COPY type of each value type; must agree with ``layout.SQL_TYPES``."""


class _EpochMs(int):
    """Marker type only: registering the dumper below for it binds the dumper to ``timestamptz``."""


class _TimestampBinaryDumper(Dumper):
    """Binary ``timestamptz`` of epoch milliseconds (an int) or of an aware ``datetime``."""

    format = Format.BINARY
    oid = psycopg.postgres.types["timestamptz"].oid

    def __init__(self, cls: type, context: Any = None) -> None:
        super().__init__(cls, context)
        self._datetime = DatetimeBinaryDumper(datetime, context)

    def dump(self, obj: Any) -> bytes:
        if type(obj) is int:
            return _PACK_I64((obj - _PG_EPOCH_MS) * 1000)
        return self._datetime.dump(obj)  # type: ignore[return-value]




class PostgresOfflineStore:
    def __init__(self, url: str, *, use_timescale: bool | None = None) -> None:
        self._url = url
        self._conn = self._connect()
        if use_timescale is None:
            use_timescale = timescale_available(self._conn)
        if use_timescale:
            self._conn.execute("create extension if not exists timescaledb")
        self.partitioner = Partitioner(use_timescale)
        self._conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(SCHEMA)))
        self._source_columns: dict[str, list[tuple[str, str]]] = {}
        self._view_columns: dict[tuple[str, int], tuple[list[str], list[str], list[str]]] = {}

    @property
    def connection(self) -> psycopg.Connection:
        return self._conn

    @property
    def url(self) -> str:
        return self._url

    def reconnect(self) -> None:
        """A new connection after a failure (a PostgreSQL restart, say); tables stay as they are."""
        try:
            self._conn.close()
        except psycopg.Error:
            pass
        self._conn = self._connect()
        self.forget_partitions()

    def forget_partitions(self) -> None:
        """After a rollback: day partitions created in the rolled back transaction are gone, so
        check again (``create ... if not exists``) on the next write of each day."""
        self.partitioner = Partitioner(self.partitioner.use_timescale)

    def _connect(self) -> psycopg.Connection:
        """A commit here gates the worker's Kafka acknowledgement, so it must survive a crash of
        the server even where the server defaults to ``synchronous_commit=off`` (the dev stack
        does): that setting lets a kill -9 of PostgreSQL lose commits it already acknowledged."""
        conn = psycopg.connect(self._url, autocommit=True)
        conn.execute("set synchronous_commit to on")
        # Binds the ms-or-datetime dumper to timestamptz in this connection's COPYs (set_types
        # finds dumpers by oid); query parameters pick dumpers by Python type, so they keep theirs.
        conn.adapters.register_dumper(_EpochMs, _TimestampBinaryDumper)
        self._staging: set[str] = set()  # temporary tables this connection has
        return conn

    # ------------------------------------------------------------ raw event archive

    def ensure_source(self, source: Source, key_columns: Sequence[Sequence[str]]) -> None:
        table = table_name("raw", source.name)
        fields: list[tuple[str, str]] = [(f.name, f.type) for f in source.fields if f.name != source.event_time_field]
        columns = sql.SQL(", ").join(
            [
                sql.SQL("event_time timestamptz not null"),
                sql.SQL("arrival_time timestamptz not null"),
                sql.SQL("kafka_partition integer not null"),
                sql.SQL("kafka_offset bigint not null"),
                *[sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(SQL_TYPES[kind])) for name, kind in fields],
                sql.SQL("primary key (kafka_partition, kafka_offset, event_time)"),
            ]
        )
        with self._conn.transaction():
            self._conn.execute("select pg_advisory_xact_lock(hashtext(%s))", [f"{SCHEMA}.{table}"])
            self.partitioner.create_parent(self._conn, table, columns)
            for keys in key_columns:
                index = table_name("ix", f"{table}__{'_'.join(keys)}")
                self._conn.execute(
                    sql.SQL("create index if not exists {} on {} ({}, event_time)").format(
                        sql.Identifier(index), qualified(table), sql.SQL(", ").join(map(sql.Identifier, keys))
                    )
                )
        self._source_columns[source.name] = fields

    def archive_events(self, source: Source, events: Sequence[ArchivedEvent]) -> int:
        if not events:
            return 0
        fields = self._source_columns[source.name]
        names = [name for name, _ in fields]
        rows = [
            (e.event_time_ms, e.arrival_ms, e.partition, e.offset, *[e.fields.get(name) for name in names])
            for e in events
        ]
        return self.archive_rows(source, rows)

    def archive_rows(self, source: Source, rows: Sequence[tuple[Any, ...]], *, assume_new: bool = False) -> int:
        """``archive_events`` of rows already in column order: event time ms, arrival ms, Kafka
        partition, offset, then the source's fields except the event time, in declared order
        (timestamps as epoch ms). The stream worker builds these without an object per event.

        ``assume_new`` (inside the caller's transaction only): COPY without a savepoint; a row
        stored before raises ``UniqueViolation`` and aborts the transaction, and the caller
        retries the batch in a new one without ``assume_new``."""
        if not rows:
            return 0
        table = table_name("raw", source.name)
        fields = self._source_columns[source.name]
        names = ["event_time", "arrival_time", "kafka_partition", "kafka_offset", *[name for name, _ in fields]]
        types = ["timestamptz", "timestamptz", "int4", "int8", *[_COPY_TYPES[kind] for _, kind in fields]]
        return self._copy_upsert(table, names, types, rows, {row[0] // DAY_MS for row in rows}, assume_new)

    def source_columns(self, source: Source) -> list[str]:
        """The source's fields as ``archive_rows`` orders them (after the four fixed columns)."""
        return [name for name, _ in self._source_columns[source.name]]

    def read_events(
        self, source: Source, key_columns: Sequence[str], keys: Sequence[tuple[Any, ...]] | None, end_ms: int | None
    ) -> Iterator[tuple[tuple[Any, ...], ArchivedEvent]]:
        table = table_name("raw", source.name)
        fields = [f for f in source.fields if f.name != source.event_time_field]
        key_list = sql.SQL(", ").join(map(sql.Identifier, key_columns))
        select = sql.SQL(
            "select event_time, arrival_time, kafka_partition, kafka_offset, {} from {} where true"
        ).format(sql.SQL(", ").join(sql.Identifier(f.name) for f in fields), qualified(table))
        params: list[Any] = []
        if keys is not None:
            select += sql.SQL(" and ({}) = any(%s)").format(key_list) if len(key_columns) > 1 else sql.SQL(
                " and {} = any(%s)"
            ).format(sql.Identifier(key_columns[0]))
            params.append([k[0] for k in keys] if len(key_columns) == 1 else list(keys))
        if end_ms is not None:
            select += sql.SQL(" and event_time <= %s")
            params.append(_ts(end_ms))
        select += sql.SQL(" order by {}, event_time, kafka_partition, kafka_offset").format(key_list)
        positions = {f.name: i + 4 for i, f in enumerate(fields)}
        with self._conn.cursor(name=f"read_{table}") as cursor, self._conn.transaction():
            cursor.itersize = 10_000
            cursor.execute(select, params)
            for row in cursor:
                values: dict[str, Any] = {}
                for f in fields:
                    value = row[positions[f.name]]
                    values[f.name] = _ms(value) if f.type == "timestamp" and value is not None else value
                event_ms = _ms(row[0])
                values[source.event_time_field] = event_ms
                key = tuple(values[k] for k in key_columns)
                yield key, ArchivedEvent(row[2], row[3], event_ms, _ms(row[1]), values)

    # ------------------------------------------------------------ feature history

    def ensure_view(self, view: FeatureView, version: int, key_names: Sequence[str], dtypes: dict[str, str]) -> None:
        table = table_name("hist", view.name, version)
        key_types = [(name, dtypes[name]) for name in key_names]
        feature_types = [(f.name, dtypes[f.name]) for f in view.features]
        columns = sql.SQL(", ").join(
            [
                *[sql.SQL("{} {} not null").format(sql.Identifier(n), sql.SQL(SQL_TYPES[t])) for n, t in key_types],
                sql.SQL("event_time timestamptz not null"),
                sql.SQL("kafka_partition integer not null"),
                sql.SQL("kafka_offset bigint not null"),
                *[sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(SQL_TYPES[t])) for n, t in feature_types],
                sql.SQL("primary key ({}, event_time, kafka_partition, kafka_offset)").format(
                    sql.SQL(", ").join(map(sql.Identifier, key_names))
                ),
            ]
        )
        with self._conn.transaction():
            self._conn.execute("select pg_advisory_xact_lock(hashtext(%s))", [f"{SCHEMA}.{table}"])
            self.partitioner.create_parent(self._conn, table, columns)
            for name, type_ in feature_types:  # a feature added to the view since (same version)
                self._conn.execute(sql.SQL("alter table {} add column if not exists {} {}").format(
                    qualified(table), sql.Identifier(name), sql.SQL(SQL_TYPES[type_])))
        types = [
            *[_COPY_TYPES[t] for _, t in key_types], "timestamptz", "int4", "int8",
            *[_COPY_TYPES[t] for _, t in feature_types],
        ]  # fmt: skip
        self._view_columns[(view.name, version)] = (list(key_names), [n for n, _ in feature_types], types)

    def write_feature_rows(
        self, view: FeatureView, version: int, rows: Sequence[FeatureRow], *, assume_new: bool = False
    ) -> int:
        """Store the rows not stored yet; ``assume_new`` as for ``archive_rows``."""
        if not rows:
            return 0
        table = table_name("hist", view.name, version)
        key_names, feature_names, types = self._view_columns[(view.name, version)]
        names = [*key_names, "event_time", "kafka_partition", "kafka_offset", *feature_names]
        values = [
            (*row.entity_key, row.event_time_ms, row.partition, row.offset, *[row.values.get(n) for n in feature_names])
            for row in rows
        ]
        return self._copy_upsert(table, names, types, values, {r.event_time_ms // DAY_MS for r in rows}, assume_new)

    # ------------------------------------------------------------ shared

    def _copy_upsert(
        self,
        table: str,
        names: list[str],
        types: list[str],
        rows: Sequence[tuple[Any, ...]],
        days: set[int],
        assume_new: bool = False,
    ) -> int:
        """Store the rows not stored yet; return how many were new. Timestamps as epoch ms or datetimes.

        Outside a transaction: a COPY in a transaction of its own, and if it meets a stored row,
        the idempotent way in another. Inside the caller's transaction: the COPY in a savepoint,
        or with ``assume_new`` without one (the caller handles ``UniqueViolation``, which aborts
        its transaction), which saves two round trips per table.
        """
        conn = self._conn
        column_list = sql.SQL(", ").join(map(sql.Identifier, names))
        day_set = {day_of(d * DAY_MS) for d in days}
        if conn.info.transaction_status != TransactionStatus.IDLE:
            self.partitioner.ensure_days(conn, table, day_set)
            if assume_new:
                with conn.cursor() as cursor:
                    self._copy(cursor, qualified(table), column_list, types, rows)
                return len(rows)
            try:
                with conn.transaction(), conn.cursor() as cursor:  # a savepoint: the COPY may meet a replay
                    self._copy(cursor, qualified(table), column_list, types, rows)
                return len(rows)
            except psycopg.errors.UniqueViolation:
                return self._insert_new(table, column_list, types, rows)
        try:
            with conn.transaction(), conn.cursor() as cursor:
                self.partitioner.ensure_days(conn, table, day_set)
                self._copy(cursor, qualified(table), column_list, types, rows)
            return len(rows)
        except psycopg.errors.UniqueViolation:
            self.forget_partitions()  # any created by the rolled back transaction are gone
            with conn.transaction():
                self.partitioner.ensure_days(conn, table, day_set)
                return self._insert_new(table, column_list, types, rows)

    def _insert_new(
        self, table: str, column_list: sql.Composable, types: list[str], rows: Sequence[tuple[Any, ...]]
    ) -> int:
        """The idempotent way: COPY into a temporary table, insert what the table lacks."""
        staging = f"stage_{table}"[:63]
        with self._conn.cursor() as cursor:
            if staging not in self._staging:
                cursor.execute(
                    sql.SQL(
                        "create temporary table if not exists {} (like {} including defaults) on commit delete rows"
                    ).format(sql.Identifier(staging), qualified(table))
                )
                self._staging.add(staging)
            self._copy(cursor, sql.Identifier(staging), column_list, types, rows)
            cursor.execute(
                sql.SQL("insert into {} ({}) select {} from {} on conflict do nothing").format(
                    qualified(table), column_list, column_list, sql.Identifier(staging)
                )
            )
            return cursor.rowcount

    @staticmethod
    def _copy(
        cursor: psycopg.Cursor[Any], target: sql.Composable, columns: sql.Composable, types: list[str],
        rows: Sequence[tuple[Any, ...]],
    ) -> None:
        with cursor.copy(sql.SQL("copy {} ({}) from stdin (format binary)").format(target, columns)) as copy:
            copy.set_types(types)
            write = copy.write_row
            for row in rows:
                write(row)

    def apply_retention(self, source_or_view_table: str, keep: timedelta) -> list[str]:
        with self._conn.transaction():
            return self.partitioner.apply_retention(self._conn, source_or_view_table, keep, datetime.now(tz=UTC))

    def close(self) -> None:
        self._conn.close()
