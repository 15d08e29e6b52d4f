"""Where a lookup's time goes: py-spy on the running server, and stage timers in process.

``record(pid, seconds, out)`` samples the server with py-spy (``--gil``: only the thread that
holds the GIL, which is what bounds a GIL-bound Python server; the share of intervals with a
sample is the GIL's busy share). ``categorise(out)`` then charges every sample to the deepest
frame on its stack that matches a stage:

* grpc (Python side): grpcio's ``_server.py`` and friends outside our handler;
* request/handler: our handler around the service call (principal, request -> dicts);
* service: resolve refs, parse keys, statuses, rows (service.py, refs.py, access.py);
* redis round trip: redis-py (pipeline building, socket, hiredis parse);
* decode state: ``parse_fields`` / ``merged_state`` (state.py, codec.py, HLL deserialize);
* evaluate: ``ViewAggregator.evaluate`` (layout.py, aggregators.py: transpose, merges, HLL unions);
* encode response: ``convert.encode_rows``;
* metrics: prometheus_client.

``breakdown(...)`` runs the same lookups as the server in this process, without gRPC, and
times the stages with wrappers (the server's own code; the wrappers add ~1 us per call).
"""

from __future__ import annotations

import gc
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

STAGES = ("grpc (Python side)", "handler (incl. freeing the call's objects)", "resolve feature refs",
          "service (keys, statuses, rows)", "redis round trip", "decode state", "evaluate", "encode response",
          "metrics", "other")


def record(pid: int, seconds: float, out: Path, rate: int = 250, gil: bool = True) -> subprocess.Popen[bytes]:
    """Start py-spy on ``pid`` for ``seconds`` (returns the process; wait for it)."""
    py_spy = Path(sys.executable).with_name("py-spy")
    argv = [str(py_spy if py_spy.exists() else "py-spy"), "record", "--pid", str(pid), "--duration",
            str(max(1, round(seconds))), "--rate", str(rate), "--format", "raw", "--output", str(out)]
    if gil:
        argv.append("--gil")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _parse(frame: str) -> tuple[str, str, str]:
    m = _FRAME.match(frame)
    if not m:
        return frame, "", ""
    path = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return m["func"], path, m["line"] or ""


def _stage(func: str, path: str) -> str | None:
    name = func.rsplit(".", 1)[-1]
    if path.endswith("serving/refs.py") and name == "resolve":
        return "resolve feature refs"
    if path.startswith("grpc/") or path.startswith("grpc_"):
        return "grpc (Python side)"
    if path.endswith("serving/grpc_server.py"):
        return "handler (incl. freeing the call's objects)"
    if path.endswith(("serving/service.py", "serving/refs.py", "serving/access.py", "serving/snapshots.py")):
        return "service (keys, statuses, rows)"
    if path.startswith("redis/") or "hiredis" in path:
        return "redis round trip"
    if path.endswith("online/redis_store.py") and name in ("parse_fields", "merged_state"):
        return "decode state"
    if path.endswith("aggregation/view.py") and name == "evaluate":
        return "evaluate"
    if path.endswith("serving/convert.py"):
        return "encode response" if func != "entity_keys" else "handler (incl. freeing the call's objects)"
    if path.startswith("prometheus_client/"):
        return "metrics"
    return None


