"""A bounded memo that keeps what was used recently: two generations, a cheap LRU.

Lookups hit the young generation, or move an entry up from the old one; when the young one is
full it becomes the old one, and what was not used since is dropped with the previous old one.
Between ``size`` and twice as many entries are kept. Dict operations only, so threads may share
it (an unlucky race forgets an entry; it never returns a wrong one).
"""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Generations(Generic[K, V]):
    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self._young: dict[K, V] = {}
        self._old: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        value = self._young.get(key)
        if value is None:
            value = self._old.pop(key, None)
            if value is not None:
                self.put(key, value)
        return value

    def put(self, key: K, value: V) -> None:
        self._old.pop(key, None)
        if len(self._young) >= self.size:
            self._old, self._young = self._young, {}
        self._young[key] = value

    def clear(self) -> None:
        self._young, self._old = {}, {}
