"""The PostgreSQL offline store against the real server: archive, history, idempotency, partitions."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from featurestream.definitions.loader import load_project
from featurestream.definitions.models import ProjectDefinition
from featurestream.storage.offline.base import ArchivedEvent, FeatureRow
from featurestream.storage.offline.layout import SCHEMA, table_name
from featurestream.storage.offline.postgres import PostgresOfflineStore

DEMO = Path(__file__).resolve().parents[3] / "definitions"
T0 = int(datetime(2026, 11, 27, 10, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture(scope="module")
def demo() -> ProjectDefinition:
    return load_project(DEMO)


@pytest.fixture
def store(fresh_pg_url: str) -> Iterator[PostgresOfflineStore]:
    s = PostgresOfflineStore(fresh_pg_url)
    yield s
    s.close()


def txn(offset: int, user: str, minutes: float, amount: float = 1.0, partition: int = 0) -> ArchivedEvent:
    when = T0 + int(minutes * 60_000)
    fields = {"user_id": user, "amount": amount, "merchant": f"m{offset % 3}", "country": "DE", "ts": when}
    return ArchivedEvent(partition, offset, when, when + 5, fields)


def test_archive_is_idempotent_and_reads_back_typed(store: PostgresOfflineStore, demo: ProjectDefinition) -> None:
    source = demo.source("transactions")
    assert source is not None
    store.ensure_source(source, [("user_id",), ("merchant",)])
    store.ensure_source(source, [("user_id",)])  # idempotent
    batch = [txn(0, "u1", 0), txn(1, "u2", 1), txn(2, "u1", -3 * 24 * 60), txn(3, "u1", 2, partition=1)]
    assert store.archive_events(source, batch) == 4
    assert store.archive_events(source, [*batch[1:], txn(4, "u1", 3)]) == 1  # a replay stores only the new one
    events = list(store.read_events(source, ["user_id"], [("u1",)], end_ms=T0 + 2 * 60_000))
    assert [(key, e.offset, e.partition) for key, e in events] == [(("u1",), 2, 0), (("u1",), 0, 0), (("u1",), 3, 1)]
    first = events[1][1]
    assert first.fields == {"user_id": "u1", "amount": 1.0, "merchant": "m0", "country": "DE", "ts": T0}
    assert first.arrival_ms == T0 + 5
    everything = list(store.read_events(source, ["user_id"], None, None))
    assert len(everything) == 5


def test_native_partitions_per_day_and_retention(store: PostgresOfflineStore, demo: ProjectDefinition) -> None:
    source = demo.source("transactions")
    assert source is not None
    assert not store.partitioner.use_timescale  # this machine has no TimescaleDB
    store.ensure_source(source, [("user_id",)])
    store.archive_events(source, [txn(0, "u", 0), txn(1, "u", -2 * 24 * 60), txn(2, "u", -10 * 24 * 60)])
    table = table_name("raw", source.name)
    partitions = sorted(
        r[0]
        for r in store.connection.execute(
            "select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid "
            "join pg_class p on p.oid = i.inhparent where p.relname = %s",
            [table],
        ).fetchall()
    )
    assert partitions == [f"{table}_p20261117", f"{table}_p20261125", f"{table}_p20261127"]
    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    dropped = store.partitioner.apply_retention(store.connection, table, timedelta(days=5), now)
    assert dropped == [f"{table}_p20261117"]
    left = store.connection.execute(f'select count(*) from {SCHEMA}."{table}"').fetchone()
    assert left == (2,)


def test_feature_history_rows_are_idempotent(store: PostgresOfflineStore, demo: ProjectDefinition) -> None:
    view = demo.feature_view("user_transactions")
    assert view is not None
    dtypes = {"user_id": "string", "txn_count_1h": "int64", "txn_amount_sum_1h": "float64", "txn_amount_mean_1h": "float64",
              "txn_amount_max_24h": "float64", "distinct_merchants_24h": "int64", "last_country": "string"}
    store.ensure_view(view, 1, ["user_id"], dtypes)
    rows = [FeatureRow(("u1",), T0, 0, 7, {"txn_count_1h": 2, "txn_amount_sum_1h": 3.5, "last_country": "FR"})]
    assert store.write_feature_rows(view, 1, rows) == 1
    assert store.write_feature_rows(view, 1, rows) == 0
    table = table_name("hist", view.name, 1)
    got = store.connection.execute(
        f'select user_id, txn_count_1h, txn_amount_sum_1h, txn_amount_mean_1h, last_country from {SCHEMA}."{table}"'
    ).fetchall()
    assert got == [("u1", 2, 3.5, None, "FR")]


def test_long_names_are_hashed_within_postgres_limits() -> None:
    name = table_name("hist", "v" * 63, 12)
    assert len(name) <= 53 and name != table_name("hist", "v" * 62 + "w", 12)