def categorise(raw: Path, top: int = 25) -> dict[str, Any]:
    stages: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_parse(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        stage = "other"
        for func, path, _ in frames:  # root first: the deepest match wins
            found = _stage(func, path)
            if found is not None:
                stage = found
        stages[stage] += count
        if frames:
            func, path, line_no = frames[-1]
            self_time[f"{func} ({path}:{line_no})"] += count
        for name in {f"{f} ({p})" for f, p, _ in frames}:
            inclusive[name] += count
    return {
        "samples": total,
        "stages": {s: stages[s] / total for s in STAGES if stages[s]} if total else {},
        "self": [(name, n / total) for name, n in self_time.most_common(top)] if total else [],
        "inclusive": [(name, n / total) for name, n in inclusive.most_common(top)] if total else [],
    }


def format_profile(label: str, summary: dict[str, Any], seconds: float, rate: int) -> str:
    total = summary["samples"]
    busy = total / (seconds * rate) if seconds and rate else 0.0
    out = [f"{label}: {total} samples with the GIL held (~{100 * busy:.0f}% of the time)"]
    for stage, share in sorted(summary["stages"].items(), key=lambda kv: -kv[1]):
        out.append(f"  {100 * share:5.1f}%  {stage}")
    out.append("  top self time:")
    for name, share in summary["self"][:15]:
        out.append(f"    {100 * share:5.1f}%  {name}")
    return "\n".join(out)


# ------------------------------------------------------------------ in-process stage timers


class _Timers:
    """Wall and CPU (this thread) time inside wrapped callables. CPU time does not count waiting
    for a core, so it holds still while other work loads the machine; wall time does not."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        seconds, cpu, calls, perf, thread = self.seconds, self.cpu, self.calls, time.perf_counter, time.thread_time

        def timed(*args: Any, **kwargs: Any) -> Any:
            t, c = perf(), thread()
            try:
                return fn(*args, **kwargs)
            finally:
                cpu[label] += thread() - c
                seconds[label] += perf() - t
                calls[label] += 1

        return timed


def breakdown(postgres_url: str, redis_url: str, project: str, pool: list[str], features: list[str],
              entities: int, seconds: float, seed: int = 1, cache_ttl_ms: int = 0) -> dict[str, Any]:
    """Stage times per call (ms) of ``entities`` x ``features`` lookups, in this process.

    With ``cache_ttl_ms``, the service's state cache is on and filled before timing (every
    lookup a hit): what is left when decoding is cached."""
    import random

    import featurestream.serving.service as service_module
    from featurestream.aggregation.view import ViewAggregator
    from featurestream.gc_tuning import tune_gc
    from featurestream.registry import Registry
    from featurestream.serving.convert import encode_rows
    from featurestream.serving.service import OnlineService

    snapshot = Registry(postgres_url).snapshot(project)
    service = OnlineService(lambda: snapshot, redis_url, cache_ttl_ms=cache_ttl_ms)
    timers = _Timers()
    patched = ((service_module, "parse_fields", "decode: parse_fields (headers, tiles, HLL)"),
               (service_module, "merged_state", "decode: merged_state"),
               (ViewAggregator, "evaluate", "evaluate"))
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patched]
    for owner, attr, label in patched:
        setattr(owner, attr, timers.wrap(getattr(owner, attr), label))
    pipeline = service.redis.pipeline

    def timed_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        setattr(pipe, "execute", timers.wrap(pipe.execute, "redis round trip (HGETALL pipeline)"))  # noqa: B010
        return pipe

    setattr(service.redis, "pipeline", timed_pipeline)  # noqa: B010
    rng = random.Random(seed)
    requests = [[{"user_id": rng.choice(pool)} for _ in range(entities)] for _ in range(200 if entities < 50 else 40)]
    gc_pauses: list[float] = []
    gc_seconds = [0.0, 0.0, 0.0]
    gc_counts = [0, 0, 0]
    started_gc: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started_gc.append(time.perf_counter())
        elif started_gc:
            pause = time.perf_counter() - started_gc.pop()
            generation = info.get("generation", 0)
            gc_seconds[generation] += pause
            gc_counts[generation] += 1
            if generation == 2:
                gc_pauses.append(pause)

    try:
        for r in requests if cache_ttl_ms else requests[:20]:  # warm-up (fills the cache when on)
            encode_rows(service.get_online(r, features))
        timers.seconds.clear()
        timers.cpu.clear()
        timers.calls.clear()
        tune_gc()
        gc.callbacks.append(on_gc)
        total = encode_total = total_cpu = encode_cpu = 0.0
        fields = 0
        n = 0
        deadline = time.perf_counter() + seconds
        lat: list[float] = []
        cpu_lat: list[float] = []
        thread = time.thread_time
        while time.perf_counter() < deadline or n < 3:
            r = requests[n % len(requests)]
            t, c = time.perf_counter(), thread()
            rows = service.get_online(r, features)
            t2, c2 = time.perf_counter(), thread()
            encode_rows(rows)
            t3, c3 = time.perf_counter(), thread()
            total += t3 - t
            total_cpu += c3 - c
            encode_total += t3 - t2
            encode_cpu += c3 - c2
            lat.append(t3 - t)
            cpu_lat.append(c3 - c)
            n += 1
        # tiles read per entity (hash fields), for cost per tile
        client = service.redis
        views = {v.spec.name: v.version for v in snapshot.views}
        pipe = client.pipeline(transaction=False)
        sample = [rng.choice(pool) for _ in range(500)]
        for u in sample:
            view = features[0].split(":")[0]
            pipe.hlen(f"fs:{project}:{view}:v{views[view]}:{u}")
        fields = sum(pipe.execute()) / len(sample)
    finally:
        if on_gc in gc.callbacks:
            gc.callbacks.remove(on_gc)
        for owner, attr, original in saved:
            setattr(owner, attr, original)
        service.close()
    per_call = {label: 1000 * s / n for label, s in timers.seconds.items()}
    per_call["encode response (encode_rows)"] = 1000 * encode_total / n
    per_call["rest (resolve, keys, statuses, rows, metrics)"] = 1000 * total / n - sum(per_call.values())
    per_call_cpu = {label: 1000 * s / n for label, s in timers.cpu.items()}
    per_call_cpu["encode response (encode_rows)"] = 1000 * encode_cpu / n
    per_call_cpu["rest (resolve, keys, statuses, rows, metrics)"] = 1000 * total_cpu / n - sum(per_call_cpu.values())
    lat.sort()
    cpu_lat.sort()
    return {
        "calls": n,
        "total_ms": 1000 * total / n,
        "total_cpu_ms": 1000 * total_cpu / n,
        "stages_ms": per_call,
        "stages_cpu_ms": per_call_cpu,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "cpu_p50_ms": 1000 * cpu_lat[len(cpu_lat) // 2],
        "cpu_p99_ms": 1000 * cpu_lat[min(len(cpu_lat) - 1, int(0.99 * len(cpu_lat)))],
        "fields_per_entity": fields,
        "gc_ms_per_call": [round(1000 * x / n, 3) for x in gc_seconds],
        "gc_collections": gc_counts,
        "gc_full_collections": len(gc_pauses),
        "gc_full_max_ms": 1000 * max(gc_pauses, default=0.0),
    }


def format_breakdown(label: str, b: dict[str, Any]) -> str:
    out = [f"{label}: {b['calls']} calls in process (no gRPC): wall {b['total_ms']:.2f} ms per call "
           f"(p50 {b['p50_ms']:.2f}, p99 {b['p99_ms']:.2f}), CPU {b['total_cpu_ms']:.2f} ms per call "
           f"(p50 {b['cpu_p50_ms']:.2f}, p99 {b['cpu_p99_ms']:.2f}); {b['fields_per_entity']:.0f} hash fields per "
           f"entity on average; gc (gen 0/1/2) {b['gc_collections']} passes, {b['gc_ms_per_call']} ms per call "
           f"(inside the stages), longest full pass {b['gc_full_max_ms']:.1f} ms",
           f"  {'wall ms':>9} {'wall%':>6} {'CPU ms':>9} {'CPU%':>6}  stage"]
    for stage, ms in sorted(b["stages_ms"].items(), key=lambda kv: -kv[1]):
        cpu = b["stages_cpu_ms"].get(stage, 0.0)
        out.append(f"  {ms:9.3f} {100 * ms / b['total_ms']:5.1f}% {cpu:9.3f} {100 * cpu / b['total_cpu_ms']:5.1f}%  {stage}")
    return "\n".join(out)
