"""Serving benchmark: latency and throughput of ``featurestream serve`` over gRPC.

    python bench/serving.py [--quick] [--json PATH] [--events N] [--users N]
                            [--clients 1,32] [--cases 1x6,1x50,100x50] [--client-mode process|thread]
                            [--entities traffic|uniform] [--profile DIR] [--breakdown]
                            [--serve-arg=--cache-ttl-ms=100 ...]

Cases: ``1x6`` = 1 entity x the 6 features of ``user_transactions``; ``1x50`` and ``100x50`` =
1 or 100 entities x 50 of the 56 features of ``user_spending_profile`` (the first 50 in
definition order: counts, sums, means, mins, maxes and stddevs over 5m..7d, distinct merchants
over 5m..7d, distinct countries over 5m and 15m). Each with 1 and with 32 concurrent clients.

Method:

1. State: ``--events`` demo transactions (``featurestream/demo/generator.py``) of ``--users``
   users, spread evenly over the day before now, go through the real ``SourceProcessor``
   (``bench/serving_data.py``) into Redis (database 6 of the machine's server unless
   FEATURESTREAM_REDIS_URL is set; the test suite flushes 9-15) and the archive of a throwaway PostgreSQL database, where the
   demo definitions are also applied to the registry. Active users end up with ~60 one-minute
   tiles, ~288 five-minute tiles, 24-25 hour tiles and a lifetime tile per view.
2. Server: ``featurestream serve --grpc-port P --http-port Q --project NAME`` as a subprocess,
   with its defaults (no state cache, the exact read memo on, gc tuning on, 64 worker threads);
   ``--serve-arg=--memo-entries=0`` measures every lookup decoded and evaluated from scratch.
3. Clients: closed loop (next call as soon as the answer is in), each client a separate process
   with its own channel (``bench/serving_client.py``); ``--client-mode thread`` runs the clients
   as threads of one process instead. Entities per call are drawn from the users in proportion to
   their transactions (``--entities traffic``: who a fraud scorer asks about) or uniformly over
   the users with state (``uniform``). Latency is the unary call including the client's parse of
   the response. A warm-up precedes each measured window; calls/s counts calls started in it.
4. Machine: the load average and the CPU used by everything else on the machine during each
   case are printed, since other work on this 2-core machine shows up in the tails.

``--profile DIR`` then re-runs 1x50 and 100x50 (1 client) under py-spy (``--gil``) and charges
the samples to stages (``bench/serving_profile.py``); ``--breakdown`` times the stages of the
same lookups in this process without gRPC. ``--json PATH`` writes
``{"cases": [{"name", "clients", "p50_ms", "p99_ms", "p999_ms", "calls_per_s", ...}], ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import delete_prefix, stop_process_group
from serving_client import CaseSpec, ClientPool
from serving_data import (
    Dataset,
    activity_summary,
    apply_definitions,
    load,
    log,
    sample_users,
    start_services,
    state_sizes,
)

from featurestream.config import ENV_POSTGRES, ENV_REDIS
from featurestream.definitions.loader import load_project
from featurestream.devstack.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
TARGETS_P99_MS = {("1x50", 1): 1.5, ("100x50", 1): 15.0}


def case_features() -> dict[str, tuple[int, list[str]]]:
    demo = load_project(ROOT / "definitions")
    small = demo.feature_view("user_transactions")
    wide = demo.feature_view("user_spending_profile")
    assert small is not None and wide is not None
    six = [f"user_transactions:{f.name}" for f in small.features]
    fifty = [f"user_spending_profile:{f.name}" for f in wide.features[:50]]
    return {"1x6": (1, six), "1x50": (1, fifty), "100x50": (100, fifty)}


# ------------------------------------------------------------------ machine load


def _busy_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    values = [int(x) for x in parts]
    idle = values[3] + values[4]
    return sum(values[:8]) - idle, sum(values[:8])


def _proc_jiffies(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime (threads included)
    except (OSError, IndexError, ValueError):
        return 0


def _redis_pids() -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with suppress(OSError):
                if (d / "comm").read_text().strip() == "redis-server":
                    out.append(int(d.name))
    return out


class CpuWatch:
    """CPU cores used during an interval: all, the server, our clients, Redis, everything else."""

    def __init__(self, server_pid: int, client_pids: list[int]) -> None:
        self.server_pid, self.client_pids = server_pid, client_pids
        self.redis_pids = _redis_pids()
        self.hz = os.sysconf("SC_CLK_TCK")
        self.cores = os.cpu_count() or 1

    def _sample(self) -> tuple[float, int, int, int, int, int]:
        busy, total = _busy_jiffies()
        ours = _proc_jiffies(os.getpid())
        return (time.monotonic(), busy, _proc_jiffies(self.server_pid),
                sum(_proc_jiffies(p) for p in self.client_pids) + ours,
                sum(_proc_jiffies(p) for p in self.redis_pids), total)

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        seconds = end[0] - self._start[0]
        d = [(b - a) / self.hz / seconds for a, b in zip(self._start[1:5], end[1:5], strict=True)]
        busy, server, clients, redis_cpu = d
        return {"busy_cores": busy, "server_cores": server, "client_cores": clients, "redis_cores": redis_cpu,
                "other_cores": max(0.0, busy - server - clients - redis_cpu),
                "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0])}


# ------------------------------------------------------------------ server


class Server:
    def __init__(self, services: Any, project: str, work: Path, extra: list[str]) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        exe = Path(sys.executable).with_name("featurestream")
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "featurestream.cli"]
        argv += ["serve", "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
                 "--project", project, "--log-level", "warning", *extra]
        env = dict(os.environ, **{ENV_POSTGRES: services.postgres_url, ENV_REDIS: services.redis_url})
        self.log_path = work / "serve.log"
        self.argv = argv
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=work)
        self.address = f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, probe: list[str], timeout: float = 90.0) -> float:
        import grpc

        from featurestream.v1 import featurestream_pb2 as pb
        from featurestream.v1 import featurestream_pb2_grpc as pbg

        started = time.monotonic()
        request = pb.GetOnlineFeaturesRequest(entities=[pb.EntityKey(join_keys={"user_id": "u_00000"})],
                                              features=probe)
        with grpc.insecure_channel(self.address) as channel:
            stub = pbg.FeatureServiceStub(channel)  # type: ignore[no-untyped-call]
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"featurestream serve exited ({self.proc.returncode}):\n"
                                       + self.log_path.read_text()[-3000:])
                try:
                    stub.GetOnlineFeatures(request, timeout=2)
                    return time.monotonic() - started
                except grpc.RpcError as exc:
                    if time.monotonic() - started > timeout:
                        raise RuntimeError(f"the server did not answer within {timeout:.0f}s: {exc}") from exc
                    time.sleep(0.2)

    def stop(self) -> None:
        stop_process_group(self.proc, 20)


def wait_for_serve_command(timeout: float = 900.0) -> None:
    """``featurestream serve`` is being finished by another engineer: poll until it exists."""
    exe = Path(sys.executable).with_name("featurestream")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "featurestream.cli"]
    deadline = time.monotonic() + timeout
    noted = False
    while True:
        done = subprocess.run([*argv, "serve", "--help"], capture_output=True, text=True)
        if done.returncode == 0 and "--grpc-port" in done.stdout:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"'featurestream serve' is not available:\n{done.stdout[-500:]}{done.stderr[-2000:]}")
        if not noted:
            log("'featurestream serve --help' fails; polling every 15 s until it works")
            noted = True
        time.sleep(15)


# ------------------------------------------------------------------ measuring


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in [0, 100]) of sorted values."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-p * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


STATUS = {0: "UNSPECIFIED", 1: "PRESENT", 2: "MISSING", 3: "STALE", 4: "INVALID"}


def run_case(pool: ClientPool, name: str, entities: int, features: list[str], clients: int,
             warmup: float, duration: float, watch: CpuWatch) -> dict[str, Any]:
    begin = time.monotonic() + 0.3
    spec = CaseSpec(name=name, entities=entities, features=features, distinct=max(50, min(1000, 5_000 // entities)),
                    begin=begin, measure_from=begin + warmup, measure_until=begin + warmup + duration)
    # pool.run has the workers build their requests first and then sets the instants in ``spec``;
    # the watch starts when the measured window opens
    result: dict[str, Any] = {}
    import threading

    def watch_window() -> None:
        while spec.begin == begin:  # not started yet
            time.sleep(0.01)
        time.sleep(max(0.0, spec.measure_from - time.monotonic()))
        watch.start()
        time.sleep(max(0.0, spec.measure_until - time.monotonic()))
        result["cpu"] = watch.stop()

    watcher = threading.Thread(target=watch_window, daemon=True)
    watcher.start()
    out = pool.run(spec, clients)
    watcher.join()
    lat = sorted(1000 * x for x in out["lat"])
    statuses = {STATUS.get(k, str(k)): v for k, v in sorted(out["statuses"].items())}
    return {
        "name": name,
        "clients": clients,
        "p50_ms": round(percentile(lat, 50), 3) if lat else None,
        "p99_ms": round(percentile(lat, 99), 3) if lat else None,
        "p999_ms": round(percentile(lat, 99.9), 3) if lat else None,
        "max_ms": round(lat[-1], 3) if lat else None,
        "mean_ms": round(sum(lat) / len(lat), 3) if lat else None,
        "calls_per_s": round(len(lat) / duration, 1),
        "values_per_s": round(len(lat) * entities * len(features) / duration),
        "samples": len(lat),
        "warmup_s": round(warmup, 2),
        "window_s": round(duration, 2),
        "errors": out["errors"],
        "warmup_statuses": statuses,
        "response_shapes": sorted(s for s in out["shapes"] if s),
        **{k: round(v, 2) for k, v in result.get("cpu", {}).items()},
    } | ({"server_cpu_ms_per_call": round(1000 * result["cpu"]["server_cores"] * duration / len(lat), 3)}
         if lat and "cpu" in result else {})


def _ms(v: float | None) -> str:
    return f"{v:7.2f}" if v is not None and v == v else "    n/a"


def profile_case(pool: ClientPool, pid: int, name: str, entities: int, names: list[str], clients: int,
                 seconds: float, out: Path, rate: int = 250) -> dict[str, Any] | None:
    """Run a case again with py-spy sampling the server for ``seconds`` of it; the stage shares."""
    import threading

    from serving_profile import categorise, format_profile, record

    never = time.monotonic() + 3600
    spec = CaseSpec(name=name, entities=entities, features=names, distinct=max(50, min(1000, 5_000 // entities)),
                    begin=never, measure_from=never + 2.0, measure_until=never + 3.0 + seconds)
    runs: dict[str, Any] = {}
    loader = threading.Thread(target=lambda: runs.update(pool.run(spec, clients)))
    loader.start()
    while spec.begin == never:  # pool.run sets the instants once the requests are built
        time.sleep(0.01)
    time.sleep(max(0.0, spec.measure_from - time.monotonic()))
    spy = record(pid, seconds, out, rate=rate)
    loader.join()
    _, err = spy.communicate(timeout=60)
    if not out.exists():
        log(f"py-spy failed: {err.decode()[-1000:]}")
        return None
    summary = categorise(out)
    summary["calls_per_s"] = len(runs["lat"]) / (seconds + 1.0)
    print(format_profile(f"profile {name}, {clients} client(s), {summary['calls_per_s']:.1f} calls/s under py-spy",
                         summary, seconds, rate), flush=True)
    return summary


def sentinel_intact(redis_url: str, project: str) -> bool:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return bool(client.exists(f"fs:{project}:bench-sentinel"))
    finally:
        client.close()


def format_case(c: dict[str, Any]) -> str:
    target = TARGETS_P99_MS.get((c["name"], c["clients"]))
    verdict = "" if target is None or c["p99_ms"] is None else (f"  target p99 <= {target:g} ms: " + ("met" if c["p99_ms"] <= target else "MISSED"))
    return (f"{c['name']:>7} x {c['clients']:>2} clients: p50 {_ms(c['p50_ms'])} ms  p99 {_ms(c['p99_ms'])} ms  "
            f"p999 {_ms(c['p999_ms'])} ms  max {_ms(c['max_ms'])} ms  {c['calls_per_s']:8,.0f} calls/s  "
            f"({c['samples']} calls; server CPU {c.get('server_cpu_ms_per_call', 0):.2f} ms/call; "
            f"load {c.get('loadavg_1m', 0):.1f}; cores: server {c.get('server_cores', 0):.2f}, "
            f"clients {c.get('client_cores', 0):.2f}, redis {c.get('redis_cores', 0):.2f}, "
            f"others {c.get('other_cores', 0):.2f})" + verdict)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller state, shorter windows (under two minutes)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--events", type=int, help="events over the day (default 300k; --quick 40k)")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clients", default="1,32")
    parser.add_argument("--cases", default="1x6,1x50,100x50")
    parser.add_argument("--client-mode", choices=("process", "thread"), default="process")
    parser.add_argument("--entities", choices=("traffic", "uniform"), default="traffic")
    parser.add_argument("--warmup", type=float, help="seconds per case (default 3; --quick 1.5)")
    parser.add_argument("--duration", type=float, help="measured seconds per case (default 20; --quick 5)")
    parser.add_argument("--redis-db", type=int, default=6,
                        help="database of the machine's Redis (the test suite claims and flushes 9-15)")
    parser.add_argument("--profile", type=Path, help="directory for py-spy profiles of 1x50 and 100x50")
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument("--profile-clients", default="1", help="client counts to profile, e.g. 1,32")
    parser.add_argument("--breakdown", action="store_true", help="stage timers in process, no gRPC")
    parser.add_argument("--breakdown-cache", action="store_true",
                        help="also the breakdown with every state served from the service's cache")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra argument for featurestream serve")
    args = parser.parse_args()
    events_n = args.events or (40_000 if args.quick else 300_000)
    warmup = args.warmup if args.warmup is not None else (1.5 if args.quick else 3.0)
    duration = args.duration if args.duration is not None else (5.0 if args.quick else 20.0)
    client_counts = [int(x) for x in args.clients.split(",")]
    features = case_features()
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(features)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {sorted(features)}")

    began = time.monotonic()
    wait_for_serve_command()
    project = f"servebench{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="featurestream-bench-serving-"))
    services = start_services(args.redis_db)
    server: Server | None = None
    pool: ClientPool | None = None
    report: dict[str, Any] = {"cases": []}
    try:
        for name, where in services.described.items():
            log(f"{name}: {where}")
        versions = apply_definitions(services, project)
        # the server and the client processes start while the state loads (they only wait)
        server = Server(services, project, work, args.serve_arg)
        processes, threads = (max(client_counts), 1) if args.client_mode == "process" else (1, max(client_counts))
        pool = ClientPool(server.address, processes, threads, seed=args.seed)
        log(f"loading {events_n:,} events of {args.users:,} users over the last 24 h through SourceProcessor "
            f"(load average {Path('/proc/loadavg').read_text().split()[0]})")
        import redis

        with redis.Redis.from_url(services.redis_url) as client:
            client.set(f"fs:{project}:bench-sentinel", b"1")
        data: Dataset = load(services, project, versions, events_n, args.users, args.seed)
        log(f"loaded {data.valid:,} valid events in {data.load_seconds:.1f}s "
            f"({data.valid / data.load_seconds:,.0f}/s); {activity_summary(data)}")
        users = sample_users(data, args.entities, 20_000, args.seed)
        sizes = {}
        for view, version in data.view_versions.items():
            sizes[view] = state_sizes(services.redis_url, project, view, version, users[:2000])
            s = sizes[view]
            log(f"{view}@{version} state per looked-up entity ({args.entities}): hash fields p50 {s['fields_p50']}, "
                f"p90 {s['fields_p90']}, p99 {s['fields_p99']}, max {s['fields_max']}; bytes p50 {s['bytes_p50']:,}, "
                f"p90 {s['bytes_p90']:,}, max {s['bytes_max']:,}")
        server.wait_ready(features["1x6"][1])
        log(f"server up: {' '.join(server.argv[1:])} (pid {server.proc.pid})")
        pool.wait_ready()
        pool.set_pool(users)
        log(f"{pool.clients} clients ready ({processes} processes x {threads} threads); "
            f"warm-up {warmup:g}s, measured {duration:g}s per case")
        watch = CpuWatch(server.proc.pid, pool.pids)
        for name in cases:
            entities, names = features[name]
            one_client_s: float | None = None
            for clients in client_counts:
                w, d = warmup, duration
                if one_client_s is not None and clients > 1:
                    # a round of calls takes about clients x the single call: warm up at least one
                    # round and measure a few (capped at 2x the window in --quick, 4x otherwise)
                    rounds = clients * one_client_s
                    w = max(w, min(rounds, d if args.quick else 2 * d))
                    d = max(d, min(3 * rounds, (2 if args.quick else 4) * d))
                c = run_case(pool, name, entities, names, clients, w, d, watch)
                c["state_intact"] = sentinel_intact(services.redis_url, project)
                if clients == 1 and c["p50_ms"] is not None:
                    one_client_s = c["p50_ms"] / 1000
                report["cases"].append(c)
                print(format_case(c), flush=True)
                if not c["state_intact"]:
                    log("  THE STATE IS GONE from Redis (someone flushed the database?): this case is void")
                if c["errors"]:
                    log(f"  errors: {c['errors']}")
                log(f"  warm-up response: {c['response_shapes']} (rows, features); statuses {c['warmup_statuses']}")

        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            report["profiles"] = {}
            for name in ("1x50", "100x50"):
                for clients in [int(x) for x in args.profile_clients.split(",")]:
                    entities, names = features[name]
                    summary = profile_case(pool, server.proc.pid, name, entities, names, clients,
                                           args.profile_seconds, args.profile / f"serve-{name}-{clients}clients.txt")
                    if summary is not None:
                        report["profiles"][f"{name}/{clients}"] = summary

        if args.breakdown:
            from serving_profile import breakdown, format_breakdown

            report["breakdown"] = {}
            for name in ("1x50", "100x50"):
                entities, names = features[name]
                b = breakdown(services.postgres_url, services.redis_url, project, users, names, entities,
                              5.0 if args.quick else 15.0)
                report["breakdown"][name] = b
                print(format_breakdown(f"breakdown {name}", b), flush=True)
                if args.breakdown_cache:
                    b = breakdown(services.postgres_url, services.redis_url, project, users, names, entities,
                                  5.0 if args.quick else 15.0, cache_ttl_ms=3_600_000)
                    report["breakdown"][f"{name} cached"] = b
                    print(format_breakdown(f"breakdown {name}, decoded states cached", b), flush=True)

        report.update({
            "events": data.events, "valid_events": data.valid, "users": args.users,
            "users_with_events": data.users_with_events, "entities": args.entities,
            "client_mode": args.client_mode, "warmup_s": warmup, "duration_s": duration,
            "state_sizes": sizes, "server_argv": server.argv[1:], "quick": args.quick,
            "load_seconds": round(data.load_seconds, 1), "cpu_count": os.cpu_count(),
        })
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
            log(f"wrote {args.json}")
    finally:
        t = time.monotonic()
        if pool is not None:
            pool.close()
        t2 = time.monotonic()
        if server is not None:
            server.stop()
        log(f"stopped the clients in {t2 - t:.1f}s and the server in {time.monotonic() - t2:.1f}s")
        delete_prefix(services.redis_url, f"fs:{project}:")
        services.close()
        shutil.rmtree(work, ignore_errors=True)
        log(f"done in {time.monotonic() - began:.0f}s")


if __name__ == "__main__":
    main()
