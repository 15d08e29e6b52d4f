"""Aggregators: prepare / update / merge / finalize over a flat intermediate representation.

An IR is a short tuple of *slots* (codes in ``codec.py``). Tiles store the IRs of several
features side by side in one flat row, so the hot paths work on rows in place:
``update(row, offset, ...)`` folds one value into the slots at ``offset``, and
``merge_columns`` merges many tiles at once from per-slot columns (mostly C-level ``sum`` /
``min`` / ``max`` over the tiles). ``merge`` and ``prepare`` are derived from those two.

Nulls are skipped by every aggregator; a field-less count is fed ``True`` for every event.
Merges are associative and commutative: first/last keep (event time, sequence, value) and take
the min/max of that triple, so ties never depend on merge order.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from itertools import compress
from typing import Any, ClassVar

from featurestream.aggregation.codec import RowCodec
from featurestream.aggregation.distinct import DistinctSet, value_hash

IR = tuple[Any, ...]
Column = Sequence[Any]


_VALUE_CODES = {"int64": "q", "float64": "d", "bool": "?", "timestamp": "q", "string": "S"}
_ZERO: dict[str, Any] = {"q": 0, "d": 0.0, "?": False, "S": "", "H": None}


def value_code(input_type: str) -> str:
    """Slot code holding a raw value of ``input_type`` (timestamps as epoch microseconds)."""
    return _VALUE_CODES[input_type]


class Aggregator(ABC):
    """One aggregation over one input type. ``slots`` names the IR layout, one code per slot."""

    kind: ClassVar[str]
    slots: str

    def __init__(self, input_type: str | None) -> None:
        self.input_type = input_type
        self.slots = self._layout(value_code(input_type) if input_type else "q")
        self.width = len(self.slots)
        self._identity: IR = tuple(_ZERO[c] for c in self.slots)
        self._codec: RowCodec | None = None

    @abstractmethod
    def _layout(self, value_code: str) -> str: ...

    @abstractmethod
    def update(self, row: list[Any], o: int, value: Any, t: int, seq: int) -> None:
        """Fold one value (event time ``t`` ms, tie-break ``seq``) into ``row[o:o+width]``."""

    @abstractmethod
    def merge_columns(self, cols: Sequence[Column]) -> IR:
        """Merge many IRs given as ``width`` columns (column k = slot k of every IR)."""

    @abstractmethod
    def finalize(self, ir: IR) -> Any:
        """The value of an IR: timestamps as epoch microseconds, ``None`` when undefined."""

    def identity(self) -> IR:
        """The IR of no events (the merge identity)."""
        return self._identity

    def prepare(self, value: Any, t: int = 0, seq: int = 0) -> IR:
        row = list(self._identity)
        self.update(row, 0, value, t, seq)
        return tuple(row)

    def merge(self, a: IR, b: IR) -> IR:
        """Merge two IRs without mutating either."""
        return self.merge_columns(list(zip(a, b, strict=True)))

    def encode(self, ir: IR) -> bytes:
        return self.codec.encode(ir)

    def decode(self, raw: bytes) -> IR:
        return tuple(self.codec.decode_all(raw))

    @property
    def codec(self) -> RowCodec:
        if self._codec is None:
            self._codec = RowCodec(self.slots)
        return self._codec


class Count(Aggregator):
    kind = "count"

    def _layout(self, value_code: str) -> str:
        return "q"

    def update(self, row: list[Any], o: int, value: Any, t: int, seq: int) -> None:
        if value is not None:
            row[o] += 1

    def merge_columns(self, cols: Sequence[Column]) -> IR:
        return (sum(cols[0]),)

    def finalize(self, ir: IR) -> Any:
        return ir[0]


def _total(code: str, col: Column) -> Any:
    # fsum: exactly rounded, so merging tiles adds no error of its own
    return math.fsum(col) if code == "d" else sum(col)


class Sum(Aggregator):
    kind = "sum"

    def _layout(self, value_code: str) -> str:
        return value_code

    def update(self, row: list[Any], o: int, value: Any, t: int, seq: int) -> None:
        if value is not None:
            row[o] += value

    def merge_columns(self, cols: Sequence[Column]) -> IR:
        return (_total(self.slots, cols[0]),)

    def finalize(self, ir: IR) -> Any:
        return ir[0]


class Mean(Aggregator):
    """IR (count, sum); the sum of int64 inputs stays an exact integer."""

    kind = "mean"

    def _layout(self, value_code: str) -> str:
        return "q" + value_code

    def update(self, row: list[Any], o: int, value: Any, t: int, seq: int) -> None:
        if value is not None:
            row[o] += 1
            row[o + 1] += value

    def merge_columns(self, cols: Sequence[Column]) -> IR:
        return sum(cols[0]), _total(self.slots[1], cols[1])

    def finalize(self, ir: IR) -> Any:
        return ir[1] / ir[0] if ir[0] else None


class Stddev(Aggregator):
    """Sample standard deviation (n - 1, like SQL stddev_samp); IR (count, mean, M2) by Welford."""

    kind = "stddev"

    def _layout(self, value_code: str) -> str:
        return "qdd"

    def update(self, row: list[Any], o: int, value: Any, t: int, seq: int) -> None:
        if value is None:
            return
        n = row[o] + 1
        mean = row[o + 1]
        delta = value - mean
        mean += delta / n
        row[o] = n
        row[o + 1] = mean
        row[o + 2] += delta * (value - mean)

    def merge_columns(self, cols: Sequence[Column]) -> IR:
        n, mean, m2 = 0, 0.0, 0.0
        for nb, mb, m2b in zip(*cols, strict=True):
            if not nb:
                continue
            if not n:
                n, mean, m2 = nb, mb, m2b
                continue
            # Chan et al.: combine two (count, mean, M2) partials without cancellation
            total = n + nb
            delta = mb - mean
            mean += delta * nb / total
            m2 += m2b + delta * delta * n * nb / total
            n = total
        return n, float(mean), float(m2)

    def finalize(self, ir: IR) -> Any:
        n, _, m2 = ir
        return math.sqrt(max(m2, 0.0) / (n - 1)) if n >= 2 else None


class Min(Aggregator):
    """IR (present, value)."""

    kind = "min"

    def _layout(self, value_code: str) -> str:
        return "?" + value_code

    def update(self, row: list[Any], o: int, value: Any, t: int, seq: int) -> None:
        if value is not None and (not row[o] or value < row[o + 1]):
            row[o] = True
            row[o + 1] = value

    def merge_columns(self, cols: Sequence[Column]) -> IR:
        best = min(compress(cols[1], cols[0]), default=None)
        return self._identity if best is None else (True, best)

    def finalize(self, ir: IR) -> Any:
        return ir[1] if ir[0] else None


class Max(Min):
    kind = "max"

    def update(self, row: list[Any], o: int, value: Any, t: int, seq: int) -> None:
        if value is not None and (not row[o] or value > row[o + 1]):
            row[o] = True
            row[o + 1] = value

    def merge_columns(self, cols: Sequence[Column]) -> IR:
        best = max(compress(cols[1], cols[0]), default=None)
        return self._identity if best is None else (True, best)


class First(Aggregator):
    """IR (present, event time, sequence, value): the least (time, seq, value) wins."""

    kind = "first"

    def _layout(self, value_code: str) -> str:
        return "?qq" + value_code

    def update(self, row: list[Any], o: int, value: Any, t: int, seq: int) -> None:
        if value is None:
            return
        if row[o]:
            held = row[o + 1]
            if t > held or (t == held and (seq, value) >= (row[o + 2], row[o + 3])):
                return
        row[o : o + 4] = (True, t, seq, value)

    def merge_columns(self, cols: Sequence[Column]) -> IR:
        best = min(compress(zip(cols[1], cols[2], cols[3], strict=True), cols[0]), default=None)
        return self._identity if best is None else (True, *best)

    def finalize(self, ir: IR) -> Any:
        return ir[3] if ir[0] else None


class Last(First):
    """The greatest (time, seq, value) wins: at equal event times the later sequence (offset)."""

    kind = "last"

    def update(self, row: list[Any], o: int, value: Any, t: int, seq: int) -> None:
        if value is None:
            return
        if row[o]:
            held = row[o + 1]
            if t < held or (t == held and (seq, value) <= (row[o + 2], row[o + 3])):
                return
        row[o : o + 4] = (True, t, seq, value)

    def merge_columns(self, cols: Sequence[Column]) -> IR:
        best = max(compress(zip(cols[1], cols[2], cols[3], strict=True), cols[0]), default=None)
        return self._identity if best is None else (True, *best)


class ApproxCountDistinct(Aggregator):
    """IR (``DistinctSet`` or None): exact up to 512 distinct values, HyperLogLog beyond, the
    same whatever the merge order (``distinct.py``). ``update`` mutates the set it holds;
    merges build new ones."""

    kind = "approx_count_distinct"

    def _layout(self, value_code: str) -> str:
        return "H"

    def update(self, row: list[Any], o: int, value: Any, t: int, seq: int) -> None:
        if value is None:
            return
        held = row[o]
        if held is None:
            held = row[o] = DistinctSet()
        held.add(value_hash(value))

    def merge_columns(self, cols: Sequence[Column]) -> IR:
        return (DistinctSet.union(cols[0]),)

    def finalize(self, ir: IR) -> Any:
        return 0 if ir[0] is None else round(ir[0].estimate())


AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.kind: cls for cls in (Count, Sum, Mean, Stddev, Min, Max, First, Last, ApproxCountDistinct)
}


def make_aggregator(kind: str, input_type: str | None) -> Aggregator:
    """The aggregator for ``kind`` over ``input_type`` (``None`` only for a field-less count)."""
    try:
        cls = AGGREGATORS[kind]
    except KeyError:
        raise ValueError(f"unknown aggregation {kind!r}") from None
    if input_type is None and kind != "count":
        raise ValueError(f"aggregation {kind!r} needs an input field")
    return cls(input_type)
