"""Ingest benchmark of ``featurestream worker``: ceilings, sustained throughput, freshness.

One run, one topic, on the local stack (``bench/_stack.py`` says where the services come from)::

    python bench/ingest.py [--views user_transactions|all|a,b] [--events N] [--quick] [--json PATH]

Phases (bench/README.md describes the method and the figures measured here):

1. preload N demo transactions (``generate_transactions``) into a fresh topic;
2. raw consume: a bare aiokafka group consumer reads them (the physical ceiling);
3. bare Faust: an agent with the worker's Faust settings and batching that only counts them
   (the framework ceiling), in its own process; then the same with the worker's tuning of Faust
   (``tune_faust``: messages handed to the stream without Faust's per-message tasks, no
   per-message statistics; ``source_topic``: raw events without serializer lookups; the
   ceiling of the worker's own configuration);
4. worker: ``featurestream worker`` in its own process reads the same topic into Redis and
   PostgreSQL (archive + history); its rate is the valid events applied per second between the
   first and the last observation of its ``featurestream_events_total`` counter;
5. freshness: with the worker caught up, demo traffic is produced at a fixed rate with probe
   events mixed in; a poller reads each probe entity's offset field in Redis until it shows
   the probe, and the delay from ``produce()`` to readable is the probe's freshness.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis
from confluent_kafka import Producer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import Stack, delete_prefix, start_stack, stop_process_group

from featurestream.config import ENV_KAFKA, ENV_POSTGRES, ENV_REDIS
from featurestream.definitions.loader import load_project
from featurestream.definitions.models import ProjectDefinition
from featurestream.demo.generator import generate_transactions
from featurestream.devstack.procs import free_port
from featurestream.devstack.topics import create_topics
from featurestream.registry import Registry
from featurestream.storage.offline.layout import SCHEMA, table_name
from featurestream.storage.online.redis_store import redis_key

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "definitions"
HERE = Path(__file__).resolve().parent


def _load() -> float:
    return os.getloadavg()[0]


def _rate(phase: dict[str, Any]) -> str:
    per_cpu = phase.get("per_cpu_s")
    return f"{phase['per_s']:,.0f} events/s" + (f" ({per_cpu:,.0f} per CPU-second of its process)" if per_cpu else "")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ project


def bench_project(views: str, suffix: str, work: Path) -> ProjectDefinition:
    """The demo definitions under a unique project and topic name, with the chosen views only."""
    for path in DEMO.glob("*.yaml"):
        text = path.read_text().replace("name: demo\n", f"name: bench{suffix}\n", 1)
        text = text.replace("topic: transactions\n", f"topic: bench-transactions-{suffix}\n")
        (work / path.name).write_text(text)
    definition = load_project(work)
    names = {v.name for v in definition.feature_views}
    wanted = names if views == "all" else set(views.split(","))
    if not wanted <= names:
        raise SystemExit(f"unknown views {sorted(wanted - names)}; the demo has {sorted(names)}")
    return definition.model_copy(
        update={
            "feature_views": tuple(v for v in definition.feature_views if v.name in wanted),
            "feature_services": (),
            "consumers": (),
        }
    )


# ------------------------------------------------------------------ phases


def preload(kafka: str, topic: str, events: list[Any]) -> float:
    producer = Producer({"bootstrap.servers": kafka, "linger.ms": 20, "batch.num.messages": 10000,
                         "queue.buffering.max.messages": 1_000_000, "partitioner": "murmur2_random"})
    started = time.perf_counter()
    for event in events:
        producer.produce(topic, key=event.key, value=event.value)
        producer.poll(0)
    if producer.flush(60) != 0:
        raise RuntimeError("preload: the broker did not take every event")
    return len(events) / (time.perf_counter() - started)


async def _raw_consume(kafka: str, topic: str, expected: int) -> dict[str, float]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka, group_id=f"bench-raw-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest", enable_auto_commit=False,
        session_timeout_ms=2000, heartbeat_interval_ms=500,
    )  # fmt: skip
    await consumer.start()
    try:
        count, first, first_batch, first_cpu = 0, 0.0, 0, 0.0
        deadline = time.monotonic() + 120
        while count < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=20_000)
            n = sum(len(b) for b in batches.values())
            if n and not count:
                first, first_batch, first_cpu = time.perf_counter(), n, time.process_time()
            count += n
        last, last_cpu = time.perf_counter(), time.process_time()
    finally:
        await consumer.stop()
    if count < expected:
        raise RuntimeError(f"raw consumer read {count} of {expected} events")
    return {"per_s": (count - first_batch) / (last - first), "seconds": last - first,
            "per_cpu_s": (count - first_batch) / (last_cpu - first_cpu) if last_cpu > first_cpu else None}


def raw_consume(kafka: str, topic: str, expected: int) -> dict[str, float]:
    return asyncio.run(_raw_consume(kafka, topic, expected))


def faust_bare(kafka: str, topic: str, partitions: int, expected: int, batch: int, within: float,
               work: Path, per_event: bool = False, timeout: float = 180, tuned: bool = False) -> dict[str, float]:
    out = work / f"faust-bare-{uuid.uuid4().hex[:6]}.json"
    argv = [sys.executable, str(HERE / "_faust_bare.py"), kafka, topic, str(partitions), str(expected),
            str(batch), str(within), str(out)] + (["--per-event"] if per_event else []) + (
            ["--worker-tuning"] if tuned else [])
    logfile = (work / "faust-bare.log").open("ab")
    proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True, cwd=work)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(f"bare Faust agent did not count {expected} events in {timeout:.0f}s") from None
    finally:
        logfile.close()
    seen = json.loads(out.read_text())
    seconds = seen["last_s"] - seen["first_s"]
    cpu = seen["last_cpu"] - seen["first_cpu"]
    return {"per_s": (seen["count"] - seen["first_batch"]) / seconds, "seconds": seconds,
            "per_cpu_s": (seen["count"] - seen["first_batch"]) / cpu if cpu > 0 else None}


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)

    def _processes(self) -> list[psutil.Process]:
        """The worker's process, then its children (the processing child)."""
        main = psutil.Process(self.proc.pid)
        return [main, *main.children(recursive=True)]

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds of the worker's process and of its children."""
        out = [0.0, 0.0]
        for i, proc in enumerate(self._processes()):
            with suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                out[min(i, 1)] += times.user + times.system
        return out[0], out[1]

    def rss_mb(self) -> list[float]:
        """Resident memory of the worker and of its children, MB."""
        out = []
        for proc in self._processes():
            with suppress(psutil.NoSuchProcess):
                out.append(proc.memory_info().rss / 1e6)
        return out

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for name in ("featurestream_events_total", "featurestream_batch_events_sum", "featurestream_batch_events_count",
                     "featurestream_batch_seconds_sum", "featurestream_batch_seconds_count",
                     "featurestream_sink_failures_total", "featurestream_dead_letters_total"):
            values = re.findall(rf"^{name}{{[^}}]*}} ([0-9.e+]+)$", text, re.M)
            out[name] = sum(float(v) for v in values)
        return out

    def events(self) -> float:
        try:
            return self.metrics()["featurestream_events_total"]
        except OSError:
            return 0.0

    def stop(self) -> None:
        stop_process_group(self.proc, 10)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


