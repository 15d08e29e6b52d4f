"""Training-set benchmark: label rows per second and peak memory against a large raw archive.

::

    python bench/training_set.py [--events N] [--labels 100000,1000000] [--workers 1,2]
                                 [--quick] [--json PATH]

1. A throwaway database (``fs_tsbench_<pid>_<random>``) on the server of
   ``FEATURESTREAM_POSTGRES_URL``, else this machine's (``postgresql://postgres@127.0.0.1:5432``);
   dropped at the end. The demo definitions are applied to its registry.
2. N raw ``transactions`` events (default 10,000,000; ``--quick``: 1,000,000) are generated
   with numpy and COPYed straight into the archive table ``fs_offline.raw__transactions``
   (not through Kafka): 100 events per user on average over 30 days, Zipf-like user activity,
   arrival 0-3 s after the event time, 2% of events archived 65 min to 6 h late, 5% 5 s to
   15 min out of order. The primary key and the (user_id, event_time) index are built after
   the load (as ``ensure_source`` defines them), then the table is analysed.
3. Label files (Parquet) of each size: users drawn like the events' users plus 1% unknown
   users, timestamps uniform over the last 20 days, a label column and a string column.
4. Each case runs ``featurestream training-set --feature user_transactions`` (6 features: 1 h
   and 24 h windows, a distinct count and a lifetime last value, so every entity's whole
   history is read) in its own process, once per ``--workers`` value, Parquet out.

Figures per case: ``seconds`` (wall clock of the command), ``rows_per_s``, ``peak_mb`` (the
command's ``ru_maxrss`` from ``os.wait4``: with workers, the largest single process),
``peak_tree_mb`` (largest sampled sum over the command and its workers), ``cpu_s`` (user +
system of the command and its workers; PostgreSQL's own time is not in it) and ``load_avg``
(1-minute load before and after: on a shared 2-core machine, wall times follow the load).

``--quick`` runs the 100k case only against 1M events (a couple of minutes on an idle machine).
``--json PATH`` writes ``{"cases": [{"rows", "seconds", "rows_per_s", "peak_mb", ...}]}``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psutil
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from psycopg import sql

from featurestream.config import ENV_POSTGRES
from featurestream.definitions.loader import load_project
from featurestream.registry import Registry
from featurestream.storage.offline.layout import qualified, table_name
from featurestream.storage.offline.postgres import PostgresOfflineStore

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "definitions"
MACHINE_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
END = datetime(2026, 11, 27, 0, 0, tzinfo=UTC)
DAYS = 30
DAY_MS = 86_400_000
EVENTS_PER_USER = 100
BLOCK = 1_000_000
COUNTRIES = np.array(["DE", "FR", "GB", "ES", "IT", "NL", "PL", "SE", "BE", "AT", "PT", "US"])
MERCHANTS = np.array([f"m_{i:04d}" for i in range(400)])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ database


def _with_db(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@contextmanager
def throwaway_database() -> Iterator[str]:
    admin = os.environ.get(ENV_POSTGRES) or MACHINE_POSTGRES
    name = f"fs_tsbench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield _with_db(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


# ------------------------------------------------------------------ data


def user_ids(indices: np.ndarray) -> pa.Array:
    digits = pc.utf8_lpad(pc.cast(pa.array(indices), pa.string()), 6, "0")
    return pc.binary_join_element_wise("u_", digits, "")


def utc_text(epoch_ms: np.ndarray) -> pa.Array:
    """ISO text with a UTC offset: pyarrow's CSV writer is ~20x slower on tz-aware timestamps."""
    naive = pc.cast(pa.array(epoch_ms, pa.timestamp("ms")), pa.string())
    return pc.binary_join_element_wise(naive, "+00", "")


def user_weights(users: int) -> np.ndarray:
    """Zipf-like activity (exponent 0.8 over a shuffled rank): the busiest users make many times
    the median user's transactions."""
    rng = np.random.default_rng(1)
    weights = (np.arange(users) + 10.0) ** -0.8
    rng.shuffle(weights)
    out: np.ndarray = weights / weights.sum()
    return out


