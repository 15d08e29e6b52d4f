"""Online measurement: client worker processes, interleaved rounds, percentiles (project venv)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Case:
    name: str
    entities: int
    view: str
    features: list[str]
    """Feature names within ``view``."""

    def refs(self) -> list[str]:
        return [f"{self.view}:{n}" for n in self.features]


@dataclass
class Contender:
    key: str
    """e.g. ``fs_grpc``, ``fs_grpc_cache``, ``feast_sdk``."""
    label: str
    side: str
    """``featurestream`` or ``feast``."""
    command: list[str]
    log: Path
    proc: subprocess.Popen[str] | None = None
    ns: dict[str, list[int]] = field(default_factory=dict)

    def launch(self, env: dict[str, str] | None = None) -> None:
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         text=True, env=env, start_new_session=True)

    def wait_ready(self) -> None:
        hello = self._read(timeout_hint=f"{self.key} start-up")
        if not hello.get("ready"):
            raise RuntimeError(f"{self.key}: unexpected first answer {hello}")

    def _read(self, timeout_hint: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.key} exited during {timeout_hint}:\n{self.log.read_text()[-3000:]}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.key}: {answer['error']}\n{self.log.read_text()[-2000:]}")
        return answer

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout_hint=str(command.get("op")))

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    rank = max(1, math.ceil(q * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1e6


def summarize(ns: list[int]) -> dict[str, Any]:
    ordered = sorted(ns)
    mean_ns = sum(ordered) / len(ordered)
    return {
        "calls": len(ordered),
        "p50_ms": round(percentile(ordered, 0.50), 3),
        "p99_ms": round(percentile(ordered, 0.99), 3),
        "max_ms": round(ordered[-1] / 1e6, 3),
        "mean_ms": round(mean_ns / 1e6, 3),
        "calls_per_s": round(1e9 / mean_ns, 1),
    }


def payloads(rng: random.Random, users: Counter[str], entities: int, count: int) -> list[list[str]]:
    """``count`` requests of ``entities`` distinct users each, drawn in proportion to their
    transactions (a fraud model scores each transaction: lookups follow activity)."""
    names = list(users)
    weights = [users[u] for u in names]
    out = []
    for _ in range(count):
        chosen: dict[str, None] = {}
        while len(chosen) < entities:
            for u in rng.choices(names, weights, k=entities - len(chosen)):
                chosen[u] = None
        out.append(list(chosen))
    return out


def round_order(fs: list[Contender], feast: list[Contender], index: int) -> list[tuple[Contender, int, int]]:
    """One round: featurestream and Feast clients alternate (A/B/A/B). Each featurestream client
    runs the round's whole payload list once; each Feast client the same number of calls, split
    into the slices between featurestream blocks. Reversed on odd rounds (no fixed position)."""
    per_feast = math.ceil(len(fs) / len(feast))
    slots: list[tuple[Contender, int, int]] = []
    seen: Counter[str] = Counter()
    for i, a in enumerate(fs):
        slots.append((a, 0, 1))
        b = feast[i % len(feast)]
        slots.append((b, seen[b.key], per_feast))
        seen[b.key] += 1
    return slots[::-1] if index % 2 else slots


def run_case(
    case: Case, fs: list[Contender], feast: list[Contender], users: Counter[str], rounds: int, calls: int,
    warm: int, seed: int, log: Callable[[str], None],
) -> dict[str, dict[str, float]]:
    rng = random.Random(f"{seed}:{case.name}")
    warmup = payloads(rng, users, case.entities, warm)
    errors: dict[str, list[str]] = {c.key: [] for c in [*fs, *feast]}
    for contender in [*fs, *feast]:
        failed = contender.ask({"op": "warm", "case": case.name, "payloads": warmup})["errors"]
        if failed:
            log(f"  {case.name}: {contender.key}: {len(failed)} failed warm-up calls, e.g. {failed[0]}")
    samples: dict[str, list[int]] = {c.key: [] for c in [*fs, *feast]}
    started = time.perf_counter()
    for r in range(rounds):
        batch = payloads(rng, users, case.entities, calls)
        for contender, part, parts in round_order(fs, feast, r):
            size = math.ceil(len(batch) / parts)
            chunk = batch[part * size : (part + 1) * size]
            if chunk:
                answer = contender.ask({"op": "run", "case": case.name, "payloads": chunk})
                samples[contender.key].extend(answer["ns"])
                errors[contender.key].extend(answer["errors"])
        log(f"  {case.name}: round {r + 1}/{rounds} done ({time.perf_counter() - started:.0f} s)")
    out = {}
    for key, ns in samples.items():
        out[key] = summarize(ns) if ns else {"calls": 0}
        out[key]["errors"] = len(errors[key])
        if errors[key]:
            out[key]["first_error"] = errors[key][0]
            log(f"  {case.name}: {key}: {len(errors[key])} failed calls, e.g. {errors[key][0]}")
    return out
