"""Point-in-time correct training sets: label rows joined with feature values as served at their time.

Plan, per group of views that share a source and an entity (docs/training_sets.md):

1. read only the join columns of the labels (keys, timestamp), sort the row numbers by
   (entity key, timestamp) with pyarrow, and number the distinct entities in that order
   (``join.GroupLabels``);
2. one query streams the entities' archived events ordered by (entity number, event time)
   (``archive.py``); entities without events cost nothing and get MISSING;
3. per entity, the aggregation core evaluates every feature at the entity's label times
   (``pointintime.py``), in blocks of label rows (``join.compute``); with ``workers`` > 1
   each worker process takes a share of the entities, with its own query (``workers.py``);
4. each block goes to files by input row number (``spill.py``); at the end each range of rows
   is sorted back into input order and written beside the input rows, in that same order.

Memory: the join columns of every label row (sorted; about 40-80 bytes a row), one block of
results, one entity's events, one chunk of the event stream and one bucket of output rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa

from featurestream.offline.archive import archive_exists
from featurestream.offline.features import TrainingSetError, ViewGroup, resolve
from featurestream.offline.join import (
    ARROW_TYPES,
    STATUS_TYPE,
    GroupLabels,
    compute,
    emit_missing,
    output_schema,
)
from featurestream.offline.labels import (
    FrameLabels,
    LabelSource,
    TrainingWriter,
    key_array,
    open_labels,
    read_times_ms,
)
from featurestream.offline.pointintime import STATUSES
from featurestream.offline.progress import Reporter, Silent, reporter
from featurestream.offline.spill import SpillDir

DEFAULT_TIMESTAMP_COLUMN = "event_timestamp"


@dataclass
class TrainingSetSummary:
    rows: int
    features: list[str]
    seconds: float
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per feature column: how many rows got each status."""


# ------------------------------------------------------------------ public API


def training_set(
    labels: pd.DataFrame,
    features: Sequence[str] | str,
    *,
    project: str | None = None,
    postgres_url: str | None = None,
    timestamp_column: str = DEFAULT_TIMESTAMP_COLUMN,
    as_of_arrival: bool = False,
    feature_services: Sequence[str] = (),
    status_columns: bool = True,
    workers: int = 1,
    progress: bool = False,
) -> pd.DataFrame:
    """The labels with every requested feature as it would have been served at each row's time.

    ``labels`` holds the entity join keys, ``timestamp_column`` and any label columns; the
    result is a copy of it (same index, columns, values and row order) with one column per
    feature (named like the feature; ``view__feature`` when two views share the name) and,
    with ``status_columns``, a ``<column>__status`` column each: PRESENT, MISSING, STALE or
    INVALID, as serving reports them. A value older than the feature's ``max_age`` is null
    (STALE). ``as_of_arrival``: a row sees only events that had also arrived by its time.
    ``postgres_url``: the registry and offline store (default: the configured one).
    ``workers``: processes evaluating entities in parallel.
    """
    refs = [features] if isinstance(features, str) else list(features)
    source = FrameLabels(labels)
    report = reporter(progress)
    with _Session(postgres_url, project) as session:
        job = _Job(
            source, session, refs, list(feature_services), timestamp_column, as_of_arrival, workers, report
        )
        with SpillDir(source.num_rows) as spill:
            job.compute(spill)
            names = job.output_names(status_columns)
            parts = [spill.bucket(b, len(job.groups)).select(names) for b in range(spill.buckets)]
    report.close()
    table = pa.concat_tables(parts)
    out = labels.copy()
    for name in names:
        out[name] = _to_pandas(table[name], out.index)
    return out


