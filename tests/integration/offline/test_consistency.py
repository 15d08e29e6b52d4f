"""The consistency check on real Redis and PostgreSQL: demo events (out-of-order and late ones
included) written through the real stream processor score 100%; a corrupted state, a lost key
and a lagging worker are told apart."""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from typer.testing import CliRunner

import featurestream.cli  # noqa: F401  (registers the commands)
from featurestream.cli.app import app
from featurestream.config import ENV_POSTGRES, ENV_REDIS
from featurestream.demo.generator import to_millis
from featurestream.offline.consistency import check_consistency, same_value
from featurestream.offline.rebuild import OfflineError, OfflineView
from featurestream.storage.online.redis_store import merged_state
from featurestream.stream_jobs.processor import Record
from tests.integration.offline.test_rebuild import START, Demo, archived, demo_events, running_demo

VIEWS = ("user_transactions", "merchant_activity", "user_spending_profile")


@pytest.fixture
def demo3(fresh_pg_url: str, redis_url: str) -> Iterator[Demo]:
    """The three demo views (56 + 6 + 4 features: every aggregation and window kind)."""
    with running_demo(fresh_pg_url, redis_url, f"con{uuid.uuid4().hex[:8]}", VIEWS) as demo:
        yield demo


def test_demo_data_through_the_worker_is_fully_consistent(demo3: Demo, redis_url: str) -> None:
    demo3.send(demo_events())
    kinds = {e.kind for e in demo3.events}
    assert {"valid", "out_of_order", "late"} <= kinds
    snapshot = demo3.registry.snapshot(demo3.project)

    for name in VIEWS:
        view = demo3.view(name)
        report = check_consistency(view, lambda: snapshot, redis_url, demo3.offline, now_ms=demo3.clock[0], sample=10_000)
        entities = len(archived(demo3.offline, view))
        assert report.entities == entities > 0
        assert report.values == entities * len(view.runtime.view.features)
        assert report.score == 1.0, [d.to_json() for d in report.worst(5)]
        assert not report.differences and report.missing_online == report.pending_events == report.unstable == 0
    # read later, windows have decayed on both sides alike (the hour-long ones are empty by now)
    later = demo3.clock[0] + 90 * 60_000
    report = check_consistency(demo3.view("user_spending_profile"), lambda: snapshot, redis_url, demo3.offline,
                               now_ms=later, sample=10_000)
    assert report.score == 1.0, [d.to_json() for d in report.worst(5)]


def test_a_corrupted_state_is_caught_and_listed(demo3: Demo, redis_url: str) -> None:
    demo3.send(demo_events(3000))
    view = demo3.view("user_transactions")
    snapshot = demo3.registry.snapshot(demo3.project)

    victim = sorted(archived(demo3.offline, view))[7]
    subs = demo3.online.load(view.name, view.version, view.agg, [victim])[0]
    sub = next(iter(subs.values()))
    fake = {"user_id": victim[0], "amount": 1000.0, "merchant": "m_x", "country": "ZZ", "ts": demo3.clock[0] - 60_000}
    view.agg.fold(sub.state, [fake], [sub.offset])  # an event that never happened, offset unchanged
    demo3.online.replace(view.name, view.version, view.agg, victim, subs, view.runtime.ttl)

    report = check_consistency(view, lambda: snapshot, redis_url, demo3.offline, now_ms=demo3.clock[0], sample=10_000)
    assert report.score < 1.0
    assert report.differing_entities == [victim[0]]
    changed = {d.feature for d in report.differences}
    assert {"txn_count_1h", "txn_amount_sum_1h", "txn_amount_max_24h"} <= changed
    count = next(d for d in report.differences if d.feature == "txn_count_1h")
    assert count.online == count.offline + 1 and count.status == "PRESENT"
    assert report.to_json()["worst_differences"][0]["entity"] == victim[0]

    client = redis.Redis.from_url(redis_url)  # a key lost: every feature with a value offline differs
    other = sorted(archived(demo3.offline, view))[3]
    client.delete(demo3.online.key(view.name, view.version, other))
    client.close()
    report = check_consistency(view, lambda: snapshot, redis_url, demo3.offline, now_ms=demo3.clock[0], keys=[other])
    assert report.missing_online == 1 and report.score < 1.0
    assert {d.status for d in report.differences} == {"MISSING"}


