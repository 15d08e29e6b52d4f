"""Feature history out to files and back: Parquet, CSV (pyarrow) and Avro (fastavro).

The file schema comes from the definitions, not from the table: the entity's join keys (their
declared types), ``event_time`` (timestamp-millis, UTC), ``kafka_partition`` (int32),
``kafka_offset`` (int64), then one nullable column per feature of the view, typed by the
feature's dtype (timestamps as timestamp-millis, UTC). Rows come out ordered by entity, time,
partition and offset.

Import validates every row on its own (join keys present and typed, event time, partition and
offset, each feature's type) and stores the good rows (idempotently: a row already stored is
left as it is); bad rows are reported with their row number (data rows counted from 1) and the
reason. A file whose columns do not fit the view (a join key or ``event_time`` missing, a column
that is not a feature of the view) is refused as a whole. Without ``kafka_partition`` and
``kafka_offset`` columns (history computed elsewhere) rows get partition -1 and their row
number as offset, so importing the same file twice stores nothing twice. In CSV an empty
unquoted field is null and ``""`` is the empty string.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import fastavro
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from psycopg import sql

from featurestream.aggregation.windows import from_millis
from featurestream.definitions.types import parse_timestamp
from featurestream.offline.rebuild import OfflineError, OfflineView, Progress, time_filter
from featurestream.storage.offline.base import FeatureRow
from featurestream.storage.offline.layout import qualified, table_exists, table_name
from featurestream.storage.offline.postgres import PostgresOfflineStore

Format = Literal["parquet", "avro", "csv"]
FORMATS: tuple[Format, ...] = ("parquet", "avro", "csv")
FIXED = ("event_time", "kafka_partition", "kafka_offset")
BATCH_ROWS = 20_000
INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)

_ARROW = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("ms", tz="UTC"),
}
_AVRO: dict[str, Any] = {
    "string": "string",
    "int64": "long",
    "float64": "double",
    "bool": "boolean",
    "timestamp": {"type": "long", "logicalType": "timestamp-millis"},
}


def format_of(path: Path, given: str | None) -> Format:
    """``--format`` if given, else from the file name's extension."""
    text = (given or path.suffix.lstrip(".")).lower()
    text = {"pq": "parquet", "parq": "parquet"}.get(text, text)
    for known in FORMATS:
        if text == known:
            return known
    raise OfflineError(f"{path}: cannot tell the format from the name; pass --format ({', '.join(FORMATS)})")


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str
    nullable: bool


def history_columns(view: OfflineView) -> list[Column]:
    """The file's columns, in order, from the definitions."""
    types = view.dtypes()
    return [
        *[Column(k, types[k], False) for k in view.key_fields],
        Column("event_time", "timestamp", False),
        Column("kafka_partition", "int32", False),
        Column("kafka_offset", "int64", False),
        *[Column(f.name, types[f.name], True) for f in view.runtime.view.features],
    ]


def arrow_schema(view: OfflineView) -> pa.Schema:
    return pa.schema(
        [pa.field(c.name, pa.int32() if c.dtype == "int32" else _ARROW[c.dtype], nullable=c.nullable)
         for c in history_columns(view)]
    )  # fmt: skip


def avro_schema(view: OfflineView) -> dict[str, Any]:
    fields = []
    for c in history_columns(view):
        kind = "int" if c.dtype == "int32" else _AVRO[c.dtype]
        fields.append({"name": c.name, "type": ["null", kind], "default": None} if c.nullable
                      else {"name": c.name, "type": kind})
    return {
        "type": "record",
        "name": f"{view.name}_v{view.version}",
        "namespace": "featurestream.history",
        "doc": f"Feature history of {view.ref} (project {view.project or '-'})",
        "fields": fields,
    }


# ---------------------------------------------------------------- export


@dataclass
class ExportStats:
    view: str
    version: int
    path: str
    format: str
    rows: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"view": self.view, "version": self.version, "path": self.path, "format": self.format,
                "rows": self.rows, "seconds": round(self.seconds, 3)}


def history_table(view: OfflineView) -> str:
    return f"fs_offline.{table_name('hist', view.name, view.version)}"


def count_history(store: PostgresOfflineStore, view: OfflineView, start_ms: int | None, end_ms: int | None) -> int:
    where, params = time_filter((), start_ms, end_ms)
    query = sql.SQL("select count(*) from {} where {}").format(
        qualified(table_name("hist", view.name, view.version)), where
    )
    row = store.connection.execute(query, params).fetchone()
    return int(row[0]) if row else 0


