"""Summarise py-spy's collapsed stacks (``--format raw``): inclusive and self share per function.

    python bench/_profile.py PROFILE.txt [--top 30] [--thread NAME] [--filter SUBSTRING]

Each line of the file is ``frame;frame;...;frame COUNT`` (root first). A function's inclusive
share counts every sample with it anywhere on the stack (once per sample); self counts the
samples where it is the innermost frame.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _name(frame: str, strip_lines: bool) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m['func']} ({path})" if strip_lines else f"{m['func']} ({path}:{m['line']})"


def summarise(path: Path, top: int, thread: str | None, needle: str | None) -> str:
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if thread and not any(thread in f for f in frames[:1]):
            continue
        if needle and needle not in stack:
            continue
        count = int(count_text)
        total += count
        names = [_name(f, True) for f in frames if not f.startswith(("process ", "thread "))]
        for name in set(names):
            inclusive[name] += count
        if names:
            self_[names[-1]] += count
    out = [f"{total} samples", "", f"{'incl%':>6} {'self%':>6}  function"]
    for name, count in inclusive.most_common(top):
        out.append(f"{100 * count / total:6.1f} {100 * self_[name] / total:6.1f}  {name}")
    out += ["", "top self time:"]
    for name, count in self_.most_common(top):
        out.append(f"{100 * count / total:6.1f}  {name}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--thread", help="only stacks whose first frame (py-spy --threads) contains this")
    parser.add_argument("--filter", help="only stacks containing this text")
    args = parser.parse_args()
    print(summarise(args.profile, args.top, args.thread, args.filter))


if __name__ == "__main__":
    main()
