"""Parallel workers for one view group: each evaluates a share of the entities in a process of
its own (``spawn``: nothing of the parent's connections or threads is inherited), with its own
connection and query, and writes its own spill files. Progress and results come back on a queue.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from featurestream.offline.features import TrainingSetError, resolve
from featurestream.offline.join import GroupLabels, StatusCounts, compute, output_schema
from featurestream.offline.spill import SpillWriter
from featurestream.registry.records import ProjectSnapshot


@dataclass
class Task:
    """Everything a worker needs, as plain picklable values."""

    part: str
    url: str
    snapshot: ProjectSnapshot
    refs: list[str]
    services: list[str]
    taken: list[str]
    group: int
    as_of_arrival: bool
    has_archive: bool
    labels: GroupLabels
    root: Path
    bucket_rows: int
    buckets: int


def _work(task: Task, out: Any) -> None:
    try:
        import psycopg

        group = resolve(task.snapshot, task.refs, task.services, task.taken)[task.group]
        outputs = [f for p in group.views for f in p.features]
        schema: pa.Schema = output_schema(outputs)
        writer = SpillWriter(task.root, task.group, task.part, task.bucket_rows, task.buckets, schema)
        counts: StatusCounts = {}
        conn = psycopg.connect(task.url, autocommit=True) if task.has_archive else None
        try:
            if conn is not None:
                conn.execute("set timezone = 'UTC'")
            compute(
                conn,
                group,
                task.labels,
                writer,
                as_of_arrival=task.as_of_arrival,
                counts=counts,
                advance=lambda rows: out.put(("rows", task.part, rows)),
            )
            writer.close()
        finally:
            if conn is not None:
                conn.close()
        out.put(("done", task.part, counts))
    except BaseException:
        out.put(("error", task.part, traceback.format_exc()))


def run(tasks: list[Task], advance: Callable[[int], None]) -> list[StatusCounts]:
    """Run the tasks in parallel processes; their status counts, or the first worker's error."""
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    procs = {t.part: ctx.Process(target=_work, args=(t, results), daemon=True) for t in tasks}
    for proc in procs.values():
        proc.start()
    counts: list[StatusCounts] = []
    pending = set(procs)
    try:
        while pending:
            try:
                kind, part, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in pending if procs[p].exitcode is not None]
                if dead:
                    raise TrainingSetError(
                        f"worker {dead[0]} died (exit code {procs[dead[0]].exitcode})"
                    ) from None
                continue
            if kind == "rows":
                advance(payload)
            elif kind == "done":
                counts.append(payload)
                pending.discard(part)
            else:
                raise RuntimeError(f"training-set worker {part} failed:\n{payload}")
    finally:
        for proc in procs.values():
            if proc.is_alive() and pending:
                proc.terminate()
            proc.join()
    return counts
