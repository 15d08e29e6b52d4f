"""The stream job's batch processor alone (no Kafka, no Faust): events/s into real Redis and PostgreSQL.

    python bench/processor.py [--views user_transactions|all] [--events N] [--batch 2000]
                              [--no-history] [--cprofile OUT.prof] [--stages]

Feeds ``SourceProcessor.process`` batches of demo transactions as the worker would (records with
partitions and offsets), in this process, so its cost per event can be profiled and compared
between changes without the noise of the broker and the framework. ``--stages`` times decode,
fold, history evaluation, PostgreSQL and Redis separately (by wrapping the methods).
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import tempfile
import time
import uuid
import zlib
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import delete_prefix, start_stack
from ingest import bench_project

from featurestream.demo.generator import generate_transactions
from featurestream.storage.offline.postgres import PostgresOfflineStore
from featurestream.storage.online.redis_store import RedisOnlineStore
from featurestream.stream_jobs.app import build_runtimes
from featurestream.stream_jobs.processor import Record, SourceProcessor


def records_of(events: list[Any], partitions: int, arrival_ms: int) -> list[Record]:
    offsets: dict[int, int] = defaultdict(int)
    out = []
    for event in events:
        p = zlib.crc32(event.key) % partitions
        out.append(Record(p, offsets[p], arrival_ms, event.value))
        offsets[p] += 1
    return out


class Stages:
    """Wall time spent in wrapped callables, by label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def wrap(self, obj: Any, attr: str, label: str) -> None:
        inner = getattr(obj, attr, None)
        if inner is None:  # another version of the code
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            t, c = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t
                self.cpu[label] += time.thread_time() - c

        setattr(obj, attr, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", default="user_transactions")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--spread-rate", type=float, default=10_000.0)
    parser.add_argument("--no-history", action="store_true")
    parser.add_argument("--grace-ms", type=int, help="compact grace of the processor (default: processor.COMPACT_GRACE_MS)")
    parser.add_argument("--live", action="store_true",
                        help="process as if live: the clock follows the events (recent events stay in the head)")
    parser.add_argument("--cprofile", type=Path)
    parser.add_argument("--stages", action="store_true")
    parser.add_argument("--redis-db", type=int, default=7)
    args = parser.parse_args()

    stack = start_stack(args.redis_db)
    suffix = uuid.uuid4().hex[:8]
    project = f"bench{suffix}"
    work = Path(tempfile.mkdtemp(prefix="featurestream-bench-proc-"))
    try:
        definition = bench_project(args.views, suffix, work)
        source = definition.source("transactions")
        assert source is not None
        runtimes = build_runtimes(definition, [(v, 1) for v in definition.feature_views])[source.name]
        online = RedisOnlineStore(stack.redis_url, project)
        offline = PostgresOfflineStore(stack.postgres_url)
        now = time.time()
        anchor = datetime.fromtimestamp(now - args.events / args.spread_rate, tz=UTC)
        events = list(generate_transactions(args.events, seed=1, users=args.users, rate=args.spread_rate, now=anchor))
        records = records_of(events, source.partitions, int(now * 1000))
        batches = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
        # --live: the processor's clock is the batch's scheduled time (its last event's send time,
        # plus a little lag), as if the stream were processed as it happens; otherwise the real
        # clock, to which every preloaded event is already old (it moves to tiles at once).
        scheduled = [int(anchor.timestamp() * 1000 + (i + len(b)) * 1000 / args.spread_rate) + 50
                     for i, b in zip(range(0, len(records), args.batch), batches, strict=True)]
        clock = [scheduled[0]]
        clock_ms = (lambda: clock[0]) if args.live else None
        extra = {"compact_grace_ms": args.grace_ms} if args.grace_ms is not None else {}
        processor = SourceProcessor(source, runtimes, online, offline, clock_ms=clock_ms,
                                    write_history=not args.no_history, **extra)

        stages = Stages()
        if args.stages:
            stages.wrap(processor.decoder, "decode", "decode")
            stages.wrap(processor, "_fold_view", "fold (incl. history evaluation, state loads)")
            stages.wrap(processor, "_load_missing", "load states from Redis")
            for rt in runtimes:
                stages.wrap(rt.agg, "evaluate", "history evaluation")
            stages.wrap(offline, "archive_rows", "postgres archive (PostgreSQL thread)")
            stages.wrap(offline, "write_feature_rows", "postgres history (PostgreSQL thread)")
            stages.wrap(online, "prepare", "redis encode")
            stages.wrap(online, "execute", "redis send")
            stages.wrap(offline, "archive_events", "postgres archive")
            stages.wrap(online, "write", "redis write")

        profiler = cProfile.Profile() if args.cprofile else None
        valid = 0
        started, cpu_started, all_started = time.perf_counter(), time.thread_time(), time.process_time()
        if profiler:
            profiler.enable()
        for batch, at in zip(batches, scheduled, strict=True):
            clock[0] = at
            valid += processor.process(batch).valid
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.cprofile)
        seconds = time.perf_counter() - started
        cpu = time.thread_time() - cpu_started
        all_cpu = time.process_time() - all_started
        features = sum(len(v.features) for v in definition.feature_views)
        print(f"views {', '.join(v.name for v in definition.feature_views)} ({features} features), "
              f"history {'off' if args.no_history else 'on'}, {len(batches)} batches of {args.batch}, "
              f"{'live clock' if args.live else 'backlog'} at {args.spread_rate:g} events/s of event time")
        print(f"processor: {len(records) / seconds:,.0f} records/s ({valid} valid) in {seconds:.2f}s"
              f" = {1e6 * seconds / len(records):.1f} us/record wall, CPU {1e6 * cpu / len(records):.1f} us/record"
              f" in this thread, {1e6 * all_cpu / len(records):.1f} in all"
              f" (load average {open('/proc/loadavg').read().split()[0]})")
        if args.stages:
            print(f"  {'stage':<48} {'wall s':>7}  {'wall%':>5}  {'us/rec':>6}  {'cpu us/rec':>10}")
            for label, s in sorted(stages.seconds.items(), key=lambda kv: -kv[1]):
                print(f"  {label:<48} {s:7.2f}  {100 * s / seconds:5.1f}  {1e6 * s / len(records):6.1f}"
                      f"  {1e6 * stages.cpu[label] / len(records):10.1f}")
        online.close()
        offline.close()
    finally:
        delete_prefix(stack.redis_url, f"fs:{project}:")
        stack.close()


if __name__ == "__main__":
    main()