def require_history(store: PostgresOfflineStore, view: OfflineView) -> None:
    if not table_exists(store.connection, table_name("hist", view.name, view.version)):
        raise OfflineError(
            f"no feature history for {view.ref} ({history_table(view)} does not exist): "
            f"run 'featurestream backfill {view.ref}' or the worker first"
        )


def read_history(
    store: PostgresOfflineStore, view: OfflineView, start_ms: int | None, end_ms: int | None
) -> Iterator[list[list[Any]]]:
    """Batches of column lists (timestamps as epoch ms), ordered by entity, time, partition, offset."""
    columns = history_columns(view)
    select = [
        sql.SQL("(extract(epoch from {}) * 1000)::bigint").format(sql.Identifier(c.name))
        if c.dtype == "timestamp" else sql.Identifier(c.name)
        for c in columns
    ]  # fmt: skip
    order = sql.SQL(", ").join(map(sql.Identifier, [*view.key_fields, *FIXED]))
    where, params = time_filter((), start_ms, end_ms)
    query = sql.SQL("select {} from {} where {} order by {}").format(
        sql.SQL(", ").join(select), qualified(table_name("hist", view.name, view.version)), where, order
    )
    conn = store.connection
    with conn.transaction(), conn.cursor(name=f"export_{view.name}_{view.version}") as cursor:
        cursor.itersize = BATCH_ROWS
        cursor.execute(query, params)
        while True:
            rows = cursor.fetchmany(BATCH_ROWS)
            if not rows:
                return
            yield [list(col) for col in zip(*rows, strict=True)]


def export_history(
    view: OfflineView,
    store: PostgresOfflineStore,
    path: Path,
    fmt: Format,
    *,
    start_ms: int | None = None,
    end_ms: int | None = None,
    progress: Progress | None = None,
) -> ExportStats:
    """Write the view version's history rows in [start_ms, end_ms] to ``path``."""
    require_history(store, view)
    started = time.perf_counter()
    stats = ExportStats(view.name, view.version, str(path), fmt)
    batches = read_history(store, view, start_ms, end_ms)
    tmp = path.with_name(path.name + ".part")
    try:
        if fmt == "avro":
            stats.rows = _write_avro(view, batches, tmp, progress)
        else:
            stats.rows = _write_arrow(view, batches, tmp, fmt, progress)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    stats.seconds = time.perf_counter() - started
    return stats


