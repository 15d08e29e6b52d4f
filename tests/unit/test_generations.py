"""The two-generation memo behind the codecs' row memo and the server's read memo."""

from __future__ import annotations

import pytest

from featurestream.generations import Generations


def test_keeps_what_was_used_recently_within_twice_its_size() -> None:
    memo: Generations[int, str] = Generations(3)
    for k in range(3):
        memo.put(k, f"v{k}")
    memo.put(3, "v3")  # the young generation (0, 1, 2) turns old
    assert memo.get(0) == "v0"  # used again: back among the young
    for k in range(4, 6):
        memo.put(k, f"v{k}")  # young is (3, 0, 4) then full: (5) young, (3, 0, 4) old
    assert [memo.get(k) for k in range(6)] == ["v0", None, None, "v3", "v4", "v5"]
    memo.clear()
    assert memo.get(5) is None


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Generations(0)