def event_block(
    rng: np.random.Generator, start: int, count: int, users: int, weights: np.ndarray
) -> pa.Table:
    end_ms = int(END.timestamp() * 1000)
    user = rng.choice(users, size=count, p=weights)
    event_ms = rng.integers(end_ms - DAYS * DAY_MS, end_ms, size=count)
    delay = rng.integers(0, 3000, size=count)
    late = rng.random(count) < 0.02
    delay[late] = rng.integers(65 * 60_000, 6 * 3_600_000, size=int(late.sum()))
    ooo = (rng.random(count) < 0.05) & ~late
    delay[ooo] = rng.integers(5_000, 15 * 60_000, size=int(ooo.sum()))
    order = np.argsort(event_ms, kind="stable")  # fewer switches between day partitions
    user, event_ms, delay = user[order], event_ms[order], delay[order]
    amount = np.round(np.minimum(rng.lognormal(np.log(25.0), 0.9, size=count), 20_000.0), 2)
    return pa.table(
        {
            "event_time": utc_text(event_ms),
            "arrival_time": utc_text(event_ms + delay),
            "kafka_partition": pa.array(user % 4, pa.int32()),
            "kafka_offset": pa.array(np.arange(start, start + count), pa.int64()),
            "user_id": user_ids(user),
            "amount": pa.array(amount),
            "merchant": pa.array(MERCHANTS[rng.integers(0, len(MERCHANTS), size=count)]),
            "country": pa.array(COUNTRIES[rng.integers(0, len(COUNTRIES), size=count)]),
        }
    )


def load_events(url: str, events: int) -> int:
    """COPY ``events`` generated events into the archive; returns the number of users."""
    definition = load_project(DEMO)
    Registry(url).apply(definition)
    source = definition.source("transactions")
    assert source is not None
    users = max(1000, events // EVENTS_PER_USER)
    weights = user_weights(users)
    store = PostgresOfflineStore(url)
    try:
        store.ensure_source(source, [])
        table = table_name("raw", source.name)
        conn = store.connection
        with conn.transaction():
            store.partitioner.ensure_days(
                conn, table, {(END - timedelta(days=d + 1)).date() for d in range(DAYS)}
            )
        # Indexes are built after the load (several times faster than maintaining them row by row);
        # the table ends up exactly as ensure_source makes it.
        pkey = conn.execute(
            "select conname from pg_constraint where conrelid = %s::regclass and contype = 'p'",
            [f"fs_offline.{table}"],
        ).fetchone()
        assert pkey is not None
        conn.execute(
            sql.SQL("alter table {} drop constraint {}").format(qualified(table), sql.Identifier(pkey[0]))
        )
        rng = np.random.default_rng(7)
        columns = sql.SQL(", ").join(
            map(
                sql.Identifier,
                [
                    "event_time",
                    "arrival_time",
                    "kafka_partition",
                    "kafka_offset",
                    "user_id",
                    "amount",
                    "merchant",
                    "country",
                ],
            )
        )
        started = time.perf_counter()
        with store.connection.cursor() as cur:
            for start in range(0, events, BLOCK):
                block = event_block(rng, start, min(BLOCK, events - start), users, weights)
                buf = io.BytesIO()
                pacsv.write_csv(block, buf, pacsv.WriteOptions(include_header=False))
                with cur.copy(
                    sql.SQL("copy {} ({}) from stdin (format csv)").format(qualified(table), columns)
                ) as copy:
                    copy.write(buf.getbuffer())
                log(f"  {start + block.num_rows:,} events copied ({time.perf_counter() - started:.0f} s)")
        conn.execute(
            sql.SQL(
                "alter table {} add constraint {} primary key (kafka_partition, kafka_offset, event_time)"
            ).format(qualified(table), sql.Identifier(pkey[0]))
        )
        store.ensure_source(source, [("user_id",)])
        conn.execute(sql.SQL("analyze {}").format(qualified(table)))
        log(f"  index built and analysed ({time.perf_counter() - started:.0f} s)")
    finally:
        store.close()
    return users


def write_labels(path: Path, rows: int, users: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    end_ms = int(END.timestamp() * 1000)
    user = rng.choice(users, size=rows, p=user_weights(users))
    unknown = rng.random(rows) < 0.01
    user[unknown] = users + rng.integers(0, users, size=int(unknown.sum()))
    ts = rng.integers(end_ms - 20 * DAY_MS, end_ms, size=rows)
    table = pa.table(
        {
            "user_id": user_ids(user),
            "event_timestamp": pa.array(ts * 1000, pa.timestamp("us", tz="UTC")),
            "is_fraud": pa.array(rng.random(rows) < 0.01),
            "note": pa.array(np.where(rng.random(rows) < 0.5, "web", "pos")),
        }
    )
    pq.write_table(table, path, row_group_size=100_000)


# ------------------------------------------------------------------ cases


# Runs the command and reports its rusage. A child's ru_maxrss starts from its parent's RSS at
# fork (it survives exec), and this benchmark's own process is large after generating the
# events; this small process forks the command instead, so the figure is the command's own.
_WRAPPER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
proc = subprocess.Popen(json.loads(sys.argv[1]), stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - started,
                  "maxrss_kb": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime}))
