"""Online state rebuilt from the archive (``rebuild_entity_states``, ``materialize``) against the
state the real stream processor wrote, on real PostgreSQL and Redis: demo events with
out-of-order and late ones, a clock that advances with the stream so that tiles get pruned."""

from __future__ import annotations

import json
import math
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from typer.testing import CliRunner

import featurestream.cli  # noqa: F401  (registers the commands)
from featurestream.cli.app import app
from featurestream.config import ENV_POSTGRES, ENV_REDIS
from featurestream.definitions.loader import load_project
from featurestream.definitions.models import ProjectDefinition
from featurestream.demo.generator import DemoEvent, generate_transactions, to_millis
from featurestream.offline.rebuild import OfflineView, count_entities, materialize, rebuild_entity_states
from featurestream.registry import Registry
from featurestream.storage.offline.base import ArchivedEvent
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.storage.online.redis_store import RedisOnlineStore, merged_state
from featurestream.stream_jobs.processor import Record, SourceProcessor
from tests.support.stream import live_runtimes

DEMO = Path(__file__).resolve().parents[3] / "definitions"
START = datetime(2026, 11, 27, 11, 0, tzinfo=UTC)
RATE = 2.0  # events per second: 6,000 events span 50 minutes
MINUTE = 60_000


@dataclass
class Demo:
    project: str
    definition: ProjectDefinition
    registry: Registry
    processor: SourceProcessor
    online: RedisOnlineStore
    offline: PostgresOfflineStore
    clock: list[int]
    events: list[DemoEvent]
    offsets: dict[int, int]
    records: list[Record]
    start: datetime = START
    """Where the demo events' schedule starts (their arrival times follow it)."""

    def view(self, name: str) -> OfflineView:
        return OfflineView.from_registry(self.registry, self.project, name)

    def send(self, events: list[DemoEvent], batch: int = 400) -> None:
        """Through the real processor in batches, the clock following the stream (arrival =
        schedule), so tiles are compacted and pruned as a live worker would."""
        partitions = self.processor.source.partitions
        for start in range(0, len(events), batch):
            records = []
            for event in events[start : start + batch]:
                partition = zlib.crc32(event.key) % partitions
                arrival = to_millis(self.start) + round(event.index * 1000 / RATE)
                records.append(Record(partition, self.offsets.get(partition, 0), arrival, event.value))
                self.offsets[partition] = self.offsets.get(partition, 0) + 1
            self.clock[0] = records[-1].timestamp_ms + 500
            self.processor.process(records)
            self.records += records
        self.events += events


def demo_definition(name: str, views: tuple[str, ...]) -> ProjectDefinition:
    definition = load_project(DEMO)
    return definition.model_copy(update={
        "project": definition.project.model_copy(update={"name": name}),
        "feature_views": tuple(v for v in definition.feature_views if v.name in views),
        "feature_services": (), "consumers": (),
    })  # fmt: skip


@contextmanager
def running_demo(postgres_url: str, redis_url: str, name: str, views: tuple[str, ...]) -> Iterator[Demo]:
    """The demo ``views`` applied as project ``name`` and the processor a worker would run for
    them, its clock at START; stores and processor closed on exit."""
    definition = demo_definition(name, views)
    registry = Registry(postgres_url)
    registry.apply(definition)
    source = definition.source("transactions")
    assert source is not None
    online, offline = RedisOnlineStore(redis_url, name), PostgresOfflineStore(postgres_url)
    clock = [to_millis(START)]
    processor = SourceProcessor(source, live_runtimes(registry, definition), online, offline, clock_ms=lambda: clock[0])
    try:
        yield Demo(name, definition, registry, processor, online, offline, clock, [], {}, [])
    finally:
        processor.close()
        online.close()
        offline.close()


@pytest.fixture
def demo(fresh_pg_url: str, redis_url: str) -> Iterator[Demo]:
    with running_demo(fresh_pg_url, redis_url, f"off{uuid.uuid4().hex[:8]}", ("user_transactions", "merchant_activity")) as d:
        yield d


