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


def tune_gc(young: int = 50_000, middle: int = 20, old: int = 100) -> tuple[int, int, int]:
    """Call once start-up is done: moves what start-up allocated (definitions, snapshots, modules)
    out of the collector's reach (``gc.freeze``) and makes collections rarer, so full passes over
    long-lived objects stop landing in request tails. Returns the previous thresholds."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, middle, old)
    return previous
