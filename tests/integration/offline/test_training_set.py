"""Point-in-time training sets on real PostgreSQL (and Redis for the serving cross-check).

The archive is written by the real stream processor from demo transactions (out-of-order and
late events included, arrival = the producer's schedule), in two bursts 27 hours apart so that
24-hour windows, max_age and the online TTL all come into play. Expected values come from a
naive reference written apart from the aggregation core: plain-Python windows over the raw
events (tests/support/reference.py) and ``pandas.merge_asof`` for the last-value feature.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import socket
import uuid
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql
from typer.testing import CliRunner

import featurestream
from featurestream.cli.app import app
from featurestream.definitions.loader import load_project
from featurestream.definitions.models import Project, ProjectDefinition
from featurestream.demo.generator import DemoEvent, generate_transactions, to_millis
from featurestream.offline import TrainingSetError, training_set
from featurestream.offline import join as join_module
from featurestream.offline import spill as spill_module
from featurestream.registry import Registry
from featurestream.serving.service import OnlineService, served_values
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.storage.online.redis_store import RedisOnlineStore
from featurestream.stream_jobs.processor import Record, SourceProcessor
from tests.support.reference import assert_features_match, user_transactions_reference
from tests.support.stream import live_runtimes

DEMO = Path(__file__).resolve().parents[3] / "definitions"
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
NOW_MS = to_millis(NOW)
HOUR = 3_600_000
PARTITIONS = 4
FEATURES = [
    "txn_count_1h",
    "txn_amount_sum_1h",
    "txn_amount_mean_1h",
    "txn_amount_max_24h",
    "distinct_merchants_24h",
    "last_country",
]
MAX_AGE_MS = {
    "txn_count_1h": 2 * HOUR,
    "txn_amount_sum_1h": 2 * HOUR,
    "txn_amount_mean_1h": 2 * HOUR,
    "txn_amount_max_24h": 48 * HOUR,
    "distinct_merchants_24h": 48 * HOUR,
    "last_country": None,
}
TTL_MS = 48 * HOUR  # user_transactions: longest window (24h) + 1 day
LEAK_USER = "u_leak"


@dataclass
class Archived:
    user: str
    event_ms: int
    arrival_ms: int
    offset: int
    fields: dict[str, Any]


@dataclass
class World:
    project: str
    url: str
    redis_url: str
    events: list[Archived]
    users: list[str]

    def by_user(self) -> dict[str, list[Archived]]:
        out: dict[str, list[Archived]] = defaultdict(list)
        for e in self.events:
            out[e.user].append(e)
        return out


# ------------------------------------------------------------------ the archive


def _definition(project: str) -> ProjectDefinition:
    definition = load_project(DEMO)
    return definition.model_copy(
        update={
            "project": Project(name=project),
            "feature_views": tuple(
                v for v in definition.feature_views if v.name in ("user_transactions", "merchant_activity")
            ),
            "feature_services": (),
            "consumers": (),
        }
    )


def _records(
    events: list[DemoEvent], anchor_ms: int, rate: float, offsets: dict[int, int]
) -> list[tuple[Record, DemoEvent]]:
    out = []
    for event in events:
        partition = zlib.crc32(event.key) % PARTITIONS
        arrival = anchor_ms + round(event.index * 1000 / rate)  # when the producer sent it
        out.append((Record(partition, offsets[partition], arrival, event.value), event))
        offsets[partition] += 1
    return out


def _leak_events(offsets: dict[int, int]) -> list[tuple[Record, dict[str, Any]]]:
    """A user with hand-placed events around T = NOW - 2h: one at T, one 1 ms after T, one 10
    minutes before T that arrives 1 ms after T, one 20 minutes before T that arrives exactly at T."""
    t = NOW_MS - 2 * HOUR
    placed = [(t, t, 10.0), (t + 1, t + 1, 20.0), (t - 600_000, t + 1, 40.0), (t - 1_200_000, t, 80.0)]
    partition = zlib.crc32(LEAK_USER.encode()) % PARTITIONS
    out = []
    for event_ms, arrival, amount in placed:
        fields = {
            "user_id": LEAK_USER,
            "amount": amount,
            "merchant": "m_leak",
            "country": "PT",
            "ts": event_ms,
        }
        value = json.dumps(fields).encode()
        out.append((Record(partition, offsets[partition], arrival, value), fields))
        offsets[partition] += 1
    return out


@pytest.fixture(scope="module")
def world(pg_admin_url: str, redis_url: str) -> Iterator[World]:
    # named like conftest's databases, so a run killed before its teardown gets cleaned up
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
    name = f"fs_test_{host}_{os.getpid()}_training{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    if "://" in pg_admin_url:
        url = urlunsplit(urlsplit(pg_admin_url)._replace(path=f"/{name}"))
    else:
        url = psycopg.conninfo.make_conninfo(pg_admin_url, dbname=name)
    project = f"train{uuid.uuid4().hex[:8]}"
    definition = _definition(project)
    registry = Registry(url)
    registry.apply(definition)
    source = definition.source("transactions")
    assert source is not None
    online = RedisOnlineStore(redis_url, project)
    offline = PostgresOfflineStore(url)
    clock = [NOW_MS]
    processor = SourceProcessor(source, live_runtimes(registry, definition), online, offline, clock_ms=lambda: clock[0])
    offsets: dict[int, int] = defaultdict(int)
    archived: list[Archived] = []
    bursts = [(NOW_MS - 30 * HOUR, 1500, 3), (NOW_MS - 3 * HOUR, 3000, 4)]
    for anchor, count, seed in bursts:
        demo = list(
            generate_transactions(
                count, seed=seed, now=NOW.fromtimestamp(anchor / 1000, UTC), rate=1.0, users=150
            )
        )
        pairs = _records(demo, anchor, 1.0, offsets)
        for start in range(0, len(pairs), 500):
            batch = pairs[start : start + 500]
            clock[0] = batch[-1][0].timestamp_ms
            result = processor.process([r for r, _ in batch])
            assert result.valid == sum(1 for _, e in batch if e.well_formed)
        for record, event in pairs:
            if event.event is not None and event.event_time is not None:
                fields = {**event.event, "ts": to_millis(event.event_time)}
                archived.append(
                    Archived(
                        event.user_id, to_millis(event.event_time), record.timestamp_ms, record.offset, fields
                    )
                )
    leak = _leak_events(offsets)
    clock[0] = NOW_MS - 2 * HOUR + 1
    assert processor.process([r for r, _ in leak]).valid == len(leak)
    for record, fields in leak:
        archived.append(Archived(LEAK_USER, fields["ts"], record.timestamp_ms, record.offset, fields))
    users = sorted({e.user for e in archived})
    try:
        yield World(project, url, redis_url, archived, users)
    finally:
        online.close()
        offline.close()
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


# ------------------------------------------------------------------ the reference


def expected_row(
    world_events: list[Archived], at_ms: int, *, as_of_arrival: bool
) -> dict[str, tuple[Any, str]]:
    """(value, status) of each feature for one user at ``at_ms``, computed naively."""
    visible = [
        e for e in world_events if e.event_ms <= at_ms and (not as_of_arrival or e.arrival_ms <= at_ms)
    ]
    if not visible:
        return {f: (None, "MISSING") for f in FEATURES}
    newest = max(e.event_ms for e in visible)
    written = max(e.arrival_ms for e in visible) if as_of_arrival else newest
    if at_ms - written >= TTL_MS:
        return {f: (None, "MISSING") for f in FEATURES}
    values = user_transactions_reference([(e.event_ms, e.offset, e.fields) for e in visible], at_ms)
    out: dict[str, tuple[Any, str]] = {}
    for name in FEATURES:
        value = values[name]
        max_age = MAX_AGE_MS[name]
        if value is None:
            out[name] = (None, "MISSING")
        elif max_age is not None and at_ms - newest > max_age:
            out[name] = (None, "STALE")
        else:
            out[name] = (value, "PRESENT")
    return out


def last_country_asof(world: World, labels: pd.DataFrame, *, as_of_arrival: bool) -> list[Any]:
    """``last_country`` by ``pandas.merge_asof`` (event-time mode only): the last event at or
    before each label time, ties broken by offset."""
    assert not as_of_arrival
    events = pd.DataFrame(
        {
            "user_id": pd.Series([e.user for e in world.events], dtype=object),
            "t": [e.event_ms for e in world.events],
            "offset": [e.offset for e in world.events],
            "country": [e.fields["country"] for e in world.events],
        }
    ).sort_values(["t", "offset"], kind="stable")
    left = pd.DataFrame(
        {"user_id": labels["user_id"].astype(object), "t": _label_ms(labels), "pos": range(len(labels))}
    )
    left = left[left["user_id"].notna()].sort_values("t", kind="stable")
    merged = pd.merge_asof(left, events, on="t", by="user_id", direction="backward", allow_exact_matches=True)
    merged = merged.sort_values("pos")
    out: list[Any] = [None] * len(labels)
    for pos, country in zip(merged["pos"], merged["country"], strict=True):
        out[pos] = None if pd.isna(country) else country
    return out


def _label_ms(labels: pd.DataFrame, column: str = "event_timestamp") -> list[int]:
    stamps = pd.to_datetime(labels[column], utc=True)
    return [int(ts.value // 1_000_000) for ts in stamps]


def check_against_reference(
    world: World, labels: pd.DataFrame, out: pd.DataFrame, *, as_of_arrival: bool
) -> None:
    by_user = world.by_user()
    times = _label_ms(labels)
    asof = last_country_asof(world, labels, as_of_arrival=False) if not as_of_arrival else None
    counted: dict[str, int] = defaultdict(int)
    for i in range(len(labels)):
        user = labels["user_id"].iloc[i]
        want = expected_row(
            by_user.get(user, []) if isinstance(user, str) else [], times[i], as_of_arrival=as_of_arrival
        )
        got_values = {f: _plain(out[f].iloc[i]) for f in FEATURES}
        got_status = {f: str(out[f + "__status"].iloc[i]) for f in FEATURES}
        where = f"row {i} ({user} at {times[i]})"
        assert got_status == {f: s for f, (_, s) in want.items()}, where
        assert_features_match(
            {f: v for f, v in got_values.items() if v is not None},
            {f: v for f, (v, _) in want.items() if v is not None},
            where=where,
        )
        assert {f for f, v in got_values.items() if v is None} == {
            f for f, (v, _) in want.items() if v is None
        }, where
        if asof is not None and got_status["last_country"] == "PRESENT":
            assert got_values["last_country"] == asof[i], where
        for _, status in want.values():
            counted[status] += 1
    # the labels must exercise every status the reference can give
    assert {"PRESENT", "MISSING", "STALE"} <= set(counted), counted


def _plain(value: Any) -> Any:
    if value is pd.NA or value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


# ------------------------------------------------------------------ labels


def make_labels(world: World, seed: int = 1) -> pd.DataFrame:
    rng = random.Random(seed)
    users = [*world.users, "u_09999", "u_nobody"]
    rows: list[tuple[Any, int]] = []
    for _ in range(260):
        rows.append((rng.choice(users), rng.randint(NOW_MS - 31 * HOUR, NOW_MS + 50 * HOUR)))
    sample = rng.sample(world.events, 40)
    for e in sample:  # exactly at an event, and one millisecond before it
        rows += [(e.user, e.event_ms), (e.user, e.event_ms - 1)]
    rows += [(LEAK_USER, NOW_MS - 2 * HOUR)] * 2
    rows += rows[:12]  # duplicate rows
    rng.shuffle(rows)
    micros = [rng.choice([0, 250, 999]) for _ in rows]  # sub-millisecond times floor to the millisecond
    return pd.DataFrame(
        {
            "user_id": [u for u, _ in rows],
            "event_timestamp": pd.to_datetime(
                [t * 1000 + us for (_, t), us in zip(rows, micros, strict=True)], unit="us", utc=True
            ),
            "label": pd.array([rng.choice([0, 1, None]) for _ in rows], dtype="Int64"),
        },
        index=pd.Index([f"r{rng.randrange(10**6)}" for _ in rows], name="id"),
    )


# ------------------------------------------------------------------ tests


def test_training_set_matches_the_naive_reference(world: World) -> None:
    labels = make_labels(world)
    out = training_set(labels, ["user_transactions"], project=world.project, postgres_url=world.url)
    assert list(out.columns) == [*labels.columns, *FEATURES, *(f + "__status" for f in FEATURES)]
    pd.testing.assert_frame_equal(out[list(labels.columns)], labels, check_exact=True)
    check_against_reference(world, labels, out, as_of_arrival=False)
    assert str(out["txn_count_1h"].dtype) == "Int64" and str(out["txn_count_1h__status"].dtype) == "category"


def test_as_of_arrival_matches_the_reference(world: World) -> None:
    labels = make_labels(world, seed=2)
    out = training_set(
        labels, ["user_transactions"], project=world.project, postgres_url=world.url, as_of_arrival=True
    )
    check_against_reference(world, labels, out, as_of_arrival=True)
    default = training_set(labels, ["user_transactions"], project=world.project, postgres_url=world.url)
    differs = (out["txn_count_1h"].fillna(-1) != default["txn_count_1h"].fillna(-1)).sum()
    assert differs > 0  # late events are hidden until they arrive


def test_nothing_after_the_timestamp_leaks_in(world: World) -> None:
    t = NOW_MS - 2 * HOUR
    labels = pd.DataFrame(
        {
            "user_id": [LEAK_USER] * 3,
            "event_timestamp": pd.to_datetime([t - 1, t, t + 1], unit="ms", utc=True),
        }
    )
    base = training_set(
        labels,
        ["user_transactions:txn_count_1h", "user_transactions:txn_amount_sum_1h"],
        project=world.project,
        postgres_url=world.url,
    )
    # at T: the events at T, T - 10 min and T - 20 min; the one 1 ms later never counts
    assert base["txn_count_1h"].tolist() == [2, 3, 4]
    assert base["txn_amount_sum_1h"].tolist() == [120.0, 130.0, 150.0]
    arrived = training_set(
        labels,
        ["user_transactions:txn_count_1h", "user_transactions:txn_amount_sum_1h"],
        project=world.project,
        postgres_url=world.url,
        as_of_arrival=True,
    )
    # as of arrival: the event of T - 10 min arrived at T + 1 ms, so it is missing until then;
    # the one of T - 20 min arrived exactly at T and counts from T on
    assert arrived["txn_count_1h"].isna().tolist() == [True, False, False]
    assert arrived["txn_count_1h"].iloc[1:].tolist() == [2, 4]
    assert arrived["txn_amount_sum_1h"].iloc[1:].tolist() == [90.0, 150.0]
    assert str(arrived["txn_count_1h__status"].iloc[0]) == "MISSING"  # nothing had arrived at T - 1 ms


def test_max_age_nulls_and_flags_and_ttl_expires(world: World) -> None:
    t = NOW_MS - 2 * HOUR + 1  # the leak user's newest event
    labels = pd.DataFrame(
        {
            "user_id": [LEAK_USER] * 4,
            "event_timestamp": pd.to_datetime(
                [t + 2 * HOUR, t + 2 * HOUR + 1, t + 48 * HOUR - 1, t + 48 * HOUR], unit="ms", utc=True
            ),
        }
    )
    out = training_set(labels, ["user_transactions"], project=world.project, postgres_url=world.url)
    # exactly max_age (2h) old: still fresh; 1 ms more: null and STALE
    assert [str(s) for s in out["txn_count_1h__status"]] == ["PRESENT", "STALE", "STALE", "MISSING"]
    assert out["txn_count_1h"].iloc[0] == 0 and out["txn_count_1h"].isna().tolist()[1:] == [True, True, True]
    # 2-day max_age features stay; the online key expires 48h after the last write: MISSING
    assert [str(s) for s in out["txn_amount_max_24h__status"]] == ["PRESENT", "PRESENT", "MISSING", "MISSING"]
    assert [str(s) for s in out["last_country__status"]] == ["PRESENT", "PRESENT", "PRESENT", "MISSING"]
    assert out["last_country"].tolist()[:3] == ["PT"] * 3 and pd.isna(out["last_country"].iloc[3])


def test_unknown_and_keyless_entities_get_nulls(world: World) -> None:
    labels = pd.DataFrame(
        {
            "user_id": ["u_nobody", None, world.users[0]],
            "event_timestamp": pd.to_datetime([NOW_MS] * 3, unit="ms", utc=True),
        }
    )
    out = training_set(labels, ["user_transactions"], project=world.project, postgres_url=world.url)
    for f in FEATURES:
        assert out[f].isna().tolist()[:2] == [True, True], f
        assert [str(s) for s in out[f + "__status"]][:2] == ["MISSING", "MISSING"], f
    assert str(out["last_country__status"].iloc[2]) == "PRESENT"


def test_serving_at_the_same_time_gives_the_same_values(world: World) -> None:
    """The training row at T equals what the online service reads from Redis at T."""
    registry = Registry(world.url)
    snapshot = registry.snapshot(world.project)
    service = OnlineService(lambda: snapshot, world.redis_url, clock_ms=lambda: NOW_MS)
    try:
        users = [u for u in world.users if u != LEAK_USER]
        served = service.get_online([{"user_id": u} for u in users], ["user_transactions"])
    finally:
        service.close()
    labels = pd.DataFrame(
        {"user_id": users, "event_timestamp": pd.to_datetime([NOW_MS] * len(users), unit="ms", utc=True)}
    )
    out = training_set(labels, ["user_transactions"], project=world.project, postgres_url=world.url)
    for i, row in enumerate(served.rows):
        for name, value in zip(served.feature_names, row.values, strict=True):
            feature = name.split(":")[1]
            assert str(out[feature + "__status"].iloc[i]) == value.status, (users[i], feature)
            got = _plain(out[feature].iloc[i])
            if value.status == "STALE":
                assert got is None
            elif value.value is None:
                assert got is None
            else:
                assert_features_match({feature: got}, {feature: value.value}, where=users[i])


def test_input_columns_and_order_are_kept_with_odd_dtypes(world: World) -> None:
    labels = make_labels(world, seed=3).iloc[:80]
    n = len(labels)
    odd = labels.assign(
        weight=[math.nan if i % 7 == 0 else i / 3 for i in range(n)],
        kind=pd.Categorical([["a", "b", "c"][i % 3] for i in range(n)]),
        mixed=pd.Series(
            [[1, 2], "x", None, 3.5] * (n // 4) + [None] * (n % 4), index=labels.index, dtype=object
        ),
        amount=[Decimal("1.10")] * n,
        local=pd.date_range("2026-01-01", periods=n, freq="h", tz="Europe/Berlin"),
        flag=pd.array([True, False, None] * (n // 3) + [None] * (n % 3), dtype="boolean"),
        key_as_int=range(n),
    )
    odd.insert(0, "user_id", odd.pop("user_id"))  # column order as given
    out = training_set(odd, ["user_transactions:last_country"], project=world.project, postgres_url=world.url)
    pd.testing.assert_frame_equal(out[list(odd.columns)], odd, check_exact=True)
    assert out.index.equals(odd.index)
    assert list(out.columns)[-2:] == ["last_country", "last_country__status"]


def test_small_blocks_buckets_and_parallel_workers_give_the_same_result(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    labels = make_labels(world, seed=4)
    want = training_set(labels, ["user_transactions"], project=world.project, postgres_url=world.url)
    monkeypatch.setattr(join_module, "BLOCK_ROWS", 7)
    monkeypatch.setattr(spill_module, "MIN_BUCKET_ROWS", 13)
    monkeypatch.setattr(spill_module, "MAX_BUCKETS", 10_000)
    got = training_set(labels, ["user_transactions"], project=world.project, postgres_url=world.url)
    pd.testing.assert_frame_equal(got, want)
    parallel = training_set(
        labels, ["user_transactions"], project=world.project, postgres_url=world.url, workers=3
    )
    pd.testing.assert_frame_equal(parallel, want)


def test_views_of_two_entities_and_shared_feature_names(world: World) -> None:
    by_user = world.by_user()
    pairs = [(u, e.fields["merchant"]) for u in world.users[:30] for e in by_user[u][:2]]
    t = NOW_MS - 150 * 60_000  # inside the second burst
    labels = pd.DataFrame(
        {
            "user_id": [u for u, _ in pairs],
            "merchant": [m for _, m in pairs],
            "event_timestamp": pd.to_datetime([t] * len(pairs), unit="ms", utc=True),
        }
    )
    out = training_set(
        labels,
        [
            "merchant_activity:txn_count_15m",
            "user_transactions:txn_count_1h",
            "merchant_activity:distinct_users_24h",
        ],
        project=world.project,
        postgres_url=world.url,
    )
    assert list(out.columns)[3:6] == ["txn_count_15m", "txn_count_1h", "distinct_users_24h"]
    lo = t - t % 60_000 - 15 * 60_000 + 60_000
    present = 0
    for i, (_, merchant) in enumerate(pairs):
        seen = [e.event_ms for e in world.events if e.fields["merchant"] == merchant and e.event_ms <= t]
        count = sum(1 for ms in seen if ms >= lo)
        fresh = bool(seen) and t - max(seen) <= HOUR  # max_age 1h
        assert _plain(out["txn_count_15m"].iloc[i]) == (count if fresh else None), merchant
        present += fresh
    assert present > 10
    with pytest.raises(TrainingSetError, match="already have column"):
        training_set(
            labels.assign(txn_count_1h=1),
            ["user_transactions:txn_count_1h"],
            project=world.project,
            postgres_url=world.url,
        )


def test_feature_name_shared_by_two_views_is_prefixed() -> None:
    from featurestream.offline.features import _column_names

    definition = load_project(DEMO)
    spending = definition.feature_view("user_spending_profile")
    merchant = definition.feature_view("merchant_activity")
    assert spending is not None and merchant is not None
    chosen = {
        ("user_spending_profile", 1): [spending.feature("txn_count_15m"), spending.feature("txn_count_1h")],
        ("merchant_activity", 1): [merchant.feature("txn_count_15m")],
        ("merchant_activity", 2): [merchant.feature("txn_count_15m")],
    }
    names = _column_names(chosen, set())  # type: ignore[arg-type]
    assert names[("user_spending_profile", 1, "txn_count_15m")] == "user_spending_profile__txn_count_15m"
    assert names[("user_spending_profile", 1, "txn_count_1h")] == "txn_count_1h"
    assert names[("merchant_activity", 2, "txn_count_15m")] == "merchant_activity_v2__txn_count_15m"


# ------------------------------------------------------------------ files and the CLI


def _cli(world: World, *args: str) -> Any:
    result = CliRunner().invoke(
        app, ["training-set", *args, "--project", world.project, "--postgres-url", world.url]
    )
    return result


CSV_TEXT = [
    ["user_id", "note", "event_timestamp", "score"],
    ["u_00001", "plain", "2026-11-27T10:00:00Z", "007"],
    ["u_00002", 'a,b "quoted"', "2026-11-27 11:30:00+01:00", "1.50"],
    ["u_nobody", "", "2026-11-27T09:00:00.250", ""],
    ["u_00003", "multi\nline é", "2026-11-26T12:00:00.000+00:00", "-0"],
    ["u_00001", "plain", "2026-11-27T10:00:00Z", "007"],
]


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_cli_csv_in_csv_out_keeps_the_text(world: World, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    rows = CSV_TEXT + [
        [u, f"n{i}", f"2026-11-27T{i % 12:02d}:15:00Z", str(i)] for i, u in enumerate(world.users)
    ]
    _write_csv(labels, rows)
    out = tmp_path / "train.csv"
    result = _cli(world, "--labels", str(labels), "--feature", "user_transactions", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "label rows" in result.output  # progress lines: no terminal here
    assert not list(tmp_path.glob(".*partial*"))
    with out.open(newline="") as handle:
        written = list(csv.reader(handle))
    assert written[0] == [*rows[0], *FEATURES, *(f + "__status" for f in FEATURES)]
    assert [r[: len(rows[0])] for r in written[1:]] == rows[1:]
    # the same values as the Python API on the parsed labels
    frame = pd.DataFrame(rows[1:], columns=rows[0])
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True, format="ISO8601")
    api = training_set(frame, ["user_transactions"], project=world.project, postgres_url=world.url)
    for i, row in enumerate(written[1:]):
        for j, f in enumerate(FEATURES):
            text = row[len(rows[0]) + j]
            value = _plain(api[f].iloc[i])
            assert (text == "") == (value is None), (i, f)
            if value is not None:
                assert text == str(value) or math.isclose(float(text), float(value)), (i, f, text, value)
            assert row[len(rows[0]) + len(FEATURES) + j] == str(api[f + "__status"].iloc[i])


def test_cli_parquet_in_parquet_out_keeps_types(world: World, tmp_path: Path) -> None:
    n = 50
    users = [world.users[i % len(world.users)] for i in range(n)]
    table = pa.table(
        {
            "event_timestamp": pa.array(
                [(NOW_MS - i * 600_000) * 1000 for i in range(n)], pa.timestamp("us", tz="UTC")
            ),
            "tags": pa.array([[i, i + 1] if i % 5 else None for i in range(n)], pa.list_(pa.int32())),
            "user_id": pa.array(users).dictionary_encode(),
            "price": pa.array([Decimal(f"{i}.25") for i in range(n)], pa.decimal128(10, 2)),
            "day": pa.array(
                [datetime(2026, 1, 1 + i % 28, tzinfo=UTC).date() for i in range(n)], pa.date32()
            ),
            "big": pa.array([2**63 + i for i in range(n)], pa.uint64()),
            "info": pa.array([{"a": i, "b": str(i)} for i in range(n)]),
        }
    )
    table = pa.concat_tables([table, table.slice(3, 4)])  # duplicate rows
    labels = tmp_path / "labels.parquet"
    pq.write_table(table, labels, row_group_size=7)
    out = tmp_path / "train.parquet"
    result = _cli(
        world,
        "--labels",
        str(labels),
        "-f",
        "user_transactions:txn_count_1h",
        "-f",
        "user_transactions:last_country",
        "--out",
        str(out),
        "--no-progress",
        "--json",
    )
    assert result.exit_code == 0, result.output
    written = pq.read_table(out)
    assert written.select(table.column_names).equals(table)
    assert written.schema.field("txn_count_1h").type == pa.int64()
    assert written.column_names[len(table.column_names) :] == [
        "txn_count_1h",
        "last_country",
        "txn_count_1h__status",
        "last_country__status",
    ]
    frame = table.select(["user_id", "event_timestamp"]).to_pandas()
    api = training_set(
        frame,
        ["user_transactions:txn_count_1h", "user_transactions:last_country"],
        project=world.project,
        postgres_url=world.url,
    )
    assert written["txn_count_1h"].to_pylist() == [_plain(v) for v in api["txn_count_1h"]]
    assert written["last_country"].to_pylist() == [_plain(v) for v in api["last_country"]]


def test_cli_csv_to_parquet_and_parquet_to_csv(world: World, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    _write_csv(labels, CSV_TEXT)
    as_parquet = tmp_path / "train.parquet"
    result = _cli(
        world,
        "--labels",
        str(labels),
        "-f",
        "user_transactions:txn_count_1h",
        "--out",
        str(as_parquet),
        "--no-status",
    )
    assert result.exit_code == 0, result.output
    written = pq.read_table(as_parquet)
    assert written.column_names == [*CSV_TEXT[0], "txn_count_1h"]
    assert [list(r.values()) for r in written.select(CSV_TEXT[0]).to_pylist()] == CSV_TEXT[
        1:
    ]  # text as given

    back = tmp_path / "again.csv"
    result = _cli(
        world, "--labels", str(as_parquet), "-f", "user_transactions:last_country", "--out", str(back)
    )
    assert result.exit_code == 0, result.output
    with back.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == [*CSV_TEXT[0], "txn_count_1h", "last_country", "last_country__status"]
    assert [r[:4] for r in rows[1:]] == CSV_TEXT[1:]
    assert rows[3][-1] == "MISSING" and rows[3][-2] == ""  # u_nobody


def test_cli_reports_user_errors(world: World, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    _write_csv(labels, [["user_id", "when"], ["u_00001", "2026-11-27T10:00:00Z"]])
    out = tmp_path / "train.csv"
    result = _cli(world, "--labels", str(labels), "-f", "user_transactions", "--out", str(out))
    assert result.exit_code == 1 and "no timestamp column 'event_timestamp'" in result.output
    result = _cli(
        world,
        "--labels",
        str(labels),
        "-f",
        "user_transactions",
        "--out",
        str(out),
        "--timestamp-column",
        "when",
    )
    assert result.exit_code == 0, result.output
    result = _cli(world, "--labels", str(labels), "-f", "user_transactions:nope", "--out", str(out))
    assert result.exit_code == 1 and "unknown feature 'nope'" in result.output
    result = _cli(
        world,
        "--labels",
        str(labels),
        "-f",
        "merchant_activity",
        "--out",
        str(out),
        "--timestamp-column",
        "when",
    )
    assert result.exit_code == 1 and "join key column(s) merchant" in result.output
    result = _cli(
        world, "--labels", str(labels), "-f", "user_transactions", "--out", str(tmp_path / "x.json")
    )
    assert result.exit_code == 1 and "unknown file type" in result.output
    _write_csv(labels, [["user_id", "event_timestamp"], ["u_00001", "yesterday"]])
    result = _cli(world, "--labels", str(labels), "-f", "user_transactions", "--out", str(out))
    assert result.exit_code == 1 and "not an ISO-8601 timestamp" in result.output


def test_lazy_export_from_the_package() -> None:
    assert featurestream.training_set is training_set


def test_empty_labels_give_an_empty_training_set(world: World, tmp_path: Path) -> None:
    labels = pd.DataFrame(
        {"user_id": pd.Series([], dtype=object), "event_timestamp": pd.to_datetime([], utc=True)}
    )
    out = training_set(
        labels, ["user_transactions:txn_count_1h"], project=world.project, postgres_url=world.url
    )
    assert len(out) == 0 and list(out.columns) == [
        "user_id",
        "event_timestamp",
        "txn_count_1h",
        "txn_count_1h__status",
    ]
    csv_path = tmp_path / "empty.csv"
    _write_csv(csv_path, [["user_id", "event_timestamp", "y"]])
    parquet_out = tmp_path / "empty.parquet"
    result = _cli(
        world, "--labels", str(csv_path), "-f", "user_transactions:txn_count_1h", "--out", str(parquet_out)
    )
    assert result.exit_code == 0, result.output
    written = pq.read_table(parquet_out)
    assert written.num_rows == 0
    assert written.column_names == ["user_id", "event_timestamp", "y", "txn_count_1h", "txn_count_1h__status"]


def test_statuses_follow_the_serving_rules() -> None:
    """Training-set statuses and values against what serving returns, and against the rules
    written out (max_age 2h, validation 0..5), on a grid of cases."""
    from types import SimpleNamespace

    from featurestream.definitions.models import Feature
    from featurestream.offline.pointintime import _Output, _status

    feature = Feature.model_validate(
        {
            "name": "n",
            "aggregation": "count",
            "window": "1h",
            "max_age": "2h",
            "validation": {"min": 0, "max": 5},
        }
    )
    ref = SimpleNamespace(view_key=("v", 1), feature=feature, check=feature.validation, max_age_ms=2 * HOUR)
    out = _Output("n", 0, 2 * HOUR, feature.validation)
    at = NOW_MS
    for known in (False, True):
        for value in (None, 0, 3, 9):
            for newest in (None, at, at - 2 * HOUR, at - 2 * HOUR - 1):
                if known and newest is None:
                    continue
                if not known or value is None:
                    expected = "MISSING"
                elif value > 5:
                    expected = "INVALID"
                elif newest is not None and at - newest > 2 * HOUR:
                    expected = "STALE"
                else:
                    expected = "PRESENT"
                [served] = served_values([ref], {("v", 1): ({"n": value}, newest, known)}, at)  # type: ignore[list-item]
                value_out, status = _status(value, known, newest, at, out)
                assert status == served.status == expected, (known, value, newest)
                assert served.value == (value if known else None)
                assert value_out == (value if expected in ("PRESENT", "INVALID") else None), (known, value, newest)
