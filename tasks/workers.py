"""Local fine-tunes side by side: a pool of worker processes, one torch thread each, for CPU-only machines.

A small model's training step does not get faster with more threads (on the demo's shape, 2 threads ran at
16,747 tokens/s and 1 thread at 16,811), but two 1-thread processes side by side do twice the work (16,310 +
16,292 tokens/s). So with `compute.workers` over 1, compute.finetune_all submits a stage's fine-tunes together
and each Prefect task hands its training to a worker process (in_worker). Logging and the store stay in the
flow's process.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    from tasks.config import ComputeConfig

T = TypeVar("T")
AUTO_MAX = 8  # auto never starts more workers: each holds its own copy of a model

_pools: dict[int, ProcessPoolExecutor] = {}  # by size; started on first use, kept for the life of the process
_active: ProcessPoolExecutor | None = None  # the pool in_worker uses, set by side_by_side


def local_workers(compute: ComputeConfig) -> int:
    """How many fine-tunes run at once with compute.mode local: compute.workers, or for auto one per CPU core on a
    machine without a GPU (at most AUTO_MAX) and 1 with one (a GPU trains one model at a time well)."""
    if compute.workers != "auto":
        return compute.workers
    import torch

    # the cores this process may run on (a container's cpuset), where the OS says; else all of the machine's
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if torch.cuda.is_available() else max(1, min(AUTO_MAX, cores))


def _init_worker() -> None:
    """Set up a worker process: one torch thread (the workers share the cores), the CLI's quiet defaults, and a
    quiet exit on Ctrl-C (the flow's process reports the interruption; a half-done fine-tune is never stored)."""
    import signal

    import flows  # noqa: F401  (environment defaults and warning filters, as in the flow's process)
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))


def _pool(n: int) -> ProcessPoolExecutor:
    """The pool of n workers. Spawned, not forked: the flow's process runs threads (Prefect) that a fork would
    copy mid-flight. Its processes start on the first job, so a stage whose results are all stored starts none."""
    if n not in _pools:
        _pools[n] = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    return _pools[n]


@contextmanager
def side_by_side(n: int) -> Iterator[None]:
    """While open, in_worker runs its calls in the pool of n workers."""
    global _active
    _active = _pool(n)
    try:
        yield
    finally:
        _active = None


def in_worker(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a worker process while side_by_side is open, else here. fn and args must pickle."""
    pool = _active
    return pool.submit(fn, *args).result() if pool is not None else fn(*args)


def stop_workers() -> None:
    """Terminate every worker process now (an interrupted search: a half-done fine-tune is never stored)."""
    for proc in multiprocessing.active_children():
        proc.terminate()
