"""Progress on anything long: rich bars on a terminal, plain log lines otherwise, nothing when quiet.

Strategies, runs and predictions report through one callback,
``progress(label, done, total)``. :func:`progress_reporter` gives the callback
that fits where the output goes: a live bar per label on an interactive
terminal; when stderr is a file or a pipe (a job log, CI), one line per label
at most every ``interval`` seconds and at completion, with elapsed time and an
ETA, so that a 10-minute tuning run is never silent in a log.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

ProgressFn = Callable[[str, int, int], None]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class LogLines:
    """``progress(label, done, total)`` as periodic plain lines: ``label done/total  elapsed m:ss  eta m:ss``."""

    def __init__(self, stream: TextIO, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.interval, self.clock = stream, float(interval), clock
        self._start: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        now = self.clock()
        if label not in self._start or done == 0:
            self._start[label], self._last[label] = now, float("-inf")
        finished = total > 0 and done >= total
        if not finished and now - self._last[label] < self.interval:
            return
        self._last[label] = now
        elapsed = now - self._start[label]
        eta = elapsed / done * (total - done) if 0 < done < total else 0.0
        line = f"{label} {done}/{total}  elapsed {_clock(elapsed)}"
        if not finished:
            line += f"  eta {_clock(eta)}" if done else "  eta -"
        print(line, file=self.stream, flush=True)
        if finished:
            self._start.pop(label, None)


@contextmanager
def progress_reporter(quiet: bool = False, stream: TextIO | None = None,
                      interval: float = 10.0) -> Iterator[ProgressFn | None]:
    """The progress callback for a command: None when ``quiet``, rich bars on a terminal, else log lines."""
    stream = stream or sys.stderr
    if quiet:
        yield None
        return
    if not stream.isatty():
        yield LogLines(stream, interval)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(file=stream), transient=True) as bars:
        tasks: dict[str, int] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bars.add_task(label, total=total)
            bars.update(tasks[label], completed=done, total=total)

        yield update
