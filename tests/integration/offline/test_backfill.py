"""Backfill of feature history from the archive, on real PostgreSQL and Redis: values against the
naive reference, resuming after an interruption, idempotence, ranges, and the life of a breaking
change (apply v2 beside v1, backfill and materialize v2, serve both, let the worker take over)."""

from __future__ import annotations

import json
import math
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

import featurestream.cli  # noqa: F401  (registers the commands)
from featurestream.cli.app import app
from featurestream.config import ENV_POSTGRES, ENV_REDIS
from featurestream.definitions.models import SlidingWindow
from featurestream.demo.generator import DemoEvent, to_millis
from featurestream.offline.backfill import backfill, range_label, read_progress
from featurestream.offline.rebuild import OfflineView, materialize
from featurestream.serving.service import OnlineService
from featurestream.storage.offline.layout import qualified, table_name
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.stream_jobs.processor import SourceProcessor
from tests.integration.offline.test_rebuild import START, Demo, demo_events, running_demo
from tests.support.reference import MINUTE_MS, assert_features_match, in_window, user_transactions_reference
from tests.support.stream import live_runtimes


@pytest.fixture
def demo(fresh_pg_url: str, redis_url: str) -> Iterator[Demo]:
    with running_demo(fresh_pg_url, redis_url, f"bf{uuid.uuid4().hex[:8]}", ("user_transactions",)) as d:
        yield d


def by_user(demo: Demo, events: list[DemoEvent]) -> dict[str, list[tuple[int, int, dict[str, Any]]]]:
    """(event time, offset, fields) per user, as sent (the reference's input)."""
    out: dict[str, list[tuple[int, int, dict[str, Any]]]] = defaultdict(list)
    sent = {e.index: r for e, r in zip(demo.events, demo.records, strict=True)}
    for e in events:
        if e.event is not None and e.event_time is not None:
            out[e.user_id].append((to_millis(e.event_time), sent[e.index].offset, e.event))
    return out


def hist_rows(url: str, view: str, version: int, where: str = "true") -> list[tuple[Any, ...]]:
    table = table_name("hist", view, version)
    with psycopg.connect(url) as conn:
        return conn.execute(
            psycopg.sql.SQL("select * from {} where " + where + " order by 1, 2, 3, 4").format(qualified(table))
        ).fetchall()


def test_backfilled_rows_are_the_values_right_after_each_event(demo: Demo, fresh_pg_url: str) -> None:
    demo.send(demo_events(2500))
    view = OfflineView.from_registry(demo.registry, demo.project, "user_transactions")
    reader, writer = PostgresOfflineStore(fresh_pg_url), PostgresOfflineStore(fresh_pg_url)
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:  # only the backfill's rows, not the worker's
        conn.execute(psycopg.sql.SQL("truncate {}").format(qualified(table_name("hist", view.name, 1))))
    stats = backfill(view, reader, writer, chunk_entities=64)
    well_formed = [e for e in demo.events if e.well_formed]
    assert stats.rows == stats.written == stats.events == len(well_formed)
    rows = hist_rows(fresh_pg_url, view.name, 1)
    assert len(rows) == len(well_formed)
    names = [f.name for f in view.runtime.view.features]
    reference = by_user(demo, demo.events)
    for row in rows[::7]:
        user, at = row[0], to_millis(row[1])
        actual = dict(zip(names, row[4:], strict=True))
        assert_features_match(actual, user_transactions_reference(reference[user], at), where=f"{user}@{at}")
    reader.close()
    writer.close()