def demo_events(count: int = 6000, seed: int = 11, start: datetime = START) -> list[DemoEvent]:
    return list(generate_transactions(count, seed=seed, now=start, rate=RATE, users=300))


def archived(offline: PostgresOfflineStore, view: OfflineView) -> dict[tuple[Any, ...], list[ArchivedEvent]]:
    out: dict[tuple[Any, ...], list[ArchivedEvent]] = {}
    for key, event in offline.read_events(view.source, view.key_fields, None, None):
        out.setdefault(key, []).append(event)
    return out


def values_close(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        y = b[name]
        if isinstance(x, float) and isinstance(y, float):
            if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif x != y:
            return False
    return True


def read_all(online: RedisOnlineStore, view: OfflineView, keys: list[tuple[Any, ...]], at_ms: int) -> list[dict[str, Any]]:
    loaded = online.load(view.name, view.version, view.agg, keys)
    return [view.agg.evaluate(merged_state(view.agg, subs)[0], at_ms) if subs else {} for subs in loaded]


# ---------------------------------------------------------------- rebuild_entity_states


def test_rebuilt_states_match_the_workers_per_partition(demo: Demo) -> None:
    demo.send(demo_events())
    now = demo.clock[0]
    for name in ("user_transactions", "merchant_activity"):
        view = demo.view(name)
        events = archived(demo.offline, view)
        keys = sorted(events)
        stored = demo.online.load(view.name, view.version, view.agg, keys)
        spread = 0
        for key, subs in zip(keys, stored, strict=True):
            rebuilt = rebuild_entity_states(view.agg, events[key], now)
            assert rebuilt.keys() == subs.keys(), key
            spread += len(rebuilt) > 1
            for p, sub in rebuilt.items():
                assert (sub.offset, sub.newest_ms) == (subs[p].offset, subs[p].newest_ms), (key, p)
                for later in (0, 7 * MINUTE, 61 * MINUTE, 25 * 60 * MINUTE):  # windows decay alike
                    at = now + later
                    assert values_close(view.agg.evaluate(sub.state, at), view.agg.evaluate(subs[p].state, at)), (
                        key, p, later
                    )
        if name == "merchant_activity":
            assert spread > 50  # merchants' events are spread over partitions: sub-states merge


def test_rebuild_counts_each_offset_once_and_takes_any_order(demo: Demo) -> None:
    demo.send(demo_events(1500))
    view = demo.view("user_transactions")
    events = archived(demo.offline, view)
    key = max(events, key=lambda k: len(events[k]))
    once = rebuild_entity_states(view.agg, events[key], demo.clock[0])
    twice = rebuild_entity_states(view.agg, list(reversed(events[key])) + events[key][:5], demo.clock[0])
    assert once.keys() == twice.keys()
    for p in once:
        assert view.agg.encode_state(once[p].state) == view.agg.encode_state(twice[p].state)
        assert (once[p].offset, once[p].newest_ms) == (twice[p].offset, twice[p].newest_ms)


def test_a_rebuilt_state_makes_the_worker_skip_what_it_holds(demo: Demo) -> None:
    events = demo_events(2000)
    demo.send(events[:1200])
    view = demo.view("user_transactions")
    for key, items in archived(demo.offline, view).items():
        demo.online.replace(view.name, view.version, view.agg, key, rebuild_entity_states(view.agg, items, demo.clock[0]),
                            view.runtime.ttl)
    demo.processor.cache.clear()  # a restarted worker: states come from Redis
    replay = demo.processor.process(demo.records[:600])  # Kafka redelivers: the rebuilt offsets skip it
    assert replay.replayed == 2 * replay.valid > 1000  # both views skip it all
    demo.send(events[1200:])
    now = demo.clock[0]
    all_events = archived(demo.offline, view)
    keys = sorted(all_events)
    online = read_all(demo.online, view, keys, now)
    for key, got in zip(keys, online, strict=True):
        want = view.agg.evaluate_history([e.fields for e in all_events[key]], [now], [e.offset for e in all_events[key]])[0]
        assert values_close(got, want), key


# ---------------------------------------------------------------- materialize


def test_materialize_rebuilds_a_lost_online_store(demo: Demo, redis_url: str) -> None:
    demo.send(demo_events())
    now = demo.clock[0]
    client = redis.Redis.from_url(redis_url)
    for name in ("user_transactions", "merchant_activity"):
        view = demo.view(name)
        keys = sorted(archived(demo.offline, view))
        before = read_all(demo.online, view, keys, now)
        ttls = {k: client.pttl(demo.online.key(view.name, view.version, k)) for k in keys[:20]}
        doomed = list(client.scan_iter(f"fs:{demo.project}:{name}:v1:*"))
        assert len(doomed) == len(keys)
        client.delete(*doomed)  # Redis lost

        seen: list[int] = []
        stats = materialize(view, demo.offline, demo.online, now_ms=now, progress=seen.append)
        assert stats.entities == stats.written == len(keys) == sum(seen)
        assert stats.expired == 0 and stats.events == sum(1 for e in demo.events if e.well_formed)
        assert read_all(demo.online, view, keys, now) == before or all(
            values_close(a, b) for a, b in zip(read_all(demo.online, view, keys, now), before, strict=True)
        )
        for k, ttl in ttls.items():  # the TTL left follows the newest arrival, as the worker's would
            left = client.pttl(demo.online.key(view.name, view.version, k))
            assert 0 < left <= ttl + 5_000
    client.close()


def test_materialize_leaves_out_entities_whose_key_would_have_expired(demo: Demo, redis_url: str) -> None:
    demo.send(demo_events(800))
    view = demo.view("user_transactions")  # longest window 24h: keys live 2 days after the last write
    assert view.runtime.ttl == timedelta(days=2)
    client = redis.Redis.from_url(redis_url)
    stats = materialize(view, demo.offline, demo.online, now_ms=demo.clock[0] + 47 * 3_600_000)
    assert stats.written == stats.entities > 0 and stats.expired == 0
    left = [client.pttl(k) for k in client.scan_iter(f"fs:{demo.project}:user_transactions:v1:*")]
    assert len(left) == stats.entities and max(left) <= 3_600_000  # what the worker's keys would have left
    stats = materialize(view, demo.offline, demo.online, now_ms=demo.clock[0] + 49 * 3_600_000)
    assert stats.expired == stats.entities > 0 and stats.written == 0
    assert not list(client.scan_iter(f"fs:{demo.project}:user_transactions:v1:*"))  # deleted, not left stale
    client.close()


def test_materialize_command(demo: Demo, fresh_pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    demo.send(demo_events(1000))
    monkeypatch.setenv(ENV_POSTGRES, fresh_pg_url)
    monkeypatch.setenv(ENV_REDIS, redis_url)
    view = demo.view("user_transactions")
    runner = CliRunner()
    result = runner.invoke(app, ["materialize", "user_transactions@1", "--project", demo.project, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["written"] == count_entities(demo.offline, view.source, view.key_fields) > 0
    assert report["events_per_second"] > 0

    result = runner.invoke(app, ["materialize", "user_transactions", "--project", demo.project])
    assert result.exit_code == 0, result.output
    assert f"Materialized user_transactions@1 (project '{demo.project}')" in result.stdout
    assert "materialize user_transactions@1:" in result.stderr  # progress without a terminal

    result = runner.invoke(app, ["materialize", "user_transactions@7", "--project", demo.project])
    assert result.exit_code == 1
    assert "no feature view 'user_transactions@7'" in result.stderr
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute("drop table fs_offline.raw__transactions")
    result = runner.invoke(app, ["materialize", "user_transactions", "--project", demo.project])
    assert result.exit_code == 1
    assert "no event archive for source 'transactions' (fs_offline.raw__transactions does not exist)" in result.stderr
    monkeypatch.setenv(ENV_REDIS, "redis://:secret@127.0.0.1:1/0")
    result = runner.invoke(app, ["materialize", "user_transactions", "--project", demo.project])
    assert result.exit_code == 1 and "Redis at redis://:***@127.0.0.1:1/0" in result.stderr
    assert "secret" not in result.stderr
