"""Feature rows computed in entity order, put back in label order through files on disk.

Rows are computed sorted by (entity, time) but must come out in the labels' order. Each block
of computed rows is split by input row number into *buckets* of consecutive input rows and
appended to that bucket's Arrow IPC file (one file per view group, worker and bucket). After
the computation each bucket is read alone, sorted by row number (the files of one group hold
every row of the bucket's range exactly once) and written out beside the same range of input
rows. Memory: one block while computing, one bucket while assembling.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROW_INDEX = "__row"
MIN_BUCKET_ROWS = 262_144
MAX_BUCKETS = 64


class SpillDir:
    """The temporary directory of one run and how rows map to buckets."""

    def __init__(self, num_rows: int, directory: Path | None = None) -> None:
        self.num_rows = num_rows
        self.bucket_rows = max(MIN_BUCKET_ROWS, -(-num_rows // MAX_BUCKETS))
        self.buckets = max(1, -(-num_rows // self.bucket_rows))
        self._tmp = tempfile.TemporaryDirectory(prefix="featurestream-training-", dir=directory)
        self.root = Path(self._tmp.name)

    def __enter__(self) -> SpillDir:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def writer(self, group: int, part: str, schema: pa.Schema) -> SpillWriter:
        return SpillWriter(self.root, group, part, self.bucket_rows, self.buckets, schema)

    def bucket(self, bucket: int, groups: int) -> pa.Table:
        """Every group's columns for the input rows of ``bucket``, in input row order."""
        start = bucket * self.bucket_rows
        expected = min(self.bucket_rows, self.num_rows - start)
        columns: list[pa.ChunkedArray] = []
        names: list[str] = []
        for group in range(groups):
            pieces = []
            for path in sorted(self.root.glob(f"g{group}_*_b{bucket}.arrow")):
                with pa.ipc.open_stream(path) as reader:
                    pieces.append(reader.read_all())
            table = pa.concat_tables(pieces)
            if table.num_rows != expected:
                raise RuntimeError(
                    f"bucket {bucket} of group {group}: {table.num_rows} rows, expected {expected}"
                )
            table = table.take(pc.sort_indices(table[ROW_INDEX]))
            columns.extend(table.columns[1:])
            names.extend(table.column_names[1:])
        return pa.table(columns, names=names)

    def close(self) -> None:
        self._tmp.cleanup()


class SpillWriter:
    """Appends computed rows of one view group (from one worker) to the bucket files.

    Constructible in any process from plain values, so parallel workers write their own files.
    """

    def __init__(
        self, root: Path, group: int, part: str, bucket_rows: int, buckets: int, schema: pa.Schema
    ) -> None:
        self.root = root
        self.group = group
        self.part = part
        self.bucket_rows = bucket_rows
        self.schema = pa.schema([pa.field(ROW_INDEX, pa.int64()), *schema])
        self._writers: list[pa.ipc.RecordBatchStreamWriter | None] = [None] * buckets

    def add(self, rows: np.ndarray, batch: pa.RecordBatch) -> None:
        """Computed values for input rows ``rows``."""
        bucket_of = rows // self.bucket_rows
        order = np.argsort(bucket_of, kind="stable")
        cuts = np.flatnonzero(np.diff(bucket_of[order])) + 1
        full = pa.RecordBatch.from_arrays([pa.array(rows, pa.int64()), *batch.columns], schema=self.schema)
        for piece in np.split(order, cuts):
            if not len(piece):
                continue
            bucket = int(bucket_of[piece[0]])
            writer = self._writers[bucket]
            if writer is None:
                path = self.root / f"g{self.group}_{self.part}_b{bucket}.arrow"
                writer = self._writers[bucket] = pa.ipc.new_stream(path, self.schema)
            writer.write_batch(full.take(pa.array(piece)))

    def close(self) -> None:
        """Every bucket gets a file, empty if no row of this writer falls in it."""
        for bucket, writer in enumerate(self._writers):
            if writer is None:
                path = self.root / f"g{self.group}_{self.part}_b{bucket}.arrow"
                writer = pa.ipc.new_stream(path, self.schema)
            writer.close()
        self._writers = []
