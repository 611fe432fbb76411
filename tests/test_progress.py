"""Progress bars: ticks from this thread and from worker processes reach the bar; drawn only when enabled."""

from __future__ import annotations

import os

import pytest

from tasks.compute.workers import in_worker, side_by_side
from tasks.core import progress
from tests.conftest import wait_for


def five_ticks() -> int:
    """Work that ticks five times, wherever it runs (a worker process: the ticks travel to the parent): its pid."""
    for _ in range(5):
        progress.tick()
    return os.getpid()


def test_ticks_from_this_thread_and_from_a_worker_reach_the_bar(monkeypatch):
    monkeypatch.setenv("BASESEARCH_PROGRESS", "0")
    with progress.bar("here", 5) as b, progress.ticking(b):
        assert five_ticks() == os.getpid()
        assert b.done == 5
    with progress.bar("in a worker", 5) as b, progress.ticking(b), side_by_side(1):
        assert in_worker(five_ticks, what="ticking") != os.getpid()  # it ran in a worker process
        # the parent's drain thread advances it
        wait_for(lambda: b.done >= 5, 60, lambda: f"the worker's 5 ticks on the bar (has {b.done})")
        assert b.done == 5
    progress.tick()  # no bar bound: nothing happens, nothing fails


@pytest.mark.parametrize("flag, drawn", [("1", True), ("0", False)])
def test_bars_are_drawn_only_when_enabled(monkeypatch, capsys, flag, drawn):
    monkeypatch.setenv("BASESEARCH_PROGRESS", flag)
    monkeypatch.setattr(progress, "_console", lambda: __import__("rich.console").console.Console(
        stderr=True, force_terminal=False, width=100))
    with progress.bar("generate on extraction", 3, "rows") as b:
        b.advance(3)
    err = capsys.readouterr().err
    assert ("generate on extraction" in err and "3/3" in err) == drawn, err