def _arrow_batch(schema: pa.Schema, columns: list[list[Any]]) -> pa.RecordBatch:
    arrays = []
    for f, values in zip(schema, columns, strict=True):
        if pa.types.is_timestamp(f.type):
            arrays.append(pa.array(values, pa.int64()).cast(f.type))
        else:
            arrays.append(pa.array(values, f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _write_arrow(
    view: OfflineView, batches: Iterator[list[list[Any]]], path: Path, fmt: Format, progress: Progress | None
) -> int:
    schema = arrow_schema(view)
    rows = 0
    writer: Any
    if fmt == "parquet":
        metadata = {b"featurestream.view": view.ref.encode(), b"featurestream.project": view.project.encode()}
        writer = pq.ParquetWriter(path, schema.with_metadata(metadata), compression="zstd")
    else:
        writer = pacsv.CSVWriter(path, schema)
    with writer:
        for columns in batches:
            batch = _arrow_batch(schema, columns)
            writer.write_batch(batch)
            rows += batch.num_rows
            if progress is not None:
                progress(batch.num_rows)
        if rows == 0 and fmt == "parquet":
            writer.write_table(schema.empty_table())
    return rows


def _write_avro(view: OfflineView, batches: Iterator[list[list[Any]]], path: Path, progress: Progress | None) -> int:
    schema = fastavro.parse_schema(avro_schema(view))
    names = [c.name for c in history_columns(view)]
    count = [0]

    def records() -> Iterator[dict[str, Any]]:
        for columns in batches:
            n = len(columns[0])
            for i in range(n):
                yield {name: col[i] for name, col in zip(names, columns, strict=True)}
            count[0] += n
            if progress is not None:
                progress(n)

    with path.open("wb") as out:
        fastavro.writer(out, schema, records(), codec="deflate")
    return count[0]


# ---------------------------------------------------------------- import


@dataclass
class ImportStats:
    view: str
    version: int
    path: str
    format: str
    rows: int = 0
    imported: int = 0
    """Rows new to the table."""
    duplicates: int = 0
    """Good rows that were stored already."""
    rejected: list[tuple[int, str]] = field(default_factory=list)
    missing_features: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self, max_rejected: int = 10_000) -> dict[str, Any]:
        return {
            "view": self.view, "version": self.version, "path": self.path, "format": self.format,
            "rows": self.rows, "imported": self.imported, "duplicates": self.duplicates,
            "rejected": len(self.rejected),
            "rejected_rows": [{"row": n, "reason": r} for n, r in self.rejected[:max_rejected]],
            "missing_features": self.missing_features, "seconds": round(self.seconds, 3),
        }  # fmt: skip


class BadValue(ValueError):
    pass


def _int(value: Any, bounds: tuple[int, int], text: bool) -> int:
    if text and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise BadValue(f"{value[:40]!r} is not an integer") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadValue(f"expected an integer, got {type(value).__name__} {str(value)[:40]!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise BadValue(f"{value} is out of range")
    return value


def _float(value: Any, text: bool) -> float:
    if text and isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise BadValue(f"{value[:40]!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadValue(f"expected a number, got {type(value).__name__} {str(value)[:40]!r}")
    return float(value)


def _bool(value: Any, text: bool) -> bool:
    if text and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise BadValue(f"{value[:40]!r} is not true or false")
    if not isinstance(value, bool):
        raise BadValue(f"expected true or false, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _timestamp_ms(value: Any, text: bool) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise BadValue("a timestamp without a time zone")
        return parse_timestamp(value)
    if isinstance(value, bool):
        raise BadValue("expected a timestamp, got bool")
    if isinstance(value, int):
        return _int(value, INT64, False)
    if isinstance(value, str):
        stripped = value.strip()
        if text and stripped.lstrip("-").isdigit():
            return _int(stripped, INT64, True)
        try:
            return parse_timestamp(stripped, "iso8601")
        except ValueError as exc:
            raise BadValue(str(exc)) from None
    raise BadValue(f"expected a timestamp, got {type(value).__name__} {str(value)[:40]!r}")


def converter(dtype: str, text: bool) -> Callable[[Any], Any]:
    """Checks one non-null value of ``dtype`` and returns it as the history table stores it."""
    if dtype == "string":
        def string(value: Any) -> str:
            if not isinstance(value, str):
                raise BadValue(f"expected a string, got {type(value).__name__} {str(value)[:40]!r}")
            return value
        return string
    if dtype == "int64":
        return lambda value: _int(value, INT64, text)
    if dtype == "int32":
        return lambda value: _int(value, INT32, text)
    if dtype == "float64":
        return lambda value: _float(value, text)
    if dtype == "bool":
        return lambda value: _bool(value, text)
    if dtype == "timestamp":
        return lambda value: _timestamp_ms(value, text)
    raise ValueError(f"unknown type {dtype}")


class RowChecker:
    """Validates rows (dicts) of one file against the view; builds ``FeatureRow``s."""

    def __init__(self, view: OfflineView, names: list[str], text: bool) -> None:
        columns = {c.name: c for c in history_columns(view)}
        features = [f.name for f in view.runtime.view.features]
        unknown = [n for n in names if n not in columns]
        if unknown:
            raise OfflineError(
                f"column(s) {', '.join(unknown)} are not join keys or features of {view.ref} "
                f"(its features: {', '.join(features)})"
            )
        required = [*view.key_fields, "event_time"]
        absent = [n for n in required if n not in names]
        if absent:
            raise OfflineError(f"the file has no column {', '.join(absent)} (needed by {view.ref})")
        self.keys = [(k, converter(columns[k].dtype, text)) for k in view.key_fields]
        self.event_time = converter("timestamp", text)
        self.has_position = "kafka_partition" in names and "kafka_offset" in names
        self.partition = converter("int32", text)
        self.offset = converter("int64", text)
        self.features = [(n, converter(columns[n].dtype, text), columns[n].dtype) for n in features if n in names]
        self.missing_features = [n for n in features if n not in names]
        self.text = text

    def check(self, number: int, row: dict[str, Any]) -> FeatureRow:
        """A FeatureRow, or BadValue naming the column and the problem."""
        key = []
        for name, convert in self.keys:
            value = row.get(name)
            if value is None or (self.text and value == ""):
                raise BadValue(f"join key '{name}' is missing")
            key.append(self._convert(name, convert, value))
        when = row.get("event_time")
        if when is None:
            raise BadValue("event_time is missing")
        event_ms = self._convert("event_time", self.event_time, when)
        if self.has_position:
            partition, offset = row.get("kafka_partition"), row.get("kafka_offset")
            if partition is None or offset is None:
                raise BadValue("kafka_partition or kafka_offset is missing")
            partition = self._convert("kafka_partition", self.partition, partition)
            offset = self._convert("kafka_offset", self.offset, offset)
        else:
            partition, offset = -1, number
        values: dict[str, Any] = {}
        for name, convert, dtype in self.features:
            value = row.get(name)
            if value is None:
                values[name] = None
                continue
            converted = self._convert(name, convert, value)
            values[name] = from_millis(converted) if dtype == "timestamp" else converted
        return FeatureRow(tuple(key), event_ms, partition, offset, values)

    @staticmethod
    def _convert(name: str, convert: Callable[[Any], Any], value: Any) -> Any:
        try:
            return convert(value)
        except BadValue as exc:
            raise BadValue(f"{name}: {exc}") from None


Numbered = Iterator[tuple[int, dict[str, Any]]]


def _read_rows(path: Path, fmt: Format, refused: list[tuple[int, str]]) -> tuple[list[str], Numbered]:
    """Column names and (row number, row) pairs; CSV lines the parser itself cannot split go to
    ``refused`` as they are met (row numbers count data rows from 1, as in the other formats)."""
    if fmt == "parquet":
        parquet = pq.ParquetFile(path)

        def parquet_rows() -> Iterator[dict[str, Any]]:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
                yield from batch.to_pylist()

        return list(parquet.schema_arrow.names), enumerate(parquet_rows(), start=1)
    if fmt == "avro":
        with path.open("rb") as avro_file:
            schema = fastavro.reader(avro_file).writer_schema
        names = [f["name"] for f in schema.get("fields", [])] if isinstance(schema, dict) else []

        def avro_rows() -> Iterator[dict[str, Any]]:
            with path.open("rb") as handle:
                for record in fastavro.reader(handle):
                    yield record if isinstance(record, dict) else {}

        return names, enumerate(avro_rows(), start=1)
    with path.open(newline="", encoding="utf-8") as head:
        names = next(csv.reader(head), [])
    skipped: list[int] = []

    def on_invalid(row: Any) -> str:
        number = row.number - 1 if row.number is not None else -1  # line 1 is the header
        skipped.append(number)
        refused.append((number, f"the CSV line has {row.actual_columns} fields, not {row.expected_columns}"))
        return "skip"

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 22),
        parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=True, quoted_strings_can_be_null=False
        ),
    )

    def csv_rows() -> Numbered:
        number, seen = 0, 0
        for batch in reader:  # a block is parsed (and its bad lines reported) before it is yielded
            for row in batch.to_pylist():
                number += 1
                while seen < len(skipped) and skipped[seen] <= number:
                    if skipped[seen] == number:
                        number += 1
                    seen += 1
                yield number, row

    return names, csv_rows()


def import_history(
    view: OfflineView,
    store: PostgresOfflineStore,
    path: Path,
    fmt: Format,
    *,
    progress: Progress | None = None,
    batch_rows: int = 5_000,
) -> ImportStats:
    """Validate every row of ``path`` and store the good ones in the view version's history."""
    if not path.is_file():
        raise OfflineError(f"{path}: no such file")
    started = time.perf_counter()
    stats = ImportStats(view.name, view.version, str(path), fmt)
    refused: list[tuple[int, str]] = []
    try:
        names, rows = _read_rows(path, fmt, refused)
        checker = RowChecker(view, names, text=fmt == "csv")
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise OfflineError(f"{path}: cannot read it as {fmt}: {exc}") from None
    stats.missing_features = checker.missing_features
    store.ensure_view(view.runtime.view, view.version, view.key_fields, view.dtypes())
    pending: list[FeatureRow] = []
    last = 0
    try:
        for number, row in rows:
            last = number
            try:
                pending.append(checker.check(number, row))
            except BadValue as exc:
                stats.rejected.append((number, str(exc)))
            if len(pending) >= batch_rows:
                _store(store, view, pending, stats, progress)
    except (ValueError, pa.ArrowException) as exc:
        raise OfflineError(f"{path}: cannot read it as {fmt} after row {last}: {exc}") from None
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    _store(store, view, pending, stats, progress)
    stats.rows = max([last, *(n for n, _ in refused)])
    stats.rejected = sorted(stats.rejected + refused)
    stats.seconds = time.perf_counter() - started
    return stats


def _store(
    store: PostgresOfflineStore, view: OfflineView, pending: list[FeatureRow], stats: ImportStats,
    progress: Progress | None,
) -> None:
    if not pending:
        return
    new = store.write_feature_rows(view.runtime.view, view.version, pending)
    stats.imported += new
    stats.duplicates += len(pending) - new
    if progress is not None:
        progress(len(pending))
    pending.clear()
