"""The demo transaction generator: deterministic, realistic, and malformed exactly where it says so."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from featurestream.definitions.loader import load_project
from featurestream.definitions.models import Source
from featurestream.demo.generator import (
    KIND_LATE,
    KIND_OUT_OF_ORDER,
    KIND_VALID,
    MALFORMED_REASONS,
    DemoEvent,
    generate_transactions,
    parse_event_time,
)
from featurestream.demo.producer import TokenBucket

DEMO = Path(__file__).resolve().parents[2] / "definitions"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
N = 40_000
SHARES = {"malformed_share": 0.01, "late_share": 0.03, "out_of_order_share": 0.06}
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int64": (int,),
    "float64": (int, float),
    "bool": (bool,),
    "timestamp": (str, int),
}


@pytest.fixture(scope="module")
def source() -> Source:
    found = load_project(DEMO).source("transactions")
    assert found is not None
    return found


@pytest.fixture(scope="module")
def sample() -> list[DemoEvent]:
    return list(generate_transactions(N, 7, now=NOW, **SHARES))


def refusal(value: bytes, source: Source) -> str | None:
    """Why the ``transactions`` source (as declared in definitions/) refuses ``value``, or None.

    An independent reading of the schema, named like the generator's malformed reasons.
    """
    try:
        event = json.loads(value)
    except ValueError:
        return "broken_json"
    if not isinstance(event, dict):
        return "broken_json"
    for field in source.fields:
        if field.required and event.get(field.name) is None:
            return "missing_field"
    for field in source.fields:
        item: Any = event.get(field.name)
        if item is None:
            continue
        if not isinstance(item, JSON_TYPES[field.type]) or (isinstance(item, bool) and field.type != "bool"):
            return "wrong_type"
        if field.min is not None and item < field.min:
            return "negative_amount"
        if field.max_length is not None and len(item) > field.max_length:
            return "absurd_string"
        if field.type == "timestamp":
            try:
                parse_event_time(item)
            except ValueError:
                return "bad_timestamp"
    return None


def test_same_seed_same_events_other_seed_other_events() -> None:
    def run(seed: int) -> list[tuple[bytes, bytes, str]]:
        return [(e.key, e.value, e.kind) for e in generate_transactions(3000, seed, now=NOW, rate=50)]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_shares_are_within_tolerance(sample: list[DemoEvent]) -> None:
    kinds = Counter("malformed" if e.malformed_reason else e.kind for e in sample)
    expected = {
        "malformed": SHARES["malformed_share"],
        KIND_LATE: SHARES["late_share"],
        KIND_OUT_OF_ORDER: SHARES["out_of_order_share"],
    }
    expected[KIND_VALID] = 1 - sum(expected.values())
    for kind, share in expected.items():
        sigma = math.sqrt(N * share * (1 - share))
        assert abs(kinds[kind] - N * share) < 5 * sigma, (kind, kinds[kind], N * share)
    reasons = Counter(e.malformed_reason for e in sample if e.malformed_reason)
    assert set(reasons) == set(MALFORMED_REASONS)
    per_reason = kinds["malformed"] / len(MALFORMED_REASONS)
    assert all(n > per_reason / 3 for n in reasons.values()), reasons


def test_malformed_events_are_refused_for_the_reason_they_are_tagged_with(
    sample: list[DemoEvent], source: Source
) -> None:
    malformed = [e for e in sample if e.malformed_reason]
    assert malformed
    for event in malformed:
        assert event.event is None and event.event_time is None
        assert refusal(event.value, source) == event.malformed_reason, event.value[:200]


def test_well_formed_events_are_valid_json_with_the_declared_types(
    sample: list[DemoEvent], source: Source
) -> None:
    formats: Counter[str] = Counter()
    for event in sample:
        if event.malformed_reason:
            continue
        assert event.kind in (KIND_VALID, KIND_OUT_OF_ORDER, KIND_LATE)
        parsed = json.loads(event.value)
        assert parsed == event.event
        assert refusal(event.value, source) is None
        assert set(parsed) == {"user_id", "amount", "merchant", "country", "ts"}
        assert isinstance(parsed["user_id"], str) and event.key == parsed["user_id"].encode()
        assert isinstance(parsed["amount"], float) and parsed["amount"] >= 0
        assert isinstance(parsed["merchant"], str) and parsed["merchant"].startswith("m_")
        assert len(parsed["country"]) == 2 and parsed["country"].isupper()
        ts = parsed["ts"]
        if isinstance(ts, int):
            formats["epoch_millis"] += 1
        else:
            formats["iso_z" if ts.endswith("Z") else "iso_offset"] += 1
        assert parse_event_time(ts) == event.event_time
    total = sum(formats.values())
    assert set(formats) == {"epoch_millis", "iso_z", "iso_offset"}
    assert 0.4 < formats["epoch_millis"] / total < 0.6


def test_event_times_follow_the_schedule_and_the_kind() -> None:
    rate = 20.0
    for event in generate_transactions(5000, 3, now=NOW, rate=rate, **SHARES):
        if event.event_time is None:
            continue
        scheduled = NOW + timedelta(seconds=event.index / rate)
        lag = scheduled - event.event_time
        if event.kind == KIND_VALID:
            assert timedelta(0) <= lag <= timedelta(seconds=2)
        elif event.kind == KIND_OUT_OF_ORDER:
            assert timedelta(seconds=5) <= lag <= timedelta(minutes=15)
        else:
            assert event.kind == KIND_LATE
            assert timedelta(hours=1) < lag <= timedelta(hours=6)


def test_activity_is_skewed_across_a_few_thousand_users(sample: list[DemoEvent]) -> None:
    per_user = Counter(e.user_id for e in sample)
    assert 2000 < len(per_user) <= 3000
    ranked = [n for _, n in per_user.most_common()]
    top_1pct = sum(ranked[:30]) / N
    assert 0.2 < top_1pct < 0.6  # uniform would be 0.01
    assert ranked[0] / N < 0.1
    assert ranked[0] > 50 * statistics.median(ranked)


def test_users_have_favourite_merchants_a_home_country_and_lognormal_amounts(sample: list[DemoEvent]) -> None:
    merchants: defaultdict[str, Counter[str]] = defaultdict(Counter)
    countries: defaultdict[str, Counter[str]] = defaultdict(Counter)
    amounts = []
    for event in sample:
        if event.event is None:
            continue
        merchants[event.user_id][event.event["merchant"]] += 1
        countries[event.user_id][event.event["country"]] += 1
        amounts.append(event.event["amount"])
    busy = [user for user, seen in merchants.items() if seen.total() >= 100]
    assert busy
    for user in busy:
        favourite_share = sum(n for _, n in merchants[user].most_common(6)) / merchants[user].total()
        assert favourite_share > 0.6, user
        home_share = countries[user].most_common(1)[0][1] / countries[user].total()
        assert home_share > 0.8, user
        assert len(merchants[user]) > 6  # not only favourites
    assert min(amounts) >= 0
    median = statistics.median(amounts)
    assert 10 < median < 60
    logs = [math.log(a) for a in amounts if a > 0]
    assert abs(statistics.mean(logs) - math.log(median)) < 0.15  # log-amounts are symmetric
    assert sorted(amounts)[int(0.99 * len(amounts))] > 5 * median  # heavy right tail


def test_arguments_are_checked_before_iterating() -> None:
    with pytest.raises(ValueError):
        generate_transactions(10, malformed_share=0.6, late_share=0.6)
    with pytest.raises(ValueError):
        generate_transactions(-1)
    with pytest.raises(ValueError):
        generate_transactions(10, rate=-1)
    assert list(generate_transactions(0, now=NOW)) == []


def test_zero_rate_anchors_every_event_at_now() -> None:
    for event in generate_transactions(
        500, 1, now=NOW, malformed_share=0, late_share=0, out_of_order_share=0
    ):
        assert event.kind == KIND_VALID
        assert event.event_time is not None
        assert NOW - timedelta(seconds=2) <= event.event_time <= NOW


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


def test_token_bucket_paces_to_the_rate_without_sleeping_per_message() -> None:
    fake = FakeTime()
    sleeps = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        fake.sleep(seconds)

    bucket = TokenBucket(1000.0, clock=fake.clock, sleep=sleep)
    for _ in range(5001):
        bucket.acquire()
    assert fake.now == pytest.approx(5.0, rel=1e-2)
    assert len(sleeps) < 5000 / 4  # each wait lets several messages through
    # An idle period refills at most ``capacity`` tokens: no unbounded burst afterwards.
    fake.now += 100.0
    start = fake.now
    for _ in range(int(bucket.capacity) + 1000):
        bucket.acquire()
    assert fake.now - start == pytest.approx(1.0, rel=1e-2)