def test_events_the_worker_has_not_applied_yet_are_left_out(demo3: Demo, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    events = demo_events(2000)
    demo3.send(events[:1500])
    monkeypatch.setattr(demo3.processor.online, "execute", lambda batch: None)  # archived, not in Redis yet
    demo3.send(events[1500:])
    view = demo3.view("user_transactions")
    snapshot = demo3.registry.snapshot(demo3.project)
    report = check_consistency(view, lambda: snapshot, redis_url, demo3.offline,
                               now_ms=demo3.clock[0], sample=10_000)
    assert report.score == 1.0, [d.to_json() for d in report.worst(5)]
    assert report.pending_events == sum(1 for e in events[1500:] if e.well_formed)


def test_an_expired_key_is_consistent(demo3: Demo, redis_url: str) -> None:
    demo3.send(demo_events(500))
    view = demo3.view("merchant_activity")
    snapshot = demo3.registry.snapshot(demo3.project)

    client = redis.Redis.from_url(redis_url)
    client.delete(*client.scan_iter(f"fs:{demo3.project}:merchant_activity:v1:*"))  # as if the TTL ran out
    client.close()
    later = demo3.clock[0] + 3 * 86_400_000  # after the 2-day TTL the archive agrees: no key
    report = check_consistency(view, lambda: snapshot, redis_url, demo3.offline, now_ms=later, sample=10_000)
    assert report.score == 1.0 and report.expired == report.entities > 0
    report = check_consistency(view, lambda: snapshot, redis_url, demo3.offline, now_ms=demo3.clock[0], sample=10_000)
    assert report.missing_online == report.entities and report.score < 1.0


def test_value_comparison() -> None:
    assert same_value(0.1 + 0.2, 0.3) and same_value(1e300, 1e300 * (1 + 1e-12))
    assert not same_value(1.0, 1.0 + 1e-6) and not same_value(0, None) and not same_value(None, 0.0)
    assert same_value(None, None) and same_value(float("nan"), float("nan"))
    assert not same_value(1, True) and not same_value("DE", "FR") and same_value(3, 3)
    assert not same_value(676, 677)  # distinct counts too must be equal


def test_consistency_command(demo3: Demo, fresh_pg_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the command reads at the wall clock: a stream that ended a moment ago
    demo3.start = datetime.now(tz=UTC) - timedelta(minutes=13)
    demo3.send(demo_events(1500, start=demo3.start))
    monkeypatch.setenv(ENV_POSTGRES, fresh_pg_url)
    monkeypatch.setenv(ENV_REDIS, redis_url)
    runner = CliRunner()
    result = runner.invoke(app, ["consistency", "merchant_activity", "--project", demo3.project, "--sample", "50",
                                 "--seed", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["entities"] == 50 and report["score"] == 1.0, report["worst_differences"]
    assert set(report["per_feature"]) == {f.name for f in demo3.view("merchant_activity").runtime.view.features}

    result = runner.invoke(app, ["consistency", "user_transactions@1", "--project", demo3.project, "--sample", "20",
                                 "--min-score", "1"])
    assert result.exit_code == 0, result.output
    assert "Consistency of user_transactions@1" in result.stdout and "100.0000%" in result.stdout
    result = runner.invoke(app, ["consistency", "nope", "--project", demo3.project])
    assert result.exit_code == 1 and "no live feature view 'nope'" in result.stderr


def test_a_view_that_is_not_live_is_refused(demo3: Demo, redis_url: str) -> None:
    demo3.send(demo_events(200))
    snapshot = demo3.registry.snapshot(demo3.project)
    view = demo3.view("user_transactions")
    retired = OfflineView(view.runtime.__class__.build(view.runtime.view, 9, view.runtime.entity, view.source),
                          view.source, view.project)
    with pytest.raises(OfflineError, match="user_transactions@9 is not live"):
        check_consistency(retired, lambda: snapshot, redis_url, demo3.offline, now_ms=demo3.clock[0])


def test_distinct_counts_of_an_entity_spread_over_partitions_agree_exactly(
    demo3: Demo, redis_url: str
) -> None:
    """A merchant paid by 1,500 users over two hours: its distinct sets live per partition online and
    per tile offline, and give the same count."""
    t0 = to_millis(START)
    records, fields = [], []
    for i in range(1500):
        user = f"u_{i * 7919 % 3000:05d}"
        ts = t0 + i * 5000
        fields.append({"user_id": user, "amount": 1.5, "merchant": "m_big", "country": "DE", "ts": ts})
        records.append(Record(zlib.crc32(user.encode()) % 4, i, ts, json.dumps(fields[-1]).encode()))
    for start in range(0, 1500, 250):
        demo3.clock[0] = records[start + 249].timestamp_ms + 500
        demo3.processor.process(records[start : start + 250])
    view = demo3.view("merchant_activity")
    online = demo3.online.load(view.name, view.version, view.agg, [("m_big",)])[0]
    assert len(online) == 4
    served = view.agg.evaluate(merged_state(view.agg, online)[0], demo3.clock[0])["distinct_users_24h"]
    offline = view.agg.evaluate_history(fields, [demo3.clock[0]],
                                        [r.offset for r in records])[0]["distinct_users_24h"]
    assert served == offline  # the same registers, whatever the partitions and their order
    assert abs(offline - 1500) <= 0.05 * 1500

    snapshot = demo3.registry.snapshot(demo3.project)
    report = check_consistency(view, lambda: snapshot, redis_url, demo3.offline, now_ms=demo3.clock[0],
                               keys=[("m_big",)])
    assert report.score == 1.0 and not report.differences
