"""The offline store in PostgreSQL (TimescaleDB hypertables when available).

Batched writes: rows are COPYed into a temporary table, then inserted with
``ON CONFLICT DO NOTHING`` on (partition, offset, event_time), which makes replays harmless.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from featurestream.definitions.models import FeatureView, Source
from featurestream.storage.offline.base import ArchivedEvent, FeatureRow
from featurestream.storage.offline.layout import (
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


class PostgresOfflineStore:
    def __init__(self, url: str, *, use_timescale: bool | None = None) -> None:
        self._url = url
        self._conn = psycopg.connect(url, autocommit=True)
        if use_timescale is None:
            use_timescale = timescale_available(self._conn)
        if use_timescale:
            self._conn.execute("create extension if not exists timescaledb")
        self.partitioner = Partitioner(use_timescale)
        self._conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(SCHEMA)))
        self._source_columns: dict[str, list[tuple[str, str]]] = {}
        self._view_columns: dict[tuple[str, int], tuple[list[str], list[str]]] = {}

    @property
    def connection(self) -> psycopg.Connection:
        return self._conn

    def reconnect(self) -> None:
        """A new connection after a failure (a PostgreSQL restart, say); tables stay as they are."""
        try:
            self._conn.close()
        except psycopg.Error:
            pass
        self._conn = psycopg.connect(self._url, autocommit=True)

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
        table = table_name("raw", source.name)
        fields = self._source_columns[source.name]
        names = ["event_time", "arrival_time", "kafka_partition", "kafka_offset", *[name for name, _ in fields]]
        timestamp_fields = {name for name, kind in fields if kind == "timestamp"}
        rows = [
            (
                _ts(e.event_time_ms),
                _ts(e.arrival_ms),
                e.partition,
                e.offset,
                *[
                    _ts(e.fields[name]) if name in timestamp_fields and e.fields.get(name) is not None else e.fields.get(name)
                    for name, _ in fields
                ],
            )
            for e in events
        ]
        return self._copy_upsert(table, names, rows, {day_of(e.event_time_ms) for e in events})

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
        self._view_columns[(view.name, version)] = (list(key_names), [n for n, _ in feature_types])

    def write_feature_rows(self, view: FeatureView, version: int, rows: Sequence[FeatureRow]) -> int:
        if not rows:
            return 0
        table = table_name("hist", view.name, version)
        key_names, feature_names = self._view_columns[(view.name, version)]
        names = [*key_names, "event_time", "kafka_partition", "kafka_offset", *feature_names]
        values = [
            (*row.entity_key, _ts(row.event_time_ms), row.partition, row.offset, *[row.values.get(n) for n in feature_names])
            for row in rows
        ]
        return self._copy_upsert(table, names, values, {day_of(r.event_time_ms) for r in rows})

    # ------------------------------------------------------------ shared

    def _copy_upsert(self, table: str, names: list[str], rows: list[tuple[Any, ...]], days: set[Any]) -> int:
        column_list = sql.SQL(", ").join(map(sql.Identifier, names))
        staging = sql.Identifier(f"stage_{table}"[:63])
        with self._conn.transaction():
            self.partitioner.ensure_days(self._conn, table, days)
            self._conn.execute(
                sql.SQL("create temporary table if not exists {} (like {} including defaults) on commit delete rows").format(
                    staging, qualified(table)
                )
            )
            with self._conn.cursor() as cursor:
                with cursor.copy(sql.SQL("copy {} ({}) from stdin").format(staging, column_list)) as copy:
                    for row in rows:
                        copy.write_row(row)
                cursor.execute(
                    sql.SQL("insert into {} ({}) select {} from {} on conflict do nothing").format(
                        qualified(table), column_list, column_list, staging
                    )
                )
                return cursor.rowcount

    def apply_retention(self, source_or_view_table: str, keep: timedelta) -> list[str]:
        with self._conn.transaction():
            return self.partitioner.apply_retention(self._conn, source_or_view_table, keep, datetime.now(tz=UTC))

    def close(self) -> None:
        self._conn.close()
