"""The stream job's batch processor on real Redis and PostgreSQL, without Kafka: values against
an independent reference, dead letters, replays, late events."""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from featurestream.aggregation.view import ViewAggregator
from featurestream.definitions.loader import load_project
from featurestream.definitions.models import Feature, ProjectDefinition
from featurestream.demo.generator import DemoEvent, generate_transactions, to_millis
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.storage.online.redis_store import RedisOnlineStore, merged_state
from featurestream.stream_jobs.processor import Record, SourceProcessor, ViewRuntime
from tests.support.reference import assert_features_match, user_transactions_reference

DEMO = Path(__file__).resolve().parents[3] / "definitions"
NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
PARTITIONS = 4


@pytest.fixture(scope="module")
def demo() -> ProjectDefinition:
    return load_project(DEMO)


def runtime(demo: ProjectDefinition, name: str) -> ViewRuntime:
    view = demo.feature_view(name)
    assert view is not None
    entity, source = demo.entity(view.entity), demo.source(view.source)
    assert entity is not None and source is not None
    return ViewRuntime.build(view, 1, entity, source)


def to_records(events: list[DemoEvent]) -> list[Record]:
    offsets: dict[int, int] = defaultdict(int)
    records = []
    for event in events:
        partition = zlib.crc32(event.key) % PARTITIONS
        records.append(Record(partition, offsets[partition], to_millis(NOW), event.value))
        offsets[partition] += 1
    return records


@pytest.fixture
def processor(demo: ProjectDefinition, fresh_pg_url: str, redis_url: str) -> Iterator[SourceProcessor]:
    source = demo.source("transactions")
    assert source is not None
    online = RedisOnlineStore(redis_url, f"test{zlib.crc32(fresh_pg_url.encode())}")
    offline = PostgresOfflineStore(fresh_pg_url)
    clock = [to_millis(NOW)]
    p = SourceProcessor(source, [runtime(demo, "user_transactions")], online, offline, clock_ms=lambda: clock[0])
    yield p
    online.close()
    offline.close()


def read_user(p: SourceProcessor, users: list[str], at_ms: int) -> dict[str, dict[str, Any]]:
    rt = p.views[0]
    loaded = p.online.load(rt.view.name, rt.version, rt.agg, [(u,) for u in users])
    return {u: rt.agg.evaluate(merged_state(rt.agg, subs)[0], at_ms) for u, subs in zip(users, loaded, strict=True)}


def test_values_match_the_reference_and_replays_change_nothing(processor: SourceProcessor) -> None:
    events = list(generate_transactions(3000, seed=7, now=NOW.replace(minute=0) , rate=1.0, users=200))
    # rate 1/s from 11:00 would run past 12:00; keep what happened before the read time
    events = [e for e in events if e.event_time is None or e.event_time <= NOW]
    records = to_records(events)
    totals = {"valid": 0, "dead": 0, "late": 0}
    for start in range(0, len(records), 500):
        result = processor.process(records[start : start + 500])
        totals["valid"] += result.valid
        totals["dead"] += len(result.dead_letters)
        totals["late"] += sum(result.late.values())
        assert result.replayed == 0
    malformed = [e for e in events if not e.well_formed]
    assert totals["dead"] == len(malformed) and totals["valid"] == len(events) - len(malformed)

    by_user: dict[str, list[tuple[int, int, dict[str, Any]]]] = defaultdict(list)
    for event, record in zip(events, records, strict=True):
        if event.well_formed and event.event is not None and event.event_time is not None:
            fields = dict(event.event)
            by_user[event.user_id].append((to_millis(event.event_time), record.offset, fields))
    read_ms = to_millis(NOW)
    users = sorted(by_user)
    actual = read_user(processor, users, read_ms)
    for user in users:
        assert_features_match(actual[user], user_transactions_reference(by_user[user], read_ms), where=user)

    replay = processor.process(records[:1000])
    assert replay.replayed == replay.valid > 0
    assert read_user(processor, users, read_ms) == actual


def test_dead_letters_carry_reasons(processor: SourceProcessor) -> None:
    bad = [b"{oops", b'{"user_id": "u1", "amount": -3, "merchant": "m", "country": "DE", "ts": 1764237600000}', None]
    result = processor.process([Record(0, i, 0, value) for i, value in enumerate(bad)])
    reasons = [d.reason for d in result.dead_letters]
    assert result.valid == 0 and len(reasons) == 3
    assert reasons[0].startswith("not valid JSON")
    assert "below the minimum" in reasons[1]
    assert reasons[2] == "empty message (no value)"


def test_a_feature_added_later_rebuilds_states_from_the_archive(
    processor: SourceProcessor, demo: ProjectDefinition, redis_url: str
) -> None:
    """Adding a feature keeps the view version but changes the state layout: a restarted worker
    rebuilds each entity it meets from the archive, then folds on as if it had always run."""
    events = list(generate_transactions(2000, seed=11, now=NOW.replace(hour=11, minute=20), rate=1.0, users=50))
    assert all(e.event_time is None or e.event_time <= NOW for e in events)  # 11:20 to 11:54
    records = to_records(events)
    processor.process(records[:1200])

    old = processor.views[0]
    spec = old.view.model_copy(update={"features": [
        *old.view.features,
        Feature.model_validate({"name": "amount_max_1h", "aggregation": "max", "field": "amount", "window": "1h"}),
    ]})
    wider = ViewRuntime(spec, old.version, old.entity, ViewAggregator.from_source(spec, processor.source), old.ttl)
    restarted = SourceProcessor(processor.source, [wider], processor.online, processor.offline,
                                clock_ms=processor.clock_ms)
    result = restarted.process(records[1200:])
    assert result.rebuilt > 0 and result.replayed == 0
    assert restarted.process(records[1000:1500]).replayed == 500  # offsets survive the rebuild

    scratch_store = RedisOnlineStore(redis_url, f"{processor.online.project}x")
    scratch = SourceProcessor(processor.source, [wider], scratch_store, processor.offline, clock_ms=processor.clock_ms)
    try:
        scratch.process(records)
        users = sorted({e.user_id for e in events if e.well_formed})
        read_ms = to_millis(NOW)
        healed = read_user(restarted, users, read_ms)
        assert healed == read_user(scratch, users, read_ms)
        assert any(values["amount_max_1h"] is not None for values in healed.values())
    finally:
        scratch.close()
        scratch_store.client.delete(*scratch_store.client.keys(f"fs:{scratch_store.project}:*") or ["none"])
        scratch_store.close()
        restarted.close()