"""


def _tree_rss(wrapper: psutil.Process) -> int:
    """Resident bytes of the command and its workers (the wrapper's descendants)."""
    total = 0
    for p in wrapper.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run_case(url: str, labels: Path, out: Path, rows: int, workers: int, extra: list[str]) -> dict[str, Any]:
    """One ``featurestream training-set`` run in a process of its own.

    ``peak_mb``: the command's ``ru_maxrss`` (``os.wait4``; with workers, the largest of the
    processes); ``peak_tree_mb``: the largest sum over the command and its workers, sampled
    every 0.2 s; ``cpu_s``: user + system seconds of the command and its workers.
    """
    command = [
        sys.executable,
        "-m",
        "featurestream.cli",
        "training-set",
        "--labels",
        str(labels),
        "--feature",
        "user_transactions",
        "--out",
        str(out),
        "--workers",
        str(workers),
        *extra,
    ]
    env = {**os.environ, ENV_POSTGRES: url}
    load_before = os.getloadavg()[0]
    wrapper = subprocess.Popen(
        [sys.executable, "-c", _WRAPPER, json.dumps(command)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peak_tree = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        watched = psutil.Process(wrapper.pid)
        while not stop.wait(0.2):
            with contextlib.suppress(psutil.Error):
                peak_tree = max(peak_tree, _tree_rss(watched))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = wrapper.communicate()
    stop.set()
    sampler.join()
    if wrapper.returncode != 0 or not stdout.strip():
        raise RuntimeError(
            f"benchmark wrapper failed ({wrapper.returncode}):\n{stderr.decode(errors='replace')[-3000:]}"
        )
    result = json.loads(stdout)
    if result["exit"] != 0:
        raise RuntimeError(
            f"training-set failed ({result['exit']}):\n{stderr.decode(errors='replace')[-3000:]}"
        )
    written = pq.ParquetFile(out).metadata.num_rows
    if written != rows:
        raise RuntimeError(f"{written} rows written, {rows} expected")
    seconds = result["seconds"]
    return {
        "rows": rows,
        "workers": workers,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "peak_mb": round(result["maxrss_kb"] / 1024, 1),  # Linux: kilobytes
        "peak_tree_mb": round(peak_tree / 2**20, 1),
        "cpu_s": round(result["cpu_s"], 1),
        "load_avg": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=None, help="raw events (default 10M; --quick 1M)")
    parser.add_argument(
        "--labels", default=None, help="label row counts, comma-separated (default 100000,1000000)"
    )
    parser.add_argument(
        "--workers", default="1", help="--workers values to run each case with, comma-separated"
    )
    parser.add_argument("--quick", action="store_true", help="1M events, 100k labels only")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--extra", default="", help="extra arguments for training-set (space-separated)")
    args = parser.parse_args()
    events = args.events or (1_000_000 if args.quick else 10_000_000)
    sizes = [int(s) for s in (args.labels or ("100000" if args.quick else "100000,1000000")).split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]

    cases = []
    with throwaway_database() as url, tempfile.TemporaryDirectory(prefix="fs-tsbench-") as tmp:
        log(f"loading {events:,} raw events")
        started = time.perf_counter()
        users = load_events(url, events)
        load_s = time.perf_counter() - started
        log(f"loaded in {load_s:.0f} s ({events / load_s:,.0f} events/s), {users:,} users")
        for i, rows in enumerate(sizes):
            labels = Path(tmp) / f"labels_{rows}.parquet"
            write_labels(labels, rows, users, seed=100 + i)
            for workers in worker_counts:
                log(f"case {rows:,} label rows, {workers} worker(s)")
                out = Path(tmp) / f"out_{rows}_{workers}.parquet"
                case = run_case(url, labels, out, rows, workers, args.extra.split())
                case.update(events=events, users=users)
                cases.append(case)
                log(
                    f"  {case['seconds']} s, {case['rows_per_s']:,} rows/s, peak {case['peak_mb']} MB "
                    f"(tree {case['peak_tree_mb']} MB), cpu {case['cpu_s']} s, load {case['load_avg']}"
                )
                out.unlink()
    for case in cases:
        print(
            f"{case['rows']:>9,} label rows x {events:,} events, {case['workers']} worker(s): "
            f"{case['seconds']:8.1f} s {case['rows_per_s']:>8,} rows/s  peak {case['peak_mb']:7.1f} MB "
            f"(tree {case['peak_tree_mb']:7.1f} MB)  cpu {case['cpu_s']:7.1f} s  load {case['load_avg']}"
        )
    if args.json:
        report = {"cases": cases, "events": events, "load_seconds": round(load_s, 1), "cpus": os.cpu_count()}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