def write_training_set(
    labels_path: Path,
    out_path: Path,
    features: Sequence[str],
    *,
    project: str | None = None,
    postgres_url: str | None = None,
    timestamp_column: str = DEFAULT_TIMESTAMP_COLUMN,
    as_of_arrival: bool = False,
    feature_services: Sequence[str] = (),
    status_columns: bool = True,
    workers: int = 1,
    progress: Reporter | None = None,
    spill_dir: Path | None = None,
) -> TrainingSetSummary:
    """Read labels (CSV or Parquet), write the training set (CSV or Parquet, by extension).

    Input columns come out exactly as read: Parquet columns with their types, CSV fields as the
    text they were. Memory stays bounded whatever the number of rows (see the module doc).
    """
    source = open_labels(labels_path)
    TrainingWriter.check_path(out_path)
    started = time.monotonic()
    report = progress or Silent()
    with _Session(postgres_url, project) as session:
        job = _Job(
            source,
            session,
            list(features),
            list(feature_services),
            timestamp_column,
            as_of_arrival,
            workers,
            report,
        )
        with SpillDir(source.num_rows, spill_dir) as spill:
            job.compute(spill)
            names = job.output_names(status_columns)
            report.note(f"writing {out_path}")
            _write(source, spill, len(job.groups), names, job.output_schema(names), out_path)
    job.summary.seconds = time.monotonic() - started
    if not status_columns:
        job.summary.statuses = {}
    return job.summary


# ------------------------------------------------------------------ the run


class _Session:
    """The registry snapshot and a database connection for one run."""

    def __init__(self, postgres_url: str | None, project: str | None) -> None:
        from featurestream.config import require
        from featurestream.registry import Registry

        self.url = postgres_url or require("postgres_url")
        registry = Registry(self.url)
        if project is None:
            known = registry.projects()
            if len(known) != 1:
                listed = ", ".join(known) or "none"
                raise TrainingSetError(
                    f"name the project with --project / project= (the registry holds: {listed})"
                )
            project = known[0]
        self.snapshot = registry.snapshot(project)
        self.conn: psycopg.Connection[Any] = psycopg.connect(self.url, autocommit=True)
        self.conn.execute("set timezone = 'UTC'")

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


class _Job:
    def __init__(
        self,
        source: LabelSource,
        session: _Session,
        refs: list[str],
        services: list[str],
        timestamp_column: str,
        as_of_arrival: bool,
        workers: int,
        report: Reporter,
    ) -> None:
        self.groups = resolve(session.snapshot, refs, services, source.columns)
        if timestamp_column not in source.columns:
            raise TrainingSetError(
                f"the labels have no timestamp column '{timestamp_column}' (--timestamp-column)"
            )
        for group in self.groups:
            missing = [k for k in group.key_columns if k not in source.columns]
            if missing:
                views = ", ".join(p.name for p in group.views)
                raise TrainingSetError(
                    f"the labels lack join key column(s) {', '.join(missing)} of entity "
                    f"'{group.entity.name}' ({views})"
                )
        if workers < 1:
            raise TrainingSetError("workers must be at least 1")
        self.source = source
        self.session = session
        self.refs = refs
        self.services = services
        self.timestamp_column = timestamp_column
        self.as_of_arrival = as_of_arrival
        self.workers = workers
        self.report = report
        self.columns = sorted(
            (f for g in self.groups for p in g.views for f in p.features), key=lambda f: f.position
        )
        self.summary = TrainingSetSummary(source.num_rows, [f.column for f in self.columns], 0.0)

    def output_names(self, status_columns: bool) -> list[str]:
        values = [f.column for f in self.columns]
        return values + ([f.status_column for f in self.columns] if status_columns else [])

    def output_schema(self, names: list[str]) -> pa.Schema:
        types = {f.column: ARROW_TYPES[f.output_type] for f in self.columns}
        return pa.schema([pa.field(n, types.get(n, STATUS_TYPE)) for n in names])

    def compute(self, spill: SpillDir) -> None:
        self.report.start(self.source.num_rows * len(self.groups), "training set")
        column = self.source.read_columns([self.timestamp_column])[self.timestamp_column]
        times = read_times_ms(column, self.timestamp_column)
        del column
        for index, group in enumerate(self.groups):
            self._group(index, group, times, spill)

    def _group(self, index: int, group: ViewGroup, times: np.ndarray, spill: SpillDir) -> None:
        joined = self.source.read_columns(list(group.key_columns))
        keys = [key_array(joined[k], k, t) for k, t in zip(group.key_columns, group.key_types, strict=True)]
        del joined
        labels, unkeyed = GroupLabels.of(keys, times)
        del keys
        outputs = [f for p in group.views for f in p.features]
        schema = output_schema(outputs)
        counts = self.summary.statuses
        if len(unkeyed):
            writer = spill.writer(index, "unkeyed", schema)
            emit_missing(writer, unkeyed, outputs, counts)
            writer.close()
            self.report.advance(len(unkeyed))
        has_archive = archive_exists(self.session.conn, group)
        if not has_archive:
            self.report.note(
                f"no archived events of source '{group.source.name}' yet: its features are MISSING"
            )
        parts = labels.split(self.workers) if self.workers > 1 else [labels]
        if len(parts) <= 1:
            writer = spill.writer(index, "w0", schema)
            conn = self.session.conn if has_archive else None
            compute(
                conn,
                group,
                labels,
                writer,
                as_of_arrival=self.as_of_arrival,
                counts=counts,
                advance=self.report.advance,
            )
            writer.close()
            return
        from featurestream.offline import workers

        tasks = [
            workers.Task(
                part=f"w{i}",
                url=self.session.url,
                snapshot=self.session.snapshot,
                refs=self.refs,
                services=self.services,
                taken=self.source.columns,
                group=index,
                as_of_arrival=self.as_of_arrival,
                has_archive=has_archive,
                labels=part,
                root=spill.root,
                bucket_rows=spill.bucket_rows,
                buckets=spill.buckets,
            )
            for i, part in enumerate(parts)
        ]
        del labels, parts
        for worker_counts in workers.run(tasks, self.report.advance):
            for name, tally in worker_counts.items():
                mine = counts.setdefault(name, dict.fromkeys(STATUSES, 0))
                for status, n in tally.items():
                    mine[status] += n