_BOOT_FROM = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, {code!r})
sys.argv = ["featurestream", *sys.argv[1:]]
runpy.run_module("featurestream.cli", run_name="__main__")
"""


def start_worker(stack: Stack, project: str, work: Path, batch: int, within: float, history: bool,
                 code: Path | None = None, extra: Sequence[str] = ()) -> Worker:
    port = free_port()
    env = {**os.environ, ENV_KAFKA: stack.kafka, ENV_REDIS: stack.redis_url, ENV_POSTGRES: stack.postgres_url,
           "FEATURESTREAM_HOME": str(work / "home"), "FEATURESTREAM_CONFIG": str(work / "none.yaml")}
    launcher = ["-c", _BOOT_FROM.format(code=str(code))] if code else ["-m", "featurestream.cli"]
    argv = [sys.executable, *launcher, "worker", "--project", project,
            "--metrics-port", str(port), "--session-timeout", "2", "--heartbeat-interval", "0.5",
            "--batch-size", str(batch), "--batch-within", str(within),
            "--history" if history else "--no-history", "--log-level", "warning", *extra]  # fmt: skip
    (work / "home" / "worker").mkdir(parents=True, exist_ok=True)  # the worker keeps a Faust datadir there
    log_path = work / "worker.log"
    logfile = log_path.open("ab")
    proc = subprocess.Popen(argv, env=env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True, cwd=work)
    logfile.close()
    return Worker(proc, port, log_path)


@contextmanager
def py_spy(pid: int, output: Path | None) -> Iterator[None]:
    """Sample the worker with py-spy (collapsed stacks) while the block runs."""
    if output is None:
        yield
        return
    argv = ["py-spy", "record", "--pid", str(pid), "--rate", "100", "--format", "raw", "--output", str(output),
            "--threads", "--gil"]  # only the thread holding the GIL: where the worker's one core goes
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        with suppress(subprocess.TimeoutExpired):
            spy.wait(30)
        if spy.poll() is None:
            spy.kill()
            spy.wait()


def measure_worker(worker: Worker, expected: int, timeout: float) -> dict[str, Any]:
    """Poll the worker's event counter until ``expected`` valid events are applied (or time runs out)."""
    deadline = time.monotonic() + timeout
    samples = worker.samples
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited ({worker.proc.returncode}):\n{worker.tail()}")
        count = worker.events()
        samples.append((time.perf_counter(), count, *worker.cpu_seconds()))
        if count >= expected:
            break
        time.sleep(0.25)  # each scrape costs the worker a little; 0.25 s is < 2% of a 15 s phase
    moving = [s for s in samples if s[1] > 0]
    if len(moving) < 2:
        raise RuntimeError(f"worker applied {samples[-1][1] if samples else 0:.0f} events in {timeout:.0f}s:\n{worker.tail()}")
    (t0, c0, main0, child0), (t1, c1, main1, child1) = moving[0], moving[-1]
    cpu = (main1 + child1) - (main0 + child0)
    return {"per_s": (c1 - c0) / (t1 - t0), "seconds": t1 - t0, "applied": c1, "complete": c1 >= expected,
            "per_cpu_s": (c1 - c0) / cpu if cpu > 0 else None,
            "cpu_us_per_event": {"worker_process": 1e6 * (main1 - main0) / max(c1 - c0, 1),
                                 "child": 1e6 * (child1 - child0) / max(c1 - c0, 1)}}


