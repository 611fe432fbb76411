"""Local fine-tunes side by side: a pool of worker processes, one torch thread each, for CPU-only machines.

A small model's training step does not get faster with more threads (on the demo's shape, 2 threads ran at
16,747 tokens/s and 1 thread at 16,811), but two 1-thread processes side by side do twice the work (16,310 +
16,292 tokens/s). So with `compute.workers` over 1, compute.finetune_all submits a stage's fine-tunes together
and each Prefect task hands its training to a worker process (in_worker). Logging and the store stay in the
flow's process, and so do the progress bars: a worker's ticks (tasks.core.progress.tick) travel back through a
queue. A worker that dies (killed, or out of memory) fails its job with one line naming it, not a traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from tasks.core.errors import EnvironmentFailure

if TYPE_CHECKING:
    from tasks.config.schema import ComputeConfig

T = TypeVar("T")
AUTO_MAX = 8  # auto never starts more workers: each holds its own copy of a model

_pools: dict[int, ProcessPoolExecutor] = {}  # by size; started on first use, kept for the life of the process
_active: ProcessPoolExecutor | None = None  # the pool in_worker uses, set by side_by_side
_ticks: Any = None  # the queue workers send progress ticks through (bar id, n), drained by a thread here


def local_workers(compute: ComputeConfig) -> int:
    """How many fine-tunes run at once with compute.mode local: compute.workers, or for auto one per CPU core on a
    machine without a GPU (at most AUTO_MAX) and 1 with one (a GPU trains one model at a time well)."""
    if compute.workers != "auto":
        return compute.workers
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(AUTO_MAX, cores()))


# Below this many parameters a model's CPU kernels are too small to share among threads on a busy machine: the
# zoo's 0.5M-parameter Mistral trained a step in 0.10 s on 1 thread and 0.34 s on 2 beside three busy loops, and
# 0.063 s vs 0.18 s beside one other job; idle, 2 threads were 1.4x faster (0.031 s vs 0.043 s; bench/zoo_threads.py,
# 2 cores). A second thread only pays when a core is free for it, and not at all for generation, whose decoding
# steps are smaller still: batched greedy decoding of the demo's test rows ran at 11,732 and 10,608 tokens/s on 1
# thread, 10,014 and 10,167 on 2, idle (bench/generate_throughput.py --threads 1|2).
SMALL_MODEL_PARAMS = 20_000_000
_in_worker = False  # set in worker processes: they share the cores, one thread each


def cores() -> int:
    """The cores this process may run on (a container's cpuset), where the OS says; else all of the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_for(n_params: int) -> int:
    """torch CPU threads for training or generation on a model of n_params parameters in this process: one per core
    for a large model, 1 for a small one. Never chosen by the machine's load: a float sum split over 2 threads rounds
    differently than over 1, so a load-dependent choice gave the demo zoo other weights when the machine was busy (two
    searches side by side built it with different bytes), and the same key other bytes. 2 threads were 1.4x faster on
    a tiny model on an idle machine and 3.4x slower beside busy processes (bench/zoo_threads.py)."""
    import torch

    if _in_worker or n_params < SMALL_MODEL_PARAMS:
        return 1
    return torch.get_num_threads()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch uses n intra-op threads while open (then what it used before)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def share_cores() -> None:
    """Make this process one of several sharing the CPU cores, as a worker process is: one torch thread for training
    and generation. For a pool stage run on a machine without a GPU, where a worker runs several runs at once (its
    --limit): with a torch thread per core in each, the demo's fine-tunes ran 20-40x slower than local mode's
    one-thread workers (bench/remote_store.py --pool, 2 cores). A machine with a GPU keeps torch's threads."""
    import torch

    global _in_worker
    if not torch.cuda.is_available():
        _in_worker = True
        torch.set_num_threads(1)


def _init_worker(ticks: Any) -> None:
    """Set up a worker process: one torch thread (the workers share the cores), the CLI's quiet defaults, ticks
    sent to the parent, and a quiet exit on Ctrl-C (the flow's process reports the interruption; a half-done
    fine-tune is never stored)."""
    import signal

    import torch

    import tasks.core.env  # noqa: F401  (environment defaults and warning filters, as in the flow's process)
    from tasks.core import progress

    global _in_worker
    _in_worker = True
    torch.set_num_threads(1)
    progress.forward = lambda bar_id, n: ticks.put((bar_id, n))
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))


def _drain(ticks: Any) -> None:
    """Advance the parent's bars with the ticks workers send (a daemon thread for the life of the process)."""
    from tasks.core import progress

    while True:
        try:
            bar_id, n = ticks.get()
        except (EOFError, OSError):  # the queue closed at exit
            return
        progress.advance(bar_id, n)


def _pool(n: int) -> ProcessPoolExecutor:
    """The pool of n workers. Spawned, not forked: the flow's process runs threads (Prefect) that a fork would
    copy mid-flight. Its processes start on the first job, so a stage whose results are all stored starts none."""
    global _ticks
    if n not in _pools:
        ctx = multiprocessing.get_context("spawn")
        if _ticks is None:
            _ticks = ctx.SimpleQueue()
            threading.Thread(target=_drain, args=(_ticks,), name="worker-ticks", daemon=True).start()
        _pools[n] = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(_ticks,))
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


def _bound_call(bar_id: str | None, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    """fn(*args) in a worker, its ticks going to the parent's bar `bar_id`."""
    from tasks.core import progress

    progress.bind(bar_id)
    return fn(*args)


def in_worker(fn: Callable[..., T], *args: Any, what: str = "a job") -> T:
    """fn(*args) in a worker process while side_by_side is open, else here. fn and args must pickle; `what` names
    the job in the one line said when its worker dies (e.g. `fine-tune of hermes on extraction`)."""
    from tasks.core import progress

    pool = _active
    if pool is None:
        return fn(*args)
    try:
        return pool.submit(_bound_call, progress.bound(), fn, args).result()
    except BrokenProcessPool:
        _forget_broken(pool)
        raise EnvironmentFailure(
            f"{what}: its worker process died (killed, or out of memory); run the same command again to go "
            "on (finished results are kept), with compute.workers: 1 if memory is short") from None


def _forget_broken(pool: ProcessPoolExecutor) -> None:
    """Drop a pool whose worker died, so the next stage starts a fresh one instead of failing at once."""
    for n, p in list(_pools.items()):
        if p is pool:
            del _pools[n]


def stop_workers() -> None:
    """Terminate every worker process now (an interrupted search: a half-done fine-tune is never stored)."""
    for proc in multiprocessing.active_children():
        proc.terminate()
