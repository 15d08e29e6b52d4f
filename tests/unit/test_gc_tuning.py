"""FrozenHeap: survivors leave the collector's sight, and a full collection still comes."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from featurestream import gc_tuning
from featurestream.gc_tuning import FrozenHeap


class Node:
    other: Node | None = None


@pytest.fixture(autouse=True)
def _unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_settle_takes_survivors_out_of_collections() -> None:
    heap = FrozenHeap(600)
    survivor = Node()
    assert gc.is_tracked(survivor)
    assert any(o is survivor for o in gc.get_objects())
    heap.settle()
    assert gc.get_freeze_count() > 0
    assert not any(o is survivor for o in gc.get_objects())


def test_a_frozen_cycle_is_freed_by_the_next_full_collection() -> None:
    now = [0.0]
    heap = FrozenHeap(600, clock=lambda: now[0])
    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    heap.settle()
    del a, b
    gc.collect()
    assert ref() is not None, "a frozen cycle is not collected"
    now[0] = 599.0
    heap.settle()
    assert ref() is not None, "no full collection before the interval"
    now[0] = 600.0
    heap.settle()
    assert ref() is None


def test_requests_settle_the_heap_only_once_tuned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc_tuning, "_tuned", False)
    gc.unfreeze()
    gc_tuning.settle_after_request()
    assert gc.get_freeze_count() == 0, "an untuned process (a test, an embedding app) keeps its collector"
    previous = gc_tuning.tune_gc()
    try:
        gc.unfreeze()
        gc_tuning.settle_after_request()
        assert gc.get_freeze_count() > 0
    finally:
        gc.set_threshold(*previous)
