"""Keep CPython's cyclic garbage collector off long-lived objects: the worker's entity states
(``FrozenHeap``, after every batch) and the server's start-up state (``tune_gc``, once).

A full (generation 2) collection scans every tracked object. With the worker's entity states
in memory that took 50-180 ms per collection here, and nothing was ever collected: the states
hold no reference cycles, reference counting frees them. Those pauses were the freshness tail.
``gc.freeze`` moves the objects alive now out of the collector's sight (reference counting
still frees them), so collections scan only what is new since.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

FULL_COLLECT_EVERY_S = 600.0
"""Frozen objects that end up in a cycle are freed only by a full collection of everything:
one such pause every ten minutes instead of one every few seconds."""


class FrozenHeap:
    def __init__(self, full_collect_every_s: float = FULL_COLLECT_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.full_collect_every_s = full_collect_every_s
        self.clock = clock
        self._last_full = clock()

    def settle(self) -> None:
        """Call between units of work (a batch): what survived it is frozen."""
        now = self.clock()
        if now - self._last_full >= self.full_collect_every_s:
            gc.unfreeze()
            gc.collect()
            self._last_full = now
        gc.freeze()


_process_heap = FrozenHeap()
_tuned = False


def settle() -> None:
    """``FrozenHeap.settle`` for this process's one heap (the worker calls it after each batch)."""
    _process_heap.settle()


def settle_after_request() -> None:
    """Servers call this after each request: it settles the heap once ``tune_gc`` was called
    (``featurestream serve`` does), and does nothing otherwise (tests, embedding code)."""
    if _tuned:
        _process_heap.settle()


def tune_gc(young: int = 50_000, middle: int = 20, old: int = 100) -> tuple[int, int, int]:
    """Call once start-up is done: moves what start-up allocated (definitions, snapshots, modules)
    out of the collector's reach (``gc.freeze``) and makes collections rarer; from then on each
    request's survivors (the read memo's entries) are frozen too (``settle_after_request``), so
    full passes over long-lived objects stop landing in request tails. Returns the previous
    thresholds."""
    global _tuned
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, middle, old)
    _tuned = True
    return previous
