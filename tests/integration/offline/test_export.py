"""Feature history to Parquet, Avro and CSV and back, on real PostgreSQL: schemas from the
definitions, exact round trips, row-by-row validation on import."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import featurestream.cli  # noqa: F401  (registers the commands)
from featurestream.cli.app import app
from featurestream.config import ENV_POSTGRES
from featurestream.demo.generator import to_millis
from featurestream.offline.backfill import backfill
from featurestream.offline.export import FORMATS, avro_schema, export_history, import_history
from featurestream.offline.rebuild import OfflineError, OfflineView
from featurestream.storage.offline.layout import qualified, table_name
from featurestream.storage.offline.postgres import PostgresOfflineStore
from tests.integration.offline.test_rebuild import START, Demo, demo_events, running_demo

MINUTE = 60_000


@pytest.fixture(scope="module")
def history(pg_admin_url: str, redis_url: str) -> Iterator[tuple[Demo, str]]:
    """Demo events through the worker, then a backfill: one history row per event of both views."""
    name = f"exp{uuid.uuid4().hex[:8]}"
    dbname = f"fs_export_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("create database {}").format(psycopg.sql.Identifier(dbname)))
    url = psycopg.conninfo.make_conninfo(pg_admin_url, dbname=dbname)
    with running_demo(url, redis_url, name, ("user_transactions", "merchant_activity")) as demo:
        demo.send(demo_events(1500))
        reader = PostgresOfflineStore(url)
        for view in ("user_transactions", "merchant_activity"):
            backfill(OfflineView.from_registry(demo.registry, name, view), reader, demo.offline)
        reader.close()
        yield demo, url
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("drop database {} with (force)").format(psycopg.sql.Identifier(dbname)))


def table_rows(url: str, view: OfflineView) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            psycopg.sql.SQL("select * from {} order by 1, 2, 3, 4").format(
                qualified(table_name("hist", view.name, view.version))
            )
        ).fetchall()


def truncate(url: str, view: OfflineView) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("truncate {}").format(qualified(table_name("hist", view.name, view.version))))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["user_transactions", "merchant_activity"])
def test_round_trip(history: tuple[Demo, str], tmp_path: Path, fmt: str, name: str) -> None:
    demo, url = history
    view = OfflineView.from_registry(demo.registry, demo.project, name)
    before = table_rows(url, view)
    assert len(before) >= 1400
    path = tmp_path / f"history.{fmt}"
    exported = export_history(view, demo.offline, path, fmt)  # type: ignore[arg-type]
    assert exported.rows == len(before)
    truncate(url, view)
    try:
        imported = import_history(view, demo.offline, path, fmt)  # type: ignore[arg-type]
        assert (imported.rows, imported.imported, imported.duplicates, imported.rejected) == (len(before), len(before), 0, [])
        assert table_rows(url, view) == before
        again = import_history(view, demo.offline, path, fmt)  # type: ignore[arg-type]
        assert (again.imported, again.duplicates) == (0, len(before))
    finally:
        truncate(url, view)
        import_history(view, demo.offline, path, fmt)  # type: ignore[arg-type]


def test_file_schemas_come_from_the_definitions(history: tuple[Demo, str], tmp_path: Path) -> None:
    demo, _ = history
    view = OfflineView.from_registry(demo.registry, demo.project, "user_transactions")
    export_history(view, demo.offline, tmp_path / "h.parquet", "parquet")
    schema = pq.read_schema(tmp_path / "h.parquet")
    assert [(f.name, str(f.type), f.nullable) for f in schema] == [
        ("user_id", "string", False),
        ("event_time", "timestamp[ms, tz=UTC]", False),
        ("kafka_partition", "int32", False),
        ("kafka_offset", "int64", False),
        ("txn_count_1h", "int64", True),
        ("txn_amount_sum_1h", "double", True),
        ("txn_amount_mean_1h", "double", True),
        ("txn_amount_max_24h", "double", True),
        ("distinct_merchants_24h", "int64", True),
        ("last_country", "string", True),
    ]
    assert schema.metadata[b"featurestream.view"] == b"user_transactions@1"
    export_history(view, demo.offline, tmp_path / "h.avro", "avro")
    with (tmp_path / "h.avro").open("rb") as f:
        reader = fastavro.reader(f)
        written = reader.writer_schema
        first = next(iter(reader))
    assert isinstance(written, dict)
    fields = {f["name"]: f["type"] for f in written["fields"]}
    assert fields["event_time"] == {"type": "long", "logicalType": "timestamp-millis"}
    assert fields["txn_count_1h"] == ["null", "long"] and fields["user_id"] == "string"
    assert avro_schema(view)["name"] == "user_transactions_v1"
    assert isinstance(first, dict) and first["event_time"].tzinfo is not None


def test_export_of_a_time_range(history: tuple[Demo, str], tmp_path: Path) -> None:
    demo, url = history
    view = OfflineView.from_registry(demo.registry, demo.project, "user_transactions")
    start, end = to_millis(START) + 2 * MINUTE, to_millis(START) + 4 * MINUTE - 1
    stats = export_history(view, demo.offline, tmp_path / "r.csv", "csv", start_ms=start, end_ms=end)
    times = [to_millis(r[1]) for r in table_rows(url, view)]
    assert stats.rows == sum(1 for t in times if start <= t <= end) > 0
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert len(lines) == stats.rows + 1 and lines[0].startswith('"user_id","event_time"')


def test_import_reports_bad_rows_and_keeps_the_good_ones(history: tuple[Demo, str], tmp_path: Path) -> None:
    demo, url = history
    view = OfflineView.from_registry(demo.registry, demo.project, "user_transactions")
    export_history(view, demo.offline, tmp_path / "all.csv", "csv")
    export_history(view, demo.offline, tmp_path / "h.csv", "csv", end_ms=to_millis(START) + MINUTE)
    header, *lines = (tmp_path / "h.csv").read_text().splitlines()
    assert len(lines) >= 20
    broken = list(lines[:20])
    broken[1] = "," + broken[1].split(",", 1)[1]  # no user_id
    broken[3] = broken[3].replace("Z,", "Q,", 1)  # not a timestamp
    cells = broken[5].split(",")
    cells[4] = "many"  # txn_count_1h is int64
    broken[5] = ",".join(cells)
    cells = broken[7].split(",")
    cells[5] = "1.5.2"  # txn_amount_sum_1h is float64
    broken[7] = ",".join(cells)
    broken[9] = broken[9] + ",surplus"  # one field too many
    cells = broken[11].split(",")
    cells[2] = "-"  # kafka_partition
    broken[11] = ",".join(cells)
    (tmp_path / "bad.csv").write_text("\n".join([header, *broken]) + "\n")

    truncate(url, view)
    try:
        stats = import_history(view, demo.offline, tmp_path / "bad.csv", "csv")
        assert [n for n, _ in stats.rejected] == [2, 4, 6, 8, 10, 12]
        reasons = dict(stats.rejected)
        assert reasons[2] == "join key 'user_id' is missing"
        assert reasons[4].startswith("event_time: ")
        assert reasons[6] == "txn_count_1h: 'many' is not an integer"
        assert reasons[8] == "txn_amount_sum_1h: '1.5.2' is not a number"
        assert reasons[10] == "the CSV line has 11 fields, not 10"
        assert reasons[12] == "kafka_partition: '-' is not an integer"
        assert stats.rows == 20 and stats.imported == 14
        assert len(table_rows(url, view)) == 14
    finally:
        truncate(url, view)
        import_history(view, demo.offline, tmp_path / "all.csv", "csv")


def test_import_checks_types_in_typed_files_and_refuses_foreign_columns(history: tuple[Demo, str], tmp_path: Path) -> None:
    demo, url = history
    view = OfflineView.from_registry(demo.registry, demo.project, "merchant_activity")
    when = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
    table = pa.table({
        "merchant": ["m_a", None, "m_c", "m_d"],
        "event_time": pa.array([when, when, None, datetime(2026, 11, 27, 9, 1)], pa.timestamp("ms")),  # noqa: DTZ001
        "txn_count_15m": pa.array([3, 4, 5, 6], pa.int64()),
        "amount_sum_tumbling_1h": ["1.5", "2", "x", "3"],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "odd.parquet")
    before = table_rows(url, view)
    stats = import_history(view, demo.offline, tmp_path / "odd.parquet", "parquet")
    assert stats.rows == 4 and stats.imported == 0 and stats.missing_features == [
        "amount_mean_hopping_1h", "distinct_users_24h"
    ]
    assert dict(stats.rejected) == {
        1: "event_time: a timestamp without a time zone",
        2: "join key 'merchant' is missing",
        3: "event_time is missing",
        4: "event_time: a timestamp without a time zone",
    }
    good = table.set_column(1, "event_time", pa.array([when] * 4, pa.timestamp("ms", tz="UTC")))
    good = good.set_column(0, "merchant", pa.array(["m_a", "m_b", "m_c", "m_d"]))
    pq.write_table(good, tmp_path / "typed.parquet")
    stats = import_history(view, demo.offline, tmp_path / "typed.parquet", "parquet")
    assert [n for n, _ in stats.rejected] == [1, 2, 3, 4]
    assert dict(stats.rejected)[1] == "amount_sum_tumbling_1h: expected a number, got str '1.5'"
    good = good.drop_columns(["amount_sum_tumbling_1h"])
    pq.write_table(good, tmp_path / "fine.parquet")
    stats = import_history(view, demo.offline, tmp_path / "fine.parquet", "parquet")
    assert stats.imported == 4 and not stats.rejected  # no Kafka position: partition -1, offset = row
    again = import_history(view, demo.offline, tmp_path / "fine.parquet", "parquet")
    assert again.imported == 0 and again.duplicates == 4
    added = [r for r in table_rows(url, view) if r not in before]
    assert sorted((r[0], r[2], r[3]) for r in added) == [("m_a", -1, 1), ("m_b", -1, 2), ("m_c", -1, 3), ("m_d", -1, 4)]

    pq.write_table(good.append_column("fraud_score", pa.array([0.1] * 4)), tmp_path / "extra.parquet")
    with pytest.raises(OfflineError, match="fraud_score are not join keys or features of merchant_activity@1"):
        import_history(view, demo.offline, tmp_path / "extra.parquet", "parquet")
    pq.write_table(good.drop_columns(["event_time"]), tmp_path / "timeless.parquet")
    with pytest.raises(OfflineError, match="no column event_time"):
        import_history(view, demo.offline, tmp_path / "timeless.parquet", "parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(OfflineError, match="cannot read it as parquet"):
        import_history(view, demo.offline, tmp_path / "junk.parquet", "parquet")


def test_avro_rows_are_validated_one_by_one(history: tuple[Demo, str], tmp_path: Path) -> None:
    demo, _ = history
    view = OfflineView.from_registry(demo.registry, demo.project, "merchant_activity")
    schema = avro_schema(view)
    loose = {**schema, "fields": [
        {**f, "type": ["null", "string", "long", "double"]} if f["name"] == "txn_count_15m" else f
        for f in schema["fields"]
    ]}  # fmt: skip
    when = to_millis(datetime(2026, 11, 27, 8, 0, tzinfo=UTC))
    base = {"merchant": "m_avro", "event_time": when, "kafka_partition": 0, "kafka_offset": 10_000_000,
            "amount_sum_tumbling_1h": 1.0, "amount_mean_hopping_1h": None, "distinct_users_24h": 2}
    records = [
        {**base, "txn_count_15m": 3},
        {**base, "kafka_offset": 10_000_001, "txn_count_15m": "three"},
        {**base, "kafka_offset": 10_000_002, "txn_count_15m": 2.5},
    ]
    with (tmp_path / "loose.avro").open("wb") as f:
        fastavro.writer(f, fastavro.parse_schema(loose), records)
    stats = import_history(view, demo.offline, tmp_path / "loose.avro", "avro")
    assert stats.imported == 1 and dict(stats.rejected) == {
        2: "txn_count_15m: expected an integer, got str 'three'",
        3: "txn_count_15m: expected an integer, got float '2.5'",
    }


def test_export_and_import_commands(history: tuple[Demo, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo, url = history
    monkeypatch.setenv(ENV_POSTGRES, url)
    runner = CliRunner()
    out = tmp_path / "h.avro"
    result = runner.invoke(app, ["export", "user_transactions", "--project", demo.project, "--format", "avro",
                                 "--out", str(out), "--from", "2026-11-27T11:01:00Z", "--to", "2026-11-27T11:03:00Z",
                                 "--json"])
    assert result.exit_code == 0, result.output
    exported = json.loads(result.stdout)
    assert exported["rows"] > 0 and out.is_file() and not (tmp_path / "h.avro.part").exists()

    result = runner.invoke(app, ["import", "user_transactions@1", str(out), "--project", demo.project])
    assert result.exit_code == 0, result.output
    assert f"{exported['rows']:,} rows, 0 new, {exported['rows']:,} stored already, 0 rejected" in result.stdout

    bad = tmp_path / "bad.csv"
    bad.write_text('"user_id","event_time","txn_count_1h"\n"u_1",2026-11-27 10:00:00.000Z,one\n')
    result = runner.invoke(app, ["import", "user_transactions", str(bad), "--project", demo.project, "--json"])
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["rejected_rows"] == [{"row": 1, "reason": "txn_count_1h: 'one' is not an integer"}]
    result = runner.invoke(app, ["import", "user_transactions", str(tmp_path / "h.txt"), "--project", demo.project])
    assert result.exit_code == 1 and "cannot tell the format" in result.stderr
    result = runner.invoke(app, ["export", "user_transactions@1", "--project", demo.project, "--format", "xls",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "xls" in result.output
    result = runner.invoke(app, ["export", "user_transactions@1", "--project", demo.project,
                                 "--out", str(tmp_path / "missing" / "h.parquet")])
    assert result.exit_code == 1 and "cannot write" in result.stderr
