"""Feature history of a feature view version computed from the raw event archive (backfill).

For every archived event of the view's source in the range, one row of the history table
``hist__{view}__v{version}``: the values of all the view's features right after that event
(``evaluate_history`` at the event's time, sequences = Kafka offsets: the same core, tiles and
tie-breaks as the stream worker). A row's values count every archived event of the entity up
to its time, late ones included, so a backfilled row is the value the entity *should* have
had then. Rows are keyed like the worker's (join keys, event time, partition, offset) and
written with ``ON CONFLICT DO NOTHING``: a row the worker already wrote, or an earlier run,
stays as it is.

Resumable: entities are processed in chunks in join-key order; each chunk's rows and the
last key done are committed in one transaction to ``fs_offline.backfill_progress`` (keyed by
view, version and range), so an interrupted run continues after the last committed chunk.
A finished range is not recomputed unless asked (``restart``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from featurestream.offline.rebuild import (
    OfflineView,
    Progress,
    close_stream,
    count_entities,
    entity_events,
    require_archive,
    time_filter,
)
from featurestream.storage.offline.base import FeatureRow
from featurestream.storage.offline.layout import SCHEMA, qualified, table_name
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.storage.online.redis_store import EntityKey

PROGRESS_TABLE = "backfill_progress"

_PROGRESS_DDL = sql.SQL(
    """create table if not exists {} (
        view text not null,
        version integer not null,
        range text not null,
        last_key jsonb,
        entities bigint not null default 0,
        rows_written bigint not null default 0,
        done boolean not null default false,
        started_at timestamptz not null default now(),
        updated_at timestamptz not null default now(),
        primary key (view, version, range)
    )"""
).format(qualified(PROGRESS_TABLE))


def range_label(start_ms: int | None, end_ms: int | None) -> str:
    """The progress key of a range: ``all``, ``1764230400000..``, ``..1764234000000``, ``a..b``."""
    if start_ms is None and end_ms is None:
        return "all"
    return f"{'' if start_ms is None else start_ms}..{'' if end_ms is None else end_ms}"


@dataclass
class BackfillStats:
    view: str
    version: int
    range: str
    entities: int = 0
    """Entities done by this run."""
    total_entities: int = 0
    """Entities with events in the range (those done by earlier runs included)."""
    resumed_after: list[Any] | None = None
    events: int = 0
    rows: int = 0
    """Rows computed by this run (one per event in the range)."""
    written: int = 0
    """Rows new to the table (the others were stored already)."""
    already_done: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "view": self.view,
            "version": self.version,
            "range": self.range,
            "entities": self.entities,
            "total_entities": self.total_entities,
            "resumed_after": self.resumed_after,
            "events_read": self.events,
            "rows": self.rows,
            "written": self.written,
            "already_done": self.already_done,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rows / self.seconds) if self.seconds else None,
        }


@dataclass(frozen=True)
class ProgressRow:
    last_key: list[Any] | None
    entities: int
    rows_written: int
    done: bool


def ensure_progress_table(store: PostgresOfflineStore) -> None:
    with store.connection.transaction():
        store.connection.execute("select pg_advisory_xact_lock(hashtext(%s))", [f"{SCHEMA}.{PROGRESS_TABLE}"])
        store.connection.execute(_PROGRESS_DDL)


def read_progress(store: PostgresOfflineStore, view: str, version: int, label: str) -> ProgressRow | None:
    row = store.connection.execute(
        sql.SQL("select last_key, entities, rows_written, done from {} where view = %s and version = %s "
                "and range = %s").format(qualified(PROGRESS_TABLE)),
        [view, version, label],
    ).fetchone()
    return None if row is None else ProgressRow(row[0], int(row[1]), int(row[2]), bool(row[3]))


def _save_progress(
    store: PostgresOfflineStore, view: str, version: int, label: str, last_key: Sequence[Any] | None,
    entities: int, written: int, done: bool,
) -> None:
    store.connection.execute(
        sql.SQL(
            """insert into {} as p (view, version, range, last_key, entities, rows_written, done)
               values (%s, %s, %s, %s::jsonb, %s, %s, %s)
               on conflict (view, version, range) do update set
                 last_key = coalesce(excluded.last_key, p.last_key),
                 entities = p.entities + excluded.entities,
                 rows_written = p.rows_written + excluded.rows_written,
                 done = excluded.done, updated_at = now()"""
        ).format(qualified(PROGRESS_TABLE)),
        [view, version, label, None if last_key is None else json.dumps(list(last_key)), entities, written, done],
    )


def reset_progress(store: PostgresOfflineStore, view: str, version: int, label: str) -> None:
    store.connection.execute(
        sql.SQL("delete from {} where view = %s and version = %s and range = %s").format(qualified(PROGRESS_TABLE)),
        [view, version, label],
    )


def entity_keys_after(
    store: PostgresOfflineStore, view: OfflineView, after: Sequence[Any] | None, limit: int,
    start_ms: int | None, end_ms: int | None,
) -> list[EntityKey]:
    """The next ``limit`` entities (in the database's key order) with an event in the range."""
    keys = view.key_fields
    key_list = sql.SQL(", ").join(map(sql.Identifier, keys))
    where, params = time_filter(keys, start_ms, end_ms)
    if after is not None:
        where = sql.SQL("{} and ({}) > ({})").format(
            where, key_list, sql.SQL(", ").join(sql.Placeholder() for _ in keys)
        )
        params += list(after)
    query = sql.SQL("select distinct {} from {} where {} order by {} limit %s").format(
        key_list, qualified(table_name("raw", view.source.name)), where, key_list
    )
    return [tuple(row) for row in store.connection.execute(query, [*params, limit]).fetchall()]


def history_rows(
    view: OfflineView, key: EntityKey, events: Sequence[Any], start_ms: int | None, end_ms: int | None
) -> list[FeatureRow]:
    """One row per event of the entity in [start, end]: the values right after it.

    ``events`` are the entity's archived events up to ``end`` (earlier ones fill the windows).
    """
    chosen = [
        e for e in events
        if (start_ms is None or e.event_time_ms >= start_ms) and (end_ms is None or e.event_time_ms <= end_ms)
    ]  # fmt: skip
    if not chosen:
        return []
    values = view.agg.evaluate_history(
        [e.fields for e in events], [e.event_time_ms for e in chosen], [e.offset for e in events]
    )
    return [
        FeatureRow(key, e.event_time_ms, e.partition, e.offset, vals)
        for e, vals in zip(chosen, values, strict=True)
    ]


def backfill(
    view: OfflineView,
    reader: PostgresOfflineStore,
    writer: PostgresOfflineStore,
    *,
    start_ms: int | None = None,
    end_ms: int | None = None,
    chunk_entities: int = 500,
    restart: bool = False,
    progress: Progress | None = None,
    on_total: Progress | None = None,
) -> BackfillStats:
    """Compute and store the history rows of ``view`` for events in [start_ms, end_ms] (ms, both
    inclusive; None: unbounded). ``reader`` streams the archive; ``writer`` (another
    connection) commits a chunk of entities at a time with the progress row.

    ``on_total`` is called once with the number of entities still to do (for a progress bar).
    """
    if start_ms is not None and end_ms is not None and start_ms > end_ms:
        raise ValueError("the range's start is after its end")
    started = time.perf_counter()
    label = range_label(start_ms, end_ms)
    stats = BackfillStats(view.name, view.version, label)
    require_archive(reader, view.source)
    ensure_progress_table(writer)
    if restart:
        reset_progress(writer, view.name, view.version, label)
    saved = read_progress(writer, view.name, view.version, label)
    stats.total_entities = count_entities(reader, view.source, view.key_fields, start_ms, end_ms)
    if saved is not None and saved.done:
        stats.already_done = True
        stats.entities = 0
        stats.seconds = time.perf_counter() - started
        return stats
    # the archive's index on the view's join keys makes each chunk's read a range scan; the worker
    # creates it for the views it runs, a version it has not run yet may lack it
    writer.ensure_source(view.source, [view.key_fields])
    writer.ensure_view(view.runtime.view, view.version, view.key_fields, view.dtypes())
    after = saved.last_key if saved is not None else None
    stats.resumed_after = after
    if on_total is not None:
        done_before = saved.entities if saved is not None else 0
        on_total(max(0, stats.total_entities - done_before))
    while True:
        keys = entity_keys_after(reader, view, after, chunk_entities, start_ms, end_ms)
        if not keys:
            break
        rows: list[FeatureRow] = []
        stream = reader.read_events(view.source, view.key_fields, keys, end_ms)
        try:
            for key, events in entity_events(stream):
                stats.events += len(events)
                rows.extend(history_rows(view, key, events, start_ms, end_ms))
        finally:
            close_stream(stream)
        with writer.connection.transaction():
            written = writer.write_feature_rows(view.runtime.view, view.version, rows)
            _save_progress(writer, view.name, view.version, label, keys[-1], len(keys), written, False)
        stats.entities += len(keys)
        stats.rows += len(rows)
        stats.written += written
        after = list(keys[-1])
        if progress is not None:
            progress(len(keys))
        if len(keys) < chunk_entities:
            break
    _save_progress(writer, view.name, view.version, label, None, 0, 0, True)
    stats.seconds = time.perf_counter() - started
    return stats