def test_backfill_resumes_after_an_interruption_and_runs_twice_harmlessly(demo: Demo, fresh_pg_url: str) -> None:
    demo.send(demo_events(2000))
    view = OfflineView.from_registry(demo.registry, demo.project, "user_transactions")
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("truncate {}").format(qualified(table_name("hist", view.name, 1))))
    reader, writer = PostgresOfflineStore(fresh_pg_url), PostgresOfflineStore(fresh_pg_url)
    chunks: list[int] = []

    def crash_after_two(n: int) -> None:
        chunks.append(n)
        if len(chunks) == 2:
            raise KeyboardInterrupt  # ^C between two chunks

    with pytest.raises(KeyboardInterrupt):
        backfill(view, reader, writer, chunk_entities=40, progress=crash_after_two)
    saved = read_progress(writer, view.name, 1, "all")
    assert saved is not None and saved.entities == 80 and not saved.done
    partial = len(hist_rows(fresh_pg_url, view.name, 1))
    assert partial == saved.rows_written > 0

    reader.reconnect()  # the interrupted stream's connection is in an unknown state
    totals: list[int] = []
    resumed = backfill(view, reader, writer, chunk_entities=40, on_total=totals.append)
    assert resumed.resumed_after == saved.last_key and resumed.entities == resumed.total_entities - 80
    assert totals == [resumed.total_entities - 80]
    rows = hist_rows(fresh_pg_url, view.name, 1)
    assert len(rows) == partial + resumed.written == sum(1 for e in demo.events if e.well_formed)
    assert len({r[:4] for r in rows}) == len(rows)

    again = backfill(view, reader, writer)
    assert again.already_done and again.rows == 0
    restarted = backfill(view, reader, writer, restart=True)
    assert restarted.rows == len(rows) and restarted.written == 0
    assert hist_rows(fresh_pg_url, view.name, 1) == rows
    reader.close()
    writer.close()


def test_a_range_holds_the_same_values_as_a_full_backfill(demo: Demo, fresh_pg_url: str) -> None:
    demo.send(demo_events(2000))
    view = OfflineView.from_registry(demo.registry, demo.project, "user_transactions")
    table = qualified(table_name("hist", view.name, 1))
    reader, writer = PostgresOfflineStore(fresh_pg_url), PostgresOfflineStore(fresh_pg_url)
    start, end = to_millis(START) + 5 * MINUTE_MS, to_millis(START) + 9 * MINUTE_MS
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("truncate {}").format(table))
    stats = backfill(view, reader, writer, start_ms=start, end_ms=end)
    assert stats.range == range_label(start, end) == f"{start}..{end}"
    ranged = hist_rows(fresh_pg_url, view.name, 1)
    assert ranged and all(start <= to_millis(r[1]) <= end for r in ranged)
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("truncate {}").format(table))
    backfill(view, reader, writer)
    within = f"event_time between to_timestamp({start / 1000}) and to_timestamp({end / 1000})"
    assert hist_rows(fresh_pg_url, view.name, 1, within) == ranged
    reader.close()
    writer.close()


# ---------------------------------------------------------------- a breaking change, end to end


