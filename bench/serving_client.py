"""Load generator of the serving benchmark: closed-loop gRPC clients in worker processes.

``ClientPool(address, n_processes, threads_per_process)`` starts its workers once, as small
scripts of their own (this file), and reuses them for every case; ``set_pool`` hands them the
user ids to draw entities from. A case
(``run``) tells each of the first k workers to call ``GetOnlineFeatures`` back to back from a
shared start instant: calls started before ``measure_from`` are warm-up, calls started in
[measure_from, measure_until) are measured (latency = the unary call with the response parsed by
the generated stub, i.e. what a client program waits for) when they also complete in it, and
calls/s counts those. No call starts after ``measure_until``.

Each client thread owns its own channel (its own HTTP/2 connection), like separate programs.
Requests are built once per worker: ``distinct`` different entity sets drawn from the user pool
with the worker's own seed, sent round-robin.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024)]


@dataclass
class CaseSpec:
    name: str
    entities: int
    features: list[str]
    distinct: int
    begin: float          # time.monotonic() instant to start (warm-up)
    measure_from: float
    measure_until: float
    timeout_s: float = 30.0
    threads: int = 1      # client threads in each worker for this case


def _client_loop(stub: Any, requests: list[Any], spec: CaseSpec, out: dict[str, Any]) -> None:
    import grpc

    lat = array("d")
    errors: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    shape: tuple[int, int] | None = None
    call = stub.GetOnlineFeatures
    perf, mono = time.perf_counter, time.monotonic
    n = len(requests)
    i = 0
    measured_from, until, timeout = spec.measure_from, spec.measure_until, spec.timeout_s
    checked = False
    while True:
        t = mono()
        if t >= until:
            break
        request = requests[i % n]
        i += 1
        s = perf()
        try:
            response = call(request, timeout=timeout)
        except grpc.RpcError as exc:
            errors[str(exc.code())] += 1
            continue
        e = perf()
        if t >= measured_from and mono() < until:  # completed in the window
            lat.append(e - s)
        elif not checked:  # one warm-up response: its shape and statuses
            checked = True
            shape = (len(response.rows), len(response.feature_names))
            for row in response.rows:
                for v in row.values:
                    statuses[v.status] += 1
    out["lat"] = lat
    out["errors"] = errors
    out["statuses"] = statuses
    out["shape"] = shape
    out["calls"] = i


def _worker(conn: Connection, address: str, seed: int, threads: int) -> None:
    import grpc

    from featurestream.v1 import featurestream_pb2 as pb
    from featurestream.v1 import featurestream_pb2_grpc as pbg

    channels = [grpc.insecure_channel(address, options=GRPC_OPTIONS) for _ in range(threads)]
    stubs = [pbg.FeatureServiceStub(ch) for ch in channels]  # type: ignore[no-untyped-call]
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=60)
    rng = random.Random(seed)
    pool: list[str] = []
    conn.send(("ready", os.getpid()))
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            if message[0] == "pool":
                pool = message[1]
                continue
            spec: CaseSpec = message[1]  # "prepare": build the requests, then wait for "go"
            requests = [
                pb.GetOnlineFeaturesRequest(
                    entities=[pb.EntityKey(join_keys={"user_id": rng.choice(pool)}) for _ in range(spec.entities)],
                    features=spec.features,
                )
                for _ in range(spec.distinct)
            ]
            conn.send(("prepared", len(requests)))
            go = conn.recv()
            assert go[0] == "go"
            spec.begin, spec.measure_from, spec.measure_until = go[1:]
            used = min(spec.threads, threads)
            outs: list[dict[str, Any]] = [{} for _ in range(used)]
            wait = spec.begin - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            workers = [threading.Thread(target=_client_loop, args=(stubs[k], requests[k::used] or requests, spec, outs[k]))
                       for k in range(used)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            lat = array("d")
            errors: Counter[str] = Counter()
            statuses: Counter[int] = Counter()
            for o in outs:
                lat.extend(o["lat"])
                errors.update(o["errors"])
                statuses.update(o["statuses"])
            conn.send(("result", {"lat": lat.tobytes(), "errors": dict(errors), "statuses": dict(statuses),
                                  "shape": outs[0]["shape"], "calls": sum(o["calls"] for o in outs)}))
    finally:
        for ch in channels:
            ch.close()


class ClientPool:
    """Worker processes started as ``python serving_client.py FD ADDRESS SEED THREADS`` (a small
    script: spawning through multiprocessing would re-import the benchmark's heavy main module in
    each of them), talking over a socket pair with multiprocessing's Connection."""

    def __init__(self, address: str, processes: int, threads: int = 1, seed: int = 0) -> None:
        self.threads = threads
        self.conns: list[Connection] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        for k in range(processes):
            ours, theirs = socket.socketpair()
            proc = subprocess.Popen(
                [sys.executable, __file__, str(theirs.fileno()), address, str(seed * 1000 + k), str(threads)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            )
            theirs.close()
            self.conns.append(Connection(ours.detach()))
            self.procs.append(proc)
        self.pids: list[int] = []

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Every worker has its channels connected (the server answers)."""
        deadline = time.monotonic() + timeout
        for conn in self.conns:
            if not conn.poll(max(0.1, deadline - time.monotonic())):
                self.close()
                raise RuntimeError("client workers did not start in time")
            kind, pid = conn.recv()
            assert kind == "ready"
            self.pids.append(pid)

    def set_pool(self, pool: list[str]) -> None:
        """The user ids the workers draw entities from."""
        for conn in self.conns:
            conn.send(("pool", pool))

    @property
    def clients(self) -> int:
        return len(self.conns) * self.threads

    def run(self, spec: CaseSpec, clients: int) -> dict[str, Any]:
        """``clients`` closed-loop clients run ``spec``: one per worker process (process mode), or
        that many threads in the one worker (thread mode)."""
        if self.threads == 1:
            workers, spec.threads = clients, 1
        else:
            workers, spec.threads = 1, clients
        if workers > len(self.conns) or spec.threads > self.threads:
            raise ValueError(f"{clients} clients do not fit {len(self.conns)} workers x {self.threads} threads")
        # requests are built before the clock starts (on a loaded machine that takes a while)
        offsets = (spec.measure_from - spec.begin, spec.measure_until - spec.begin)
        for conn in self.conns[:workers]:
            conn.send(("prepare", spec))
        for conn in self.conns[:workers]:
            if not conn.poll(300):
                raise RuntimeError("a client worker did not prepare its requests")
            kind, _ = conn.recv()
            assert kind == "prepared"
        spec.begin = time.monotonic() + 0.05
        spec.measure_from, spec.measure_until = spec.begin + offsets[0], spec.begin + offsets[1]
        for conn in self.conns[:workers]:
            conn.send(("go", spec.begin, spec.measure_from, spec.measure_until))
        lat = array("d")
        errors: Counter[str] = Counter()
        statuses: Counter[int] = Counter()
        shapes = set()
        calls = 0
        for conn in self.conns[:workers]:
            if not conn.poll(spec.measure_until - time.monotonic() + 120):
                raise RuntimeError("a client worker did not report")
            kind, result = conn.recv()
            part = array("d")
            part.frombytes(result["lat"])
            lat.extend(part)
            errors.update(result["errors"])
            statuses.update(result["statuses"])
            shapes.add(result["shape"])
            calls += result["calls"]
        return {"lat": lat, "errors": dict(errors), "statuses": dict(statuses), "shapes": shapes, "calls": calls}

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self.conns:
            conn.close()


if __name__ == "__main__":
    _worker(Connection(int(sys.argv[1])), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
