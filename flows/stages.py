"""The GPU stages as their own flows, deployed to a work pool and called with `run_deployment` in pool mode.

Each wraps the very task that `compute.mode: local` calls in-process, with the same JSON-able arguments, so
a pool run computes exactly what a local run would and leaves it in the same place in the store. With a bucket as the
store, paths arrive as `store:<rel>` and are fetched to the worker's own disk first (tasks/store/portable.py).

A fine-tune or generate run takes a batch of jobs (tasks/plan/pool.py sends one batch to a few runs at once): its
process imports torch, transformers and Prefect once for all of them, not once per job. The runs of one batch take
its jobs in turn, each starting at its own place in the list; a job whose result is already stored is skipped, one
another run holds (its lock or lease, tasks/store/store.py) is left for last and then waited for, so each result is
still computed once. Run names read like the work: merge-<merge>, finetune-<model>-<dataset> for one job,
finetune-<dataset>-<i>of<n> for a share of a batch.

With `compute.pool_stay_s` over 0 (the default) the search starts a few runs of `stages_flow` instead, which stay: each
takes the search's stage runs from the store one after another (tasks/plan/queue.py) and runs each as a subflow of
itself, named as the run it stands for, so a worker's process starts a few times a search instead of once a batch.
"""

from __future__ import annotations

from typing import Any, Callable

from prefect import flow

from tasks.compute.speeds import batched_rates
from tasks.compute.workers import share_cores
from tasks.config.schema import Merge
from tasks.generate.outputs import generate_task
from tasks.models.merge import merge_task
from tasks.plan.jobs import FinetuneJob, GenerateJob, stage_arguments
from tasks.plan.pool import state_line
from tasks.plan.queue import serve
from tasks.store.portable import localized
from tasks.store.results import adapter_path, outputs_path
from tasks.store.store import Store
from tasks.train.finetune import finetune_task


@flow(name="merge", flow_run_name="merge-{merge.name}")
def merge_flow(merge: Merge, paths: dict[str, str], key: str, store_root: str) -> tuple[str, bool]:
    """Merge candidates with a mergekit recipe into store/models/<key>: (folder, already there?)."""
    return merge_task(merge, localized({"paths": paths, "store_root": store_root})["paths"], key, store_root)


@flow(name="finetune")
def finetune_flow(jobs: list[FinetuneJob], store_root: str, first: int = 0) -> list[tuple[str, bool]]:
    """LoRA fine-tune each job's model on its dataset into store/adapters/<key>: (store path, already there?) each."""
    return take_in_turn(jobs, first, store_root, finetune_task, adapter_path)


@flow(name="generate")
def generate_flow(jobs: list[GenerateJob], store_root: str, first: int = 0) -> list[tuple[str, bool]]:
    """Each job's fine-tune answers its test file into store/outputs/<key>.parquet: (store path, already there?) each."""
    return take_in_turn(jobs, first, store_root, generate_task, outputs_path)


@flow(name="stages")
def stages_flow(store_root: str, session: str, stay_s: float = 60.0, poll_s: float = 0.5) -> int:
    """Run the search's stage runs queued in the store (merges, fine-tune and generate batches), each as a subflow,
    until the search ends or `stay_s` seconds pass with nothing to take: how many this run did. `poll_s`: seconds
    between looks at the queue (one listing of a bucket each)."""
    share_cores()
    return serve(Store(store_root), session, stay_s, poll_s, _run_entry)


STAGE_FLOW = {"merge": merge_flow, "finetune": finetune_flow, "generate": generate_flow}


def _run_entry(entry: dict[str, Any]) -> tuple[str, str | None]:
    """One queued stage run as a subflow, named as that run would be: its flow run id, and why it failed or None."""
    sub = STAGE_FLOW[entry["flow"]].with_options(flow_run_name=entry["name"])
    state = sub(**entry["parameters"], return_state=True)
    error = None if state.is_completed() else state_line(state)
    return str(state.state_details.flow_run_id), error


def take_in_turn(jobs: list[Any], first: int, store_root: str, task: Callable[..., tuple[str, bool]],
                 rel_of: Callable[[str], str]) -> list[tuple[str, bool]]:
    """Run `jobs` through `task` from job `first` round to the one before it, each under its result's lock: a
    stored result is skipped, one held by another run left for last and then waited for (and reused)."""
    share_cores()  # a worker runs several runs at once: on CPU one torch thread each, as local mode's workers
    st = Store(store_root)
    done: dict[str, bool] = {}
    later = []
    with batched_rates():  # the jobs' measured speeds written once, at the end
        for job in jobs[first:] + jobs[:first]:
            rel = rel_of(job.key)
            if st.exists(rel):  # another run of the batch made it: nothing to fetch or load
                done[job.key] = True
                continue
            with st.lock(rel, wait=False) as mine:  # held here, the task's own claim of it is this one
                if mine:
                    done[job.key] = _run(task, job, store_root)
                else:
                    later.append(job)
        for job in later:  # their holders are at work: wait for each (the task's claim waits) and reuse it
            done[job.key] = _run(task, job, store_root)
    return [(rel_of(job.key), done[job.key]) for job in jobs]


def _run(task: Callable[..., tuple[str, bool]], job: FinetuneJob | GenerateJob, store_root: str) -> bool:
    """One job through its stage task, its `store:` paths made local first: whether its result was reused."""
    args = localized(stage_arguments(job) | {"store_root": store_root})
    return task(**args)[1]