def test_a_breaking_change_is_backfilled_materialized_and_served_beside_the_old_version(
    demo: Demo, fresh_pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = demo_events(5000)
    demo.send(events[:3500])  # the worker runs v1

    view_v1 = demo.definition.feature_view("user_transactions")
    assert view_v1 is not None
    features = [f for f in view_v1.features if f.name != "txn_count_1h"]
    count_30m = view_v1.features[0].model_copy(
        update={"name": "txn_count_30m", "window": SlidingWindow(duration=timedelta(minutes=30))}
    )
    view_v2 = view_v1.model_copy(update={"features": (count_30m, *features)})
    changed = demo.definition.model_copy(update={"feature_views": (view_v2,)})
    result = demo.registry.apply(changed, message="count over 30 minutes instead of an hour")
    assert [c.new_version for c in result.plan.changes if c.kind == "feature_view"] == [2]
    assert [(v.name, v.version) for v in demo.registry.snapshot(demo.project).views] == [
        ("user_transactions", 1), ("user_transactions", 2)
    ]

    # the worker is stopped; v2 is backfilled and materialized from the archive by the commands
    monkeypatch.setenv(ENV_POSTGRES, fresh_pg_url)
    monkeypatch.setenv(ENV_REDIS, redis_url)
    runner = CliRunner()
    done = runner.invoke(app, ["backfill", "user_transactions@2", "--project", demo.project, "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["rows"] == sum(1 for e in events[:3500] if e.well_formed)
    # materialize at the stream's clock: the command itself reads the wall clock
    view2 = OfflineView.from_registry(demo.registry, demo.project, "user_transactions@2")
    stats = materialize(view2, demo.offline, demo.online, now_ms=demo.clock[0])
    assert stats.written == stats.entities > 0

    snapshot = demo.registry.snapshot(demo.project)
    service = OnlineService(lambda: snapshot, redis_url, clock_ms=lambda: demo.clock[0])
    refs = ["user_transactions@1:txn_count_1h", "user_transactions@1:txn_amount_sum_1h",
            "user_transactions@2:txn_count_30m", "user_transactions@2:txn_amount_sum_1h",
            "user_transactions@2:last_country"]

    def check_served() -> None:
        now = demo.clock[0]
        reference = by_user(demo, demo.events)
        users = sorted(reference)
        served = service.get_online([{"user_id": u} for u in users], refs)
        assert served.feature_names == refs
        for user, row in zip(users, served.rows, strict=True):
            got = dict(zip(refs, [v.value for v in row.values], strict=True))
            want = user_transactions_reference(reference[user], now)
            timed = [(t, e) for t, _, e in reference[user]]
            assert got["user_transactions@1:txn_count_1h"] == want["txn_count_1h"], user
            assert got["user_transactions@2:txn_count_30m"] == len(in_window(timed, now, 30 * MINUTE_MS, MINUTE_MS))
            for ref in ("user_transactions@1:txn_amount_sum_1h", "user_transactions@2:txn_amount_sum_1h"):
                assert math.isclose(got[ref], want["txn_amount_sum_1h"], rel_tol=1e-9, abs_tol=1e-9), (user, ref)
            assert got["user_transactions@2:last_country"] == want["last_country"], user

    check_served()

    # the worker restarts with both versions and carries on where the archive ended
    demo.processor.close()
    demo.processor = SourceProcessor(demo.processor.source, live_runtimes(demo.registry, changed), demo.online,
                                     demo.offline, clock_ms=lambda: demo.clock[0])
    replay = demo.processor.process(demo.records[-300:])  # Kafka redelivers what was not acknowledged
    assert replay.replayed == 2 * replay.valid  # both versions had it all
    demo.send(events[3500:])
    check_served()
    service.close()

    # v2's history: a row per archived event from the backfill, then the worker's rows (one per
    # entity and batch, at its newest event)
    rows = {(r[2], r[3]) for r in hist_rows(fresh_pg_url, "user_transactions", 2)}
    backfilled = {(r.partition, r.offset) for e, r in zip(demo.events[:3500], demo.records, strict=False)
                  if e.well_formed}
    assert backfilled < rows


def test_backfill_command(demo: Demo, fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    demo.send(demo_events(600))
    monkeypatch.setenv(ENV_POSTGRES, fresh_pg_url)
    runner = CliRunner()
    result = runner.invoke(app, ["backfill", "user_transactions", "--project", demo.project,
                                 "--from", "2026-11-27T11:02:00Z", "--to", str(to_millis(START) + 4 * MINUTE_MS)])
    assert result.exit_code == 0, result.output
    assert "Backfilled user_transactions@1" in result.stdout and "backfill user_transactions@1:" in result.stderr
    result = runner.invoke(app, ["backfill", "user_transactions", "--project", demo.project,
                                 "--from", "2026-11-27T11:02:00Z", "--to", str(to_millis(START) + 4 * MINUTE_MS)])
    assert "was backfilled already" in result.stdout
    result = runner.invoke(app, ["backfill", "user_transactions", "--project", demo.project, "--from", "soon"])
    assert result.exit_code == 2 and "--from" in result.output
    result = runner.invoke(app, ["backfill", "user_transactions", "--project", "elsewhere"])
    assert result.exit_code == 1 and "no project 'elsewhere'" in result.stderr