def archived_counts(pg_url: str, source: str, views: list[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    with psycopg.connect(pg_url) as conn:
        for label, table in [("archive", table_name("raw", source)),
                             *[(f"history:{v}", table_name("hist", v, ver)) for v, ver in views]]:
            row = conn.execute(f'select count(*) from {SCHEMA}."{table}"').fetchone()
            out[label] = int(row[0]) if row else 0
    return out


# ------------------------------------------------------------------ freshness


@dataclass
class Probe:
    user: str
    partition: int
    ts_ms: int
    sent: float
    unseen: set[str]
    seen: float | None = None


LINGER_MS = 5


def freshness(stack: Stack, project: str, topic: str, partitions: int, views: list[tuple[str, int]],
              rate: float, seconds: float, warmup: float, seed: int, probe_every: int = 50,
              probe_users: int = 100) -> dict[str, Any]:
    """Produce demo traffic at ``rate``; every ``probe_every``-th event is a probe (a user of its own,
    sent to a known partition, its event time = its send time in ms). A poller thread reads the
    probe's offset field (``{p}:o`` = "offset:newest event ms") in each user view's Redis hash
    until the newest event time reaches the probe's; freshness = that moment - the produce() call."""
    count = int(rate * seconds)
    start = time.time() + 0.5
    background = list(generate_transactions(count, seed=seed, now=datetime.fromtimestamp(start, tz=UTC), rate=rate))
    client = redis.Redis.from_url(stack.redis_url)
    pending: list[Probe] = []
    done: list[Probe] = []
    lock = threading.Lock()
    stop = threading.Event()
    polls = [0]

    def poll() -> None:
        while not stop.is_set() or pending:
            with lock:
                batch = [(p, v) for p in pending for v in sorted(p.unseen)]
            if not batch:
                if stop.is_set():
                    return
                time.sleep(0.001)
                continue
            pipe = client.pipeline(transaction=False)
            for p, v in batch:
                pipe.hget(redis_key(project, v, dict(views)[v], (p.user,)), b"%d:o" % p.partition)
            replies = pipe.execute()
            now = time.time()
            polls[0] += 1
            with lock:
                for (p, v), raw in zip(batch, replies, strict=True):
                    if raw is not None and int(raw.split(b":")[1]) >= p.ts_ms:
                        p.unseen.discard(v)
                        if not p.unseen and p.seen is None:
                            p.seen = now
                            done.append(p)
                pending[:] = [p for p in pending if p.seen is None and now - p.sent < 30]
            time.sleep(0.004)  # ~5 ms resolution; a cheap poll leaves the cores to the worker

    poller = threading.Thread(target=poll, daemon=True)
    # librdkafka's default linger (5 ms). With 1 ms, tansu spent 71% of a core on the produce
    # requests alone at 2,000 events/s (23% with 5 ms), taken from the worker on this 2-core host.
    producer = Producer({"bootstrap.servers": stack.kafka, "linger.ms": LINGER_MS, "partitioner": "murmur2_random"})
    user_views = [v for v, _ in views]
    probes: list[Probe] = []
    while time.time() < start:
        time.sleep(0.001)
    poller.start()
    t0 = time.perf_counter()
    for i, event in enumerate(background):
        ahead = t0 + i / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
        if i % probe_every == 0:
            k = (i // probe_every) % probe_users
            sent = time.time()
            probe = Probe(f"probe_{k:03d}", k % partitions, int(sent * 1000), sent, set(user_views))
            value = json.dumps({"user_id": probe.user, "amount": 10.0, "merchant": "m_0001", "country": "DE",
                                "ts": probe.ts_ms}).encode()
            producer.produce(topic, key=probe.user.encode(), value=value, partition=probe.partition)
            probes.append(probe)
            with lock:
                pending.append(probe)
        else:
            producer.produce(topic, key=event.key, value=event.value)
        producer.poll(0)
    produce_s = time.perf_counter() - t0
    producer.flush(15)
    stop.set()
    poller.join(40)
    client.close()
    measured = [p for p in probes if p.sent - start >= warmup]
    latencies = sorted((p.seen - p.sent) * 1000 for p in measured if p.seen is not None)
    missing = sum(p.seen is None for p in measured)

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, max(0, round(q * len(latencies)) - 1))]

    return {
        "rate_per_s": rate,
        "achieved_rate_per_s": count / produce_s,
        "probes": len(measured),
        "unseen": missing,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1] if latencies else None,
        "mean_ms": statistics.fmean(latencies) if latencies else None,
        "polls": polls[0],
    }


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", default="user_transactions",
                        help="'all', or feature views of the demo, comma-separated (default: user_transactions)")
    parser.add_argument("--events", type=int, help="events to preload (default 200000; 30000 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smaller run that finishes within two minutes")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--rate", type=float, default=2000.0, help="event rate of the freshness phase (per s)")
    parser.add_argument("--freshness-seconds", type=float, help="length of the freshness phase (default 30; 10 quick)")
    parser.add_argument("--spread-rate", type=float, default=10_000.0,
                        help="preloaded events' event times are spaced as if produced at this rate, ending now")
    parser.add_argument("--batch-size", type=int, default=2000, help="worker --batch-size (and the bare agent's)")
    parser.add_argument("--batch-within", type=float, default=0.05, help="worker --batch-within (and the bare agent's)")
    parser.add_argument("--no-history", action="store_true", help="worker without feature history rows")
    parser.add_argument("--skip", default="", help="phases to skip: raw,faust,freshness (comma-separated)")
    parser.add_argument("--faust-per-event", action="store_true", help="also measure a per-event (not batched) bare agent")
    parser.add_argument("--profile", type=Path,
                        help="py-spy (--gil) the worker's throughput phase into this file (collapsed stacks; "
                             "summarise with bench/_profile.py)")
    parser.add_argument("--worker-code", type=Path,
                        help="run the worker from this directory's featurestream package (A/B against other code)")
    parser.add_argument("--worker-args", default="",
                        help="more options for `featurestream worker`, e.g. '--fetch-max-wait 20 --no-child-process'")
    parser.add_argument("--redis-db", type=int, default=7, help="database number on the machine's Redis (default 7)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--users", type=int, default=3000, help="demo users (entities)")
    args = parser.parse_args()
    events_n = args.events or (30_000 if args.quick else 200_000)
    fresh_s = args.freshness_seconds or (10.0 if args.quick else 30.0)
    worker_timeout = phase_timeout = 45.0 if args.quick else 600.0
    skip = set(filter(None, args.skip.split(",")))

    suffix = uuid.uuid4().hex[:8]
    work = Path(tempfile.mkdtemp(prefix="featurestream-bench-ingest-"))
    (work / "defs").mkdir()
    began = time.monotonic()
    stack = start_stack(args.redis_db)
    worker: Worker | None = None
    project = f"bench{suffix}"
    result: dict[str, Any] = {}
    try:
        for name, where in stack.described.items():
            log(f"{name}: {where}")
        definition = bench_project(args.views, suffix, work / "defs")
        Registry(stack.postgres_url).apply(definition)
        snapshot = Registry(stack.postgres_url).snapshot(project)
        views = [(v.spec.name, v.version) for v in snapshot.views]
        source = definition.source("transactions")
        assert source is not None
        create_topics(stack.kafka, {source.topic: source.partitions})
        features = sum(len(v.features) for v in definition.feature_views)
        log(f"views {', '.join(f'{n}@{v}' for n, v in views)} ({features} features), topic {source.topic} "
            f"({source.partitions} partitions)")

        anchor = datetime.now(tz=UTC).timestamp() - events_n / args.spread_rate
        events = list(generate_transactions(events_n, seed=args.seed, users=args.users, rate=args.spread_rate,
                                            now=datetime.fromtimestamp(anchor, tz=UTC)))
        valid = sum(e.well_formed for e in events)
        produce_rate = preload(stack.kafka, source.topic, events)
        log(f"preloaded {events_n} events ({valid} valid) at {produce_rate:,.0f}/s")

        raw = faust = faust_pe = faust_tuned = None
        loads = [_load()]
        if "raw" not in skip:
            raw = raw_consume(stack.kafka, source.topic, events_n)
            log(f"raw aiokafka consumer: {_rate(raw)}")
        if "faust" not in skip:
            faust = faust_bare(stack.kafka, source.topic, source.partitions, events_n, args.batch_size,
                               args.batch_within, work, timeout=phase_timeout)
            log(f"bare Faust agent (take_events {args.batch_size}, within {args.batch_within}s): {_rate(faust)}")
            faust_tuned = faust_bare(stack.kafka, source.topic, source.partitions, events_n, args.batch_size,
                                  args.batch_within, work, timeout=phase_timeout, tuned=True)
            log(f"bare Faust agent with the worker's tuning: {_rate(faust_tuned)}")
            if args.faust_per_event:
                faust_pe = faust_bare(stack.kafka, source.topic, source.partitions, events_n, 0, 0, work,
                                      per_event=True, timeout=phase_timeout)
                log(f"bare Faust agent (per event): {_rate(faust_pe)}")
        loads.append(_load())

        worker = start_worker(stack, project, work, args.batch_size, args.batch_within, not args.no_history,
                              args.worker_code, shlex.split(args.worker_args))
        while worker.events() == 0 and worker.proc.poll() is None and time.monotonic() - began < 100 + worker_timeout:
            time.sleep(0.02)
        with py_spy(worker.proc.pid, args.profile):
            w = measure_worker(worker, valid, worker_timeout)
        loads.append(_load())
        m = worker.metrics()
        batches = m["featurestream_batch_events_count"] or 1
        mean_batch = m["featurestream_batch_events_sum"] / batches
        mean_batch_ms = 1000 * m["featurestream_batch_seconds_sum"] / batches
        split = w["cpu_us_per_event"]
        log(f"worker: {_rate(w)} over {w['seconds']:.1f}s ({w['applied']:.0f}/{valid} applied; "
            f"mean batch {mean_batch:.0f} records, {mean_batch_ms:.1f} ms; CPU per event: Faust's process "
            f"{split['worker_process']:.0f} us, processing child {split['child']:.0f} us)")
        if not w["complete"]:
            log("worker did not finish within the time limit: its rate is over the part it did")
        else:
            counts = archived_counts(stack.postgres_url, source.name, views)
            log(f"stored: {counts}")

        fresh: dict[str, Any] | None = None
        if "freshness" not in skip and w["complete"]:
            user_views = [(n, v) for n, v in views if (fv := definition.feature_view(n)) and fv.entity == "user"]
            before = worker.metrics()
            fresh = freshness(stack, project, source.topic, source.partitions, user_views, args.rate, fresh_s,
                              warmup=1.5 if args.quick else 2.0, seed=args.seed + 1)
            after = worker.metrics()
            n = after["featurestream_batch_events_count"] - before["featurestream_batch_events_count"]
            if n:
                fresh["mean_batch"] = (after["featurestream_batch_events_sum"] - before["featurestream_batch_events_sum"]) / n
                fresh["mean_batch_ms"] = 1000 * (
                    after["featurestream_batch_seconds_sum"] - before["featurestream_batch_seconds_sum"]) / n
                log(f"freshness phase: {n:.0f} batches, mean {fresh['mean_batch']:.0f} records, "
                    f"{fresh['mean_batch_ms']:.1f} ms of processing each")
            loads.append(_load())
            if fresh["p50_ms"] is None:
                log(f"freshness: no probe seen ({fresh['unseen']} unseen)")
            else:
                log(f"freshness at {args.rate:,.0f} events/s ({fresh['achieved_rate_per_s']:,.0f} achieved), "
                    f"{fresh['probes']} probes ({fresh['unseen']} unseen): p50 {fresh['p50_ms']:.1f} ms, "
                    f"p90 {fresh['p90_ms']:.1f} ms, p99 {fresh['p99_ms']:.1f} ms, max {fresh['max_ms']:.1f} ms")
            log(f"worker memory (RSS, MB; the worker, then its children): {', '.join(f'{x:.0f}' for x in worker.rss_mb())}")
            m2 = worker.metrics()
            if m2["featurestream_sink_failures_total"]:
                log(f"sink failures: {m2['featurestream_sink_failures_total']:.0f}")

        faust_rate = faust["per_s"] if faust else None
        raw_rate = raw["per_s"] if raw else None
        result = {
            "raw_consume_per_s": raw_rate,
            "faust_bare_per_s": faust_rate,
            "worker_events_per_s": w["per_s"],
            "ratio_to_faust_bare": w["per_s"] / faust_rate if faust_rate else None,
            "freshness_p50_ms": fresh["p50_ms"] if fresh else None,
            "freshness_p99_ms": fresh["p99_ms"] if fresh else None,
            "rate_per_s": args.rate,
            "ratio_to_raw": w["per_s"] / raw_rate if raw_rate else None,
            "per_cpu_second": {
                "raw_consume": raw["per_cpu_s"] if raw else None,
                "faust_bare": faust["per_cpu_s"] if faust else None,
                "worker": w["per_cpu_s"],
            },
            "faust_bare_per_event_per_s": faust_pe["per_s"] if faust_pe else None,
            "faust_bare_tuned_per_s": faust_tuned["per_s"] if faust_tuned else None,
            "ratio_to_faust_bare_tuned": w["per_s"] / faust_tuned["per_s"] if faust_tuned else None,
            "worker_complete": w["complete"],
            "worker_mean_batch": mean_batch,
            "worker_cpu_us_per_event": w["cpu_us_per_event"],
            "worker_mean_batch_ms": mean_batch_ms,
            "views": [n for n, _ in views],
            "features": features,
            "events": events_n,
            "valid_events": valid,
            "history": not args.no_history,
            "batch_size": args.batch_size,
            "batch_within_s": args.batch_within,
            "freshness": fresh,
            "load_average_1m": loads,
            "services": stack.described,
        }
        print(f"\nviews: {', '.join(result['views'])} ({features} features); {events_n} events preloaded; "
              f"load average {' / '.join(f'{x:.1f}' for x in loads)}")
        print(f"  {'':<24} {'events/s':>10} {'per CPU-second':>15}")
        for label, phase in (("raw aiokafka consumer", raw), ("bare Faust agent", faust),
                             ("  with worker's tuning", faust_tuned), ("worker end to end", w)):
            if phase is None:
                print(f"  {label:<24} {'-':>10}")
            else:
                per_cpu = f"{phase['per_cpu_s']:,.0f}" if phase.get("per_cpu_s") else "-"
                print(f"  {label:<24} {phase['per_s']:>10,.0f} {per_cpu:>15}")
        if raw_rate:
            print(f"  worker / raw consumer    {w['per_s'] / raw_rate:>10.3f}")
        if faust:
            cpu_ratio = (w["per_cpu_s"] / faust["per_cpu_s"]) if w["per_cpu_s"] and faust["per_cpu_s"] else None
            print(f"  worker / bare Faust      {w['per_s'] / faust['per_s']:>10.3f} "
                  f"{'' if cpu_ratio is None else f'{cpu_ratio:>15.3f}'}")
        if faust_tuned:
            print(f"  worker / the same, tuned {w['per_s'] / faust_tuned['per_s']:>10.3f}")
        if fresh and fresh["p50_ms"] is not None:
            print(f"  freshness at {args.rate:,.0f}/s: p50 {fresh['p50_ms']:.1f} ms, p99 {fresh['p99_ms']:.1f} ms "
                  f"({fresh['probes']} probes, {fresh['unseen']} unseen)")
        print(f"  (run took {time.monotonic() - began:.0f} s)")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if worker is not None:
            worker.stop()
        with suppress(Exception):
            delete_prefix(stack.redis_url, f"fs:{project}:")
        stack.close()


if __name__ == "__main__":
    main()
