"""featurestream and Feast side by side, in one run: online lookups and point-in-time training sets.

::

    python bench/compare_feast/run.py [--quick] [--json PATH] [--no-report]

Run it with the project's virtual environment. Feast runs in a virtual environment of its own
(``$FEATURESTREAM_HOME/feast-venv``, default ``~/.featurestream/feast-venv``; ``--feast-venv``),
created with ``feast[redis]==--feast-version`` and matplotlib when missing; it is never installed
into the project's environment.

1. Services: a throwaway database on the PostgreSQL server (``--postgres``, dropped at the end)
   and two empty database numbers of ONE Redis server (``--redis``): featurestream's and Feast's
   online store. Only those two are flushed, at the end.
2. Data: demo events over the last ``--span-hours`` through featurestream's ``SourceProcessor``
   into Redis and PostgreSQL; featurestream's values of every user are read back and written as
   Feast's Parquet sources; ``feast apply`` + ``feast materialize``; every materialized value is
   read back through Feast's SDK and compared with featurestream's.
3. Online: 1 entity x 6 features (``user_transactions``), 1 x 50 and 100 x 50
   (``user_spending_profile``, its first 50 features). Clients, each a process of its own with
   the same loop (``loop.py``): featurestream gRPC, REST, in-process, each with the state cache
   off and on; Feast's SDK and Feast's HTTP feature server (``feast serve``, one worker, no
   recycling). Warm-up, then rounds in which featurestream and Feast clients alternate.
4. Training: point-in-time training sets of ``user_transactions`` for each label count: Feast's
   ``get_historical_features`` (file offline store) and ``featurestream training-set``, each in
   its own process (wall time, peak memory = ru_maxrss), and where their semantics agree a value
   check.
5. Report: ``docs/benchmarks.md`` and ``docs/benchmarks.png`` (``--no-report``: neither).

``--quick``: fewer calls and only the 10k training set (a few minutes once Feast is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # bench/: _stack.py

import data  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import report  # noqa: E402
import training  # noqa: E402
from measure import Case, Contender, payloads, run_case  # noqa: E402
from services import (  # noqa: E402
    Server,
    default_feast_venv,
    ensure_feast_venv,
    free_port,
    redis_databases,
    throwaway_database,
)

from featurestream.definitions.loader import load_project  # noqa: E402

PROJECT_VIEWS = ["user_transactions", "user_spending_profile"]
TRAINING_VIEW = "user_transactions"
FEAST_PROJECT = "fs_compare"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer calls, only the 10k training set")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md and .png")
    p.add_argument("--skip-online", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--training-rows", default=None, help="label counts (default 10000,100000,1000000; --quick 10000)")
    p.add_argument("--events", type=int, default=30_000, help="demo events (default 30000)")
    p.add_argument("--users", type=int, default=3_000, help="demo users (default 3000)")
    p.add_argument("--span-hours", type=float, default=48.0, help="the events cover this many hours up to now")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds per case (default 8; --quick 4)")
    p.add_argument("--calls", type=int, default=None,
                   help="calls per client per round for 1-entity cases (default 1200; --quick 200); 100-entity cases 1/20")
    p.add_argument("--cache-ttl-ms", type=int, default=1000, help="featurestream's state cache TTL when on")
    p.add_argument("--memory-limit-gb", type=float, default=12.0,
                   help="stop a training-set process whose resident memory passes this (default 12)")
    p.add_argument("--lookups", choices=["activity", "uniform"], default="activity",
                   help="users looked up in proportion to their transactions (default) or uniformly")
    p.add_argument("--no-gc-freeze", action="store_true", help="client processes keep the default collector")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--keep-tmp", action="store_true", help="keep the run's directory (logs, Feast repo)")
    p.add_argument("--report-from", type=Path, help="only write the page and chart from a saved PATH.full.json")
    p.add_argument("--postgres", default=os.environ.get("FEATURESTREAM_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--redis", default=os.environ.get("FEATURESTREAM_BENCH_REDIS", "redis://127.0.0.1:6379"),
                   help="Redis server (no database number: two empty ones are picked)")
    p.add_argument("--feast-venv", type=Path, default=default_feast_venv())
    p.add_argument("--feast-version", default="0.67.0")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "benchmarks.png")
    return p.parse_args()


def cases(snapshot: Any) -> list[Case]:
    ut = list(data.feature_types(snapshot, "user_transactions"))
    usp = list(data.feature_types(snapshot, "user_spending_profile"))[:50]
    return [
        Case("1x6", 1, "user_transactions", ut),
        Case("1x50", 1, "user_spending_profile", usp),
        Case("100x50", 100, "user_spending_profile", usp),
    ]


def redis_connection_string(url: str) -> str:
    """``redis://host:port/db`` -> Feast's ``host:port,db=N``."""
    rest = url.split("://", 1)[1]
    hostport, _, db = rest.partition("/")
    return f"{hostport},db={db or 0}"


