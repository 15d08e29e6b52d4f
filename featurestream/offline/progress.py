"""Progress of a long training-set run: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter(Protocol):
    def start(self, total: int, description: str) -> None: ...

    def advance(self, rows: int) -> None: ...

    def note(self, message: str) -> None: ...

    def close(self) -> None: ...


class Silent:
    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, rows: int) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


class RichBar:
    """A live bar; rich redraws it on a terminal (stderr), so output on stdout stays clean."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("label rows"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task: TaskID | None = None

    def start(self, total: int, description: str) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(description, total=total)
        else:
            self._progress.update(self._task, description=description)

    def advance(self, rows: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, rows)

    def note(self, message: str) -> None:
        self._progress.console.print(message, highlight=False)

    def close(self) -> None:
        self._progress.stop()


class LogLines:
    """Without a terminal (CI, a pipe, a log file): a line every ``every_s`` seconds and at the end."""

    def __init__(self, stream: TextIO, every_s: float = 10.0) -> None:
        self.stream = stream
        self.every_s = every_s
        self._total = 0
        self._done = 0
        self._started = time.monotonic()
        self._last = self._started
        self._description = ""

    def start(self, total: int, description: str) -> None:
        self._total = total
        self._description = description
        self._line()

    def advance(self, rows: int) -> None:
        self._done += rows
        now = time.monotonic()
        if now - self._last >= self.every_s or self._done >= self._total:
            self._last = now
            self._line()

    def note(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def _line(self) -> None:
        share = self._done / self._total * 100 if self._total else 100.0
        elapsed = time.monotonic() - self._started
        print(
            f"{self._description}: {self._done:,}/{self._total:,} label rows ({share:.0f}%), {elapsed:.0f} s",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        pass


def reporter(enabled: bool, stream: TextIO | None = None) -> Reporter:
    """A bar on a terminal, log lines elsewhere, nothing when disabled."""
    if not enabled:
        return Silent()
    stream = stream or sys.stderr
    console = Console(file=stream)
    return RichBar(console) if console.is_terminal else LogLines(stream)
