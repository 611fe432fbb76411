"""Progress bars in the terminal while a stage works, driven by ticks from any thread or worker process.

    with progress.bar("zoo: train zoo:base", total=500, unit="steps") as b:
        with progress.ticking(b):   # ticks from this thread (and from worker jobs started here) go to b
            train(...)              # calls progress.tick() once per step, knowing nothing of bars

Bars are rich's (rich ships with Prefect), on the same console as Prefect's log lines, so the lines scroll above
the bars. They show only when stderr is a terminal (BASESEARCH_PROGRESS=1 forces them, 0 turns them off); in a
log file or CI nothing is drawn and the stage log lines say what happened. A worker process (tasks.compute.workers)
sends its ticks to the parent through a queue; the parent advances the bar.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

_LOCK = threading.Lock()
_BARS: dict[str, "Bar"] = {}  # open bars by id
_LIVE: dict[str, Any] = {}  # the rich Progress while any bar is open
_BOUND = threading.local()  # .bar: id of the bar this thread's ticks advance
# Set in a worker process: sends (bar id, n) to the parent, which owns the bars.
forward: Callable[[str, int], None] | None = None


def enabled() -> bool:
    """Draw bars? BASESEARCH_PROGRESS=1/0 decides; otherwise only when stderr is a terminal."""
    flag = os.environ.get("BASESEARCH_PROGRESS", "auto").lower()
    if flag in ("1", "true", "yes"):
        return True
    if flag in ("0", "false", "no"):
        return False
    return sys.stderr.isatty()


class Bar:
    """One bar: a description, a total, and how far it is."""

    def __init__(self, description: str, total: int | None, unit: str) -> None:
        """A bar not yet drawn (see bar())."""
        self.id, self.description, self.total, self.unit, self.done = uuid.uuid4().hex, description, total, unit, 0
        self.task: Any = None

    def advance(self, n: int = 1) -> None:
        """n more units done."""
        self.done += n
        if self.task is not None:
            _LIVE["progress"].update(self.task, advance=n)

    def describe(self, description: str) -> None:
        """Change the text beside the bar (e.g. the fine-tune running now)."""
        self.description = description
        if self.task is not None:
            _LIVE["progress"].update(self.task, description=description)


def _console() -> Any:
    """Prefect's console when its handler is set up (log lines then print above the bars), else stderr's."""
    import logging

    from rich.console import Console

    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect"):
        for handler in logging.getLogger(name).handlers:
            if hasattr(handler, "console"):
                return handler.console
    return Console(stderr=True)


def _columns() -> list[Any]:
    """description, bar, done/total, rate and time left: the columns of tqdm's bars, which ML users know."""
    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        """units per second, e.g. `12.5 steps/s` (blank until rich has measured a speed)."""

        def render(self, task: Any) -> Text:
            """The rate of one task."""
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} {task.fields['unit']}/s" if speed else "", style="progress.data.speed")

    return [TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(), Rate(),
            TimeRemainingColumn()]


@contextmanager
def bar(description: str, total: int | None, unit: str = "") -> Iterator[Bar]:
    """An open bar; drawn while open when enabled(), else only counted."""
    b = Bar(description, total, unit)
    draw = enabled() and (total is None or total > 0)
    with _LOCK:
        _BARS[b.id] = b
        if draw:
            if not _LIVE:
                from rich.progress import Progress

                _LIVE["progress"] = Progress(*_columns(), console=_console(), transient=False,
                                             refresh_per_second=4)
                _LIVE["progress"].start()
            b.task = _LIVE["progress"].add_task(description, total=total, unit=unit or 'items')
    try:
        yield b
    finally:
        with _LOCK:
            _BARS.pop(b.id, None)
            if b.task is not None and _LIVE:
                if not any(o.task is not None for o in _BARS.values()):
                    _LIVE.pop("progress").stop()


@contextmanager
def ticking(b: Bar | None) -> Iterator[None]:
    """While open, tick() in this thread advances `b` (None: ticks go nowhere)."""
    before = getattr(_BOUND, "bar", None)
    _BOUND.bar = b.id if b is not None else None
    try:
        yield
    finally:
        _BOUND.bar = before


def bound() -> str | None:
    """Id of the bar this thread's ticks advance (passed to worker jobs)."""
    return getattr(_BOUND, "bar", None)


def bind(bar_id: str | None) -> None:
    """Make this thread's ticks advance bar `bar_id` (in a worker process: the parent's bar)."""
    _BOUND.bar = bar_id


def tick(n: int = 1) -> None:
    """n more units done on the bar bound to this thread, wherever it is drawn; nothing when none is bound."""
    bar_id = getattr(_BOUND, "bar", None)
    if bar_id is None:
        return
    if forward is not None:
        forward(bar_id, n)
        return
    advance(bar_id, n)


def advance(bar_id: str, n: int) -> None:
    """Advance an open bar by id (ticks that arrive after it closed are dropped)."""
    b = _BARS.get(bar_id)
    if b is not None:
        b.advance(n)