# ------------------------------------------------------------------ Feast repo


def build_feast_repo(repo: Path, snapshot: Any, tables: dict[str, pa.Table], redis_url: str) -> None:
    (repo / "data").mkdir(parents=True)
    shutil.copy(HERE / "feast_repo" / "features.py", repo / "features.py")
    template = (HERE / "feast_repo" / "feature_store.yaml.tmpl").read_text()
    (repo / "feature_store.yaml").write_text(template.format(
        project=FEAST_PROJECT, registry=repo / "data" / "registry.db", redis=redis_connection_string(redis_url)))
    views = []
    for view, table in tables.items():
        path = repo / "data" / f"{view}.parquet"
        pq.write_table(table, path)
        spec = snapshot.view(view).spec
        ttl = spec.effective_online_ttl
        views.append({"name": view, "path": str(path), "ttl_s": int(ttl.total_seconds()) if ttl else 0,
                      "features": list(data.feature_types(snapshot, view).items())})
    (repo / "schema.json").write_text(json.dumps({"entity": "user", "join_key": "user_id", "views": views}, indent=1))


def feast_call(python: Path, command: str, config: dict[str, Any], cwd: Path) -> dict[str, Any]:
    done = subprocess.run([str(python), str(HERE / "feast_worker.py"), command, json.dumps(config)],
                          capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"feast_worker {command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------ online


def online_part(args: argparse.Namespace, tmp: Path, repo: Path, feast_python: Path, pg_url: str, redis_url: str,
                project: str, the_cases: list[Case], ingested: data.Ingested,
                expected: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    fs_env = {**os.environ, "FEATURESTREAM_POSTGRES_URL": pg_url, "FEATURESTREAM_REDIS_URL": redis_url,
              "FEATURESTREAM_HOME": str(tmp / "fs-home")}
    fs_env.pop("FEATURESTREAM_KAFKA_BOOTSTRAP", None)
    refs = {c.name: c.refs() for c in the_cases}
    freeze = not args.no_gc_freeze
    body_fs = json.dumps({"entities": [{"user_id": "u_00000"}], "features": refs["1x6"]}).encode()
    body_feast = json.dumps({"features": refs["1x6"], "entities": {"user_id": ["u_00000"]}}).encode()
    # three featurestream servers: nothing reused ("nomemo"), the defaults ("off": the exact read
    # memo on, the state cache off), and the state cache on too ("on")
    modes = {"nomemo": (0, 0), "off": (0, None), "on": (args.cache_ttl_ms, None)}
    ports = {f"{kind}_{mode}": free_port() for kind in ("grpc", "http") for mode in modes}
    ports["feast"] = free_port()
    with ExitStack() as stack:
        servers = []
        for mode, (ttl, memo) in modes.items():
            memo_args = ["--memo-entries", str(memo)] if memo is not None else []
            server = Server(f"featurestream serve ({mode})", [
                sys.executable, "-m", "featurestream.cli", "serve", "--project", project,
                "--grpc-port", str(ports[f"grpc_{mode}"]), "--http-port", str(ports[f"http_{mode}"]),
                "--cache-ttl-ms", str(ttl), *memo_args, "--log-level", "warning"], tmp / f"fs-serve-{mode}.log", env=fs_env)
            stack.callback(server.stop)
            servers.append((server, ports[f"http_{mode}"]))
        feast_server = Server("feast serve", [
            str(feast_python.parent / "feast"), "-c", str(repo), "serve", "-h", "127.0.0.1", "-p", str(ports["feast"]),
            "--no-access-log", "-w", "1", "--max-requests", "0", "--max-requests-jitter", "0"],
            tmp / "feast-serve.log", cwd=str(repo))
        stack.callback(feast_server.stop)
        for server, port in servers:
            server.wait_http(port, "/v1/features/online", body_fs)
        feast_server.wait_http(ports["feast"], "/get-online-features", body_feast)
        log("servers ready")

        def fs_worker(key: str, label: str, target: str, mode: str) -> Contender:
            config = {"target": target, "cases": refs, "grpc": f"127.0.0.1:{ports[f'grpc_{mode}']}",
                      "http_port": ports[f"http_{mode}"], "redis_url": redis_url, "postgres_url": pg_url,
                      "project": project, "cache_ttl_ms": modes[mode][0], "memo_entries": modes[mode][1],
                      "freeze_gc": freeze}
            return Contender(key, label, "featurestream", [sys.executable, str(HERE / "fs_worker.py"), json.dumps(config)],
                             tmp / f"worker-{key}.log")

        def feast_worker(key: str, label: str, target: str) -> Contender:
            config = {"target": target, "cases": refs, "repo": str(repo), "http_port": ports["feast"], "freeze_gc": freeze}
            return Contender(key, label, "feast", [str(feast_python), str(HERE / "feast_worker.py"), "worker", json.dumps(config)],
                             tmp / f"worker-{key}.log")

        fs = [
            fs_worker("fs_inprocess_nomemo", "featurestream in-process, memo off", "inprocess", "nomemo"),
            fs_worker("fs_grpc_nomemo", "featurestream gRPC, memo off", "grpc", "nomemo"),
            fs_worker("fs_rest_nomemo", "featurestream REST, memo off", "rest", "nomemo"),
            fs_worker("fs_inprocess", "featurestream in-process", "inprocess", "off"),
            fs_worker("fs_grpc", "featurestream gRPC", "grpc", "off"),
            fs_worker("fs_rest", "featurestream REST", "rest", "off"),
            fs_worker("fs_inprocess_cache", "featurestream in-process, cache on", "inprocess", "on"),
            fs_worker("fs_grpc_cache", "featurestream gRPC, cache on", "grpc", "on"),
            fs_worker("fs_rest_cache", "featurestream REST, cache on", "rest", "on"),
        ]
        feast = [feast_worker("feast_sdk", "Feast SDK (in-process)", "sdk"),
                 feast_worker("feast_server", "Feast HTTP feature server", "http")]
        for contender in [*fs, *feast]:  # start-up in parallel
            contender.launch(env=fs_env if contender.side == "featurestream" else None)
            stack.callback(contender.stop)
        for contender in [*fs, *feast]:
            contender.wait_ready()
        def reference(view: str, users: list[str]) -> dict[str, dict[str, Any]]:
            table = data.read_online(pg_url, redis_url, project, view, users, data.now_ms())
            return {row["user_id"]: row for row in table.to_pylist()}

        checks = value_check(the_cases[:2], [*fs, *feast], ingested, expected, args.seed, reference)
        log(f"right values (featurestream: against a reference read at the same time; Feast: against its snapshot): {checks}")
        reader = next((line.split(": ", 1)[1] for line in (tmp / "worker-fs_inprocess.log").read_text().splitlines()
                       if line.startswith("in-process reader: ")), "unknown")
        log(f"client workers ready (in-process reader: {reader})")
        rounds = args.rounds or (4 if args.quick else 8)
        calls = args.calls or (200 if args.quick else 1200)
        results = []
        for case in the_cases:
            n = calls if case.entities == 1 else max(6, calls // 20)
            warm = (100 if args.quick else 300) if case.entities == 1 else (5 if args.quick else 30)
            load_before = loadavg()
            log(f"case {case.name}: {rounds} rounds x {n} calls per client, warm-up {warm}")
            weights = ingested.users if args.lookups == "activity" else Counter(dict.fromkeys(ingested.users, 1))
            stats = run_case(case, fs, feast, weights, rounds, n, warm, args.seed, log)
            results.append({"name": case.name, "entities": case.entities, "features": len(case.features),
                            "view": case.view, "rounds": rounds, "calls_per_round": n, "warmup": warm,
                            "load_before": load_before, "load_after": loadavg(), "clients": stats})
        labels = {c.key: c.label for c in [*fs, *feast]}
    return {"cases": results, "labels": labels, "in_process_reader": reader, "cache_ttl_ms": args.cache_ttl_ms,
            "gc_freeze_in_clients": freeze, "value_check": checks, "lookups": args.lookups}


def value_check(the_cases: list[Case], contenders: list[Contender], ingested: data.Ingested,
                expected: dict[str, dict[str, dict[str, Any]]], seed: int,
                reference: Callable[[str, list[str]], dict[str, dict[str, Any]]]) -> dict[str, float]:
    """Share of values each client returns that are right (guards against a client silently
    answering nulls). Feast's are compared with the snapshot it materialized. featurestream's are
    evaluated when asked (sliding windows decay), so they are compared with ``reference`` (the
    in-process service, nothing reused) read just before and just after the client's answer: a
    value equal to either is right, whichever side of a minute boundary the client read on."""
    import random

    rng = random.Random(seed)
    shares = {}
    for contender in contenders:
        good = total = 0
        examples: list[str] = []
        for case in the_cases:
            sample = payloads(rng, ingested.users, 1, 20)
            users = [p[0] for p in sample]
            before = reference(case.view, users) if contender.side == "featurestream" else None
            answers = contender.ask({"op": "values", "case": case.name, "payloads": sample})["values"]
            after = reference(case.view, users) if contender.side == "featurestream" else None
            for user, values in zip(users, answers, strict=True):
                wants = [expected[case.view][user]] if before is None or after is None else [before[user], after[user]]
                for name, value in zip(case.features, values[0], strict=True):
                    ok = any(training.same(want[name], value) for want in wants)
                    good += ok
                    total += 1
                    if not ok and len(examples) < 3:
                        examples.append(f"{user} {name}: expected {' or '.join(repr(w[name]) for w in wants)}, got {value!r}")
        shares[contender.key] = round(good / total, 3)
        if examples:
            what = "the reference read at the same time" if contender.side == "featurestream" else "the snapshot"
            log(f"  {contender.key} differs from {what}, e.g. " + "; ".join(examples))
    return shares


# ------------------------------------------------------------------ main


def versions(feast_python: Path) -> dict[str, str]:
    import featurestream

    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    return {
        "featurestream": featurestream.__version__,
        "commit": (out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "?")
        + (" + uncommitted changes" if out(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]) else ""),
        "feast": out([str(feast_python), "-c", "import importlib.metadata as m; print(m.version('feast'))"]),
        "python": platform.python_version(),
        "feast_python": out([str(feast_python), "-c", "import platform; print(platform.python_version())"]),
        "redis_server": out(["redis-cli", "info", "server"]).split("redis_version:", 1)[-1].split()[0]
        if shutil.which("redis-cli") else "?",
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory_gib": f"{mem_kb / 1024 / 1024:.0f}",
        "os": f"{platform.system()} {platform.release()}",
    }


def main() -> None:
    args = parse_args()
    if args.report_from:  # render the page and chart again from a saved run, measuring nothing
        result = json.loads(args.report_from.read_text())
        feast_python = ensure_feast_venv(args.feast_venv, args.feast_version)
        report.write_markdown(result, args.markdown, args.png)
        report.write_chart(result, feast_python, args.png, HERE / "chart.py")
        log(f"wrote {args.markdown} and {args.png} from {args.report_from}")
        return
    started = time.perf_counter()
    meta: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "quick": args.quick,
                            "load": {"start": loadavg()}}
    feast_python = ensure_feast_venv(args.feast_venv, args.feast_version)
    meta["versions"] = versions(feast_python)
    meta["feast_venv"] = str(args.feast_venv)
    log(f"featurestream {meta['versions']['featurestream']}, Feast {meta['versions']['feast']}; load {meta['load']['start']}")
    definition = load_project(ROOT / "definitions")
    project = definition.project.name
    sizes = [int(s) for s in (args.training_rows or ("10000" if args.quick else "10000,100000,1000000")).split(",")]
    result: dict[str, Any] = {"meta": meta}
    with ExitStack() as stack:
        if args.keep_tmp:
            tmp = Path(tempfile.mkdtemp(prefix="fs-cmpfeast-"))
            log(f"keeping {tmp}")
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fs-cmpfeast-")))
        pg_url = stack.enter_context(throwaway_database(args.postgres))
        fs_redis, feast_redis = stack.enter_context(redis_databases(args.redis, 2))
        meta["redis"] = {"featurestream": fs_redis, "feast": feast_redis}
        snapshot = data.apply_demo(pg_url, definition)

        log(f"ingesting {args.events:,} demo events over {args.span_hours:g} h through SourceProcessor")
        end_ms = data.now_ms() - 30_000
        ingested = data.ingest(pg_url, fs_redis, snapshot, PROJECT_VIEWS, args.events, args.users,
                               args.span_hours * 3600, end_ms, args.seed, log)
        meta["data"] = {"events": ingested.events, "valid": ingested.valid, "dead_letters": ingested.dead_letters,
                        "late": ingested.late, "users": len(ingested.users), "span_hours": args.span_hours,
                        "ingest_s": round(ingested.seconds, 1)}
        log(f"ingested in {ingested.seconds:.0f} s: {ingested.valid:,} valid events of {len(ingested.users):,} users")

        snap_ms = data.now_ms()
        users = sorted(ingested.users)
        tables = {view: data.read_online(pg_url, fs_redis, project, view, users, snap_ms) for view in PROJECT_VIEWS}
        check = [{"name": view, "path": str(tmp / f"check_{view}.parquet"),
                  "features": list(data.feature_types(snapshot, view))} for view in PROJECT_VIEWS]
        for view, item in zip(PROJECT_VIEWS, check, strict=True):
            pq.write_table(tables[view], item["path"])
        history_s = 0.0
        if not args.skip_training:
            t = time.perf_counter()
            history = data.read_history(pg_url, project, TRAINING_VIEW, ingested.event_times)
            history_s = time.perf_counter() - t
            log(f"{history.num_rows:,} history rows of {TRAINING_VIEW} (featurestream as-of each event) in {history_s:.0f} s")
            tables[TRAINING_VIEW] = pa.concat_tables([history, tables[TRAINING_VIEW]])
        repo = tmp / "feast_repo"
        build_feast_repo(repo, snapshot, tables, feast_redis)
        start = datetime.fromtimestamp((ingested.start_ms - 3_600_000) / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        end = datetime.fromtimestamp(snap_ms / 1000 + 1, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        setup = feast_call(feast_python, "setup", {"repo": str(repo), "start": start, "end": end, "join_key": "user_id",
                                                   "check": check}, repo)
        setup["history_s"] = round(history_s, 1)
        meta["feast_setup"] = setup
        log(f"Feast: apply {setup['apply_s']} s, materialize {setup['materialize_s']} s, "
            f"{setup['values_checked']:,} values read back, mismatches {setup['mismatches'] or 'none'}")
        if setup["mismatches"]:
            log("  e.g. " + "; ".join(setup["examples"]))

        the_cases = cases(snapshot)
        if not args.skip_online:
            meta["load"]["online_start"] = loadavg()
            expected = {view: {row["user_id"]: row for row in pq.read_table(item["path"]).to_pylist()}
                        for view, item in zip(PROJECT_VIEWS, check, strict=True)}
            result["online"] = online_part(args, tmp, repo, feast_python, pg_url, fs_redis, project, the_cases,
                                           ingested, expected)
            meta["load"]["online_end"] = loadavg()
        if not args.skip_training:
            meta["load"]["training_start"] = loadavg()
            result["training"] = training.run(sizes, tmp, repo, feast_python, pg_url, ingested, TRAINING_VIEW,
                                              the_cases[0].features, args.seed, log, args.memory_limit_gb * 1024)
            meta["load"]["training_end"] = loadavg()
    meta["load"]["end"] = loadavg()
    meta["total_s"] = round(time.perf_counter() - started, 1)
    report.print_summary(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.json_figures(result), indent=2))
        args.json.with_suffix(".full.json").write_text(json.dumps(result, indent=2, default=str))
    if not args.no_report:
        report.write_markdown(result, args.markdown, args.png)
        report.write_chart(result, feast_python, args.png, HERE / "chart.py")
        log(f"wrote {args.markdown} and {args.png}")
    log(f"done in {meta['total_s']:.0f} s")


if __name__ == "__main__":
    main()
