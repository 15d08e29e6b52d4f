"""Label rows in and training rows out: CSV or Parquet files, or a pandas DataFrame.

A ``LabelSource`` gives two things: the columns the join needs (entity keys, read times) for
every row, read once, and then the labels' own rows again in their order, in batches, to be
written out beside the feature columns. Input columns are never converted on the way through:
Parquet columns keep their types, CSV fields their text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from featurestream.offline.features import TrainingSetError

READ_BATCH = 65_536
_NS_PER_MS = 1_000_000


class LabelSource(Protocol):
    columns: list[str]
    num_rows: int

    def read_columns(self, names: Sequence[str]) -> pa.Table:
        """Just these columns, every row (for the join: keys and timestamps)."""

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Every column, rows in input order."""


def file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    raise TrainingSetError(f"{path}: unknown file type (use .parquet or .csv)")


class ParquetLabels:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = pq.ParquetFile(path)
        self.columns = list(self._file.schema_arrow.names)
        self.num_rows = self._file.metadata.num_rows

    def read_columns(self, names: Sequence[str]) -> pa.Table:
        return pa.concat_tables(
            [pa.Table.from_batches([b]) for b in self._file.iter_batches(READ_BATCH, columns=list(names))]
            or [self._file.schema_arrow.empty_table().select(list(names))]
        )

    def batches(self) -> Iterator[pa.RecordBatch]:
        yield from pq.ParquetFile(self.path).iter_batches(READ_BATCH)


class CsvLabels:
    """Every field read as text, so the output repeats it exactly (``007`` stays ``007``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=1 << 16),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
        ) as reader:
            self.columns = list(reader.schema.names)
        if len(set(self.columns)) != len(self.columns):
            raise TrainingSetError(f"{path}: duplicate column names in the header")
        self.num_rows = sum(b.num_rows for b in self._reader(self.columns[:1]))

    def _reader(self, names: Sequence[str]) -> Iterator[pa.RecordBatch]:
        convert = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in self.columns},
            include_columns=list(names),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        with pacsv.open_csv(
            self.path,
            read_options=pacsv.ReadOptions(block_size=1 << 22),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=convert,
        ) as reader:
            yield from reader

    def read_columns(self, names: Sequence[str]) -> pa.Table:
        batches = list(self._reader(names))
        if not batches:
            return pa.table({n: pa.array([], pa.string()) for n in names})
        return pa.Table.from_batches(batches)

    def batches(self) -> Iterator[pa.RecordBatch]:
        yield from self._reader(self.columns)


class FrameLabels:
    """A DataFrame given to the Python API; only the join columns are converted."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.columns = [str(c) for c in frame.columns]
        self.num_rows = len(frame)

    def read_columns(self, names: Sequence[str]) -> pa.Table:
        arrays = []
        for name in names:
            column = self.frame[name]
            if isinstance(column, pd.DataFrame):
                raise TrainingSetError(f"the labels have several columns named '{name}'")
            try:
                arrays.append(pa.array(column, from_pandas=True))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise TrainingSetError(f"column '{name}': mixed or unsupported values ({exc})") from None
        return pa.table(arrays, names=list(names))

    def batches(self) -> Iterator[pa.RecordBatch]:  # pragma: no cover - the frame is assembled in place
        raise NotImplementedError


def open_labels(path: Path) -> LabelSource:
    if not path.is_file():
        raise TrainingSetError(f"{path}: no such file")
    return ParquetLabels(path) if file_format(path) == "parquet" else CsvLabels(path)


# ------------------------------------------------------------------ join columns


def read_times_ms(column: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    """Epoch milliseconds (floored) of a timestamp column: Arrow timestamps (naive = UTC), dates,
    integers (epoch ms) or ISO-8601 text. Nulls are refused."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        first = int(np.flatnonzero(np.asarray(array.is_null()))[0])
        raise TrainingSetError(
            f"column '{name}': {array.null_count} row(s) without a timestamp (first: row {first})"
        )
    kind = array.type
    if pa.types.is_dictionary(kind):
        array = array.dictionary_decode()
        kind = array.type
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        if pa.types.is_date(kind):
            array = pc.cast(array, pa.timestamp("ms"))
        values = np.asarray(array.view(pa.int64()))  # epoch values in the column's unit, UTC
        unit = array.type.unit
        return values * 1000 if unit == "s" else values // {"ms": 1, "us": 1000, "ns": _NS_PER_MS}[unit]
    if pa.types.is_integer(kind):
        return np.asarray(pc.cast(array, pa.int64()))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = array.to_pandas()
        try:
            parsed = pd.to_datetime(text, utc=True, format="ISO8601")
        except (ValueError, TypeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TrainingSetError(f"column '{name}': not an ISO-8601 timestamp ({reason})") from None
        nanos: np.ndarray = parsed.to_numpy(dtype="datetime64[ns]").astype(np.int64)
        return nanos // _NS_PER_MS
    raise TrainingSetError(f"column '{name}': expected timestamps, got {kind}")


def key_array(column: pa.ChunkedArray | pa.Array, name: str, key_type: str) -> pa.Array:
    """A join key column as the entity declares it (string or int64); nulls stay null."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    target = pa.int64() if key_type == "int64" else pa.string()
    if array.type == target:
        return array
    if pa.types.is_null(array.type):
        return pa.nulls(len(array), target)
    try:
        if key_type == "int64" and (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            array = pc.utf8_trim_whitespace(array)
        return pc.cast(array, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TrainingSetError(f"column '{name}': not usable as a {key_type} join key ({exc})") from None


# ------------------------------------------------------------------ output


class TrainingWriter:
    """Writes Parquet or CSV by the output path's extension, batch by batch."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.format = file_format(path)
        self._writer: Any
        if self.format == "parquet":
            self.schema = schema
            self._writer = pq.ParquetWriter(path, schema)
        else:
            self.schema = pa.schema([_csv_field(f) for f in schema])
            self._writer = pacsv.CSVWriter(path, self.schema)

    @staticmethod
    def check_path(path: Path) -> None:
        """Refuse a bad output path before any work is done."""
        file_format(path)
        if not path.parent.is_dir():
            raise TrainingSetError(f"{path}: directory {path.parent} does not exist")

    def write(self, table: pa.Table) -> None:
        if self.format == "csv":
            table = table.cast(self.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()


def _csv_field(field: pa.Field) -> pa.Field:
    if pa.types.is_dictionary(field.type):
        return pa.field(field.name, field.type.value_type)
    return field