# ------------------------------------------------------------------ output


def _write(
    source: LabelSource, spill: SpillDir, groups: int, names: list[str], features: pa.Schema, out_path: Path
) -> None:
    writer: TrainingWriter | None = None
    try:
        for bucket, inputs in enumerate(_rechunk(source.batches(), spill.bucket_rows)):
            computed = spill.bucket(bucket, groups)
            if inputs.num_rows != computed.num_rows:
                raise RuntimeError(
                    f"the labels changed while being read ({inputs.num_rows} != {computed.num_rows})"
                )
            table = inputs
            for name in names:
                table = table.append_column(features.field(name), computed[name])
            if writer is None:
                writer = TrainingWriter(out_path, table.schema)
            writer.write(table)
        if writer is None:  # no rows at all: still a file with the columns
            empty = pa.schema([*source.read_columns(source.columns).schema, *features])
            writer = TrainingWriter(out_path, empty)
            writer.write(empty.empty_table())
    finally:
        if writer is not None:
            writer.close()


def _rechunk(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``rows`` rows (the last one shorter) from batches of any size."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        held.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(held)
            yield table.slice(0, rows).combine_chunks()
            rest = table.slice(rows)
            held = rest.to_batches()
            count = rest.num_rows
    if count:
        yield pa.Table.from_batches(held).combine_chunks()


def _to_pandas(column: pa.ChunkedArray, index: pd.Index) -> pd.Series:
    """Nullable pandas dtypes, so an integer feature with nulls stays integer."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        return pd.Series(pd.Categorical(column.to_pandas(), categories=list(STATUSES)), index=index)
    if pa.types.is_integer(kind):
        values = column.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    elif pa.types.is_boolean(kind):
        values = column.to_pandas(types_mapper={pa.bool_(): pd.BooleanDtype()}.get)
    else:
        values = column.to_pandas()
    return pd.Series(values.array, index=index)
