"""Where the GPU stages run: each takes a batch of jobs and returns their results in order.

`compute.mode: local` runs every job in this process, one after another (a GPU gains little from two trainings
at once), except that on a CPU-only machine fine-tunes run side by side in worker processes (`compute.workers`,
tasks/compute/workers.py: a small model's step does not speed up with threads, but two processes do twice the work).
`compute.mode: pool` sends the jobs whose results are not in the store yet to a Prefect work pool, all at once, as
runs of a stage deployment (flows/stages.py, through tasks/plan/pool.py): a merge a run; a batch of fine-tunes or
generations as a few runs (`compute.pool_runs`) that take its jobs in turn; by default these are subflows of runs
that stay for the whole search (`compute.pool_stay_s`). The jobs' arguments are
JSON-able, so a stage run gets exactly the arguments the local call would: identical code, identical results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from tasks.compute.speeds import batched_rates
from tasks.compute.workers import local_workers, side_by_side
from tasks.config.recipes import recipe_models
from tasks.core import progress
from tasks.generate.outputs import generate_task
from tasks.models.merge import merge_task
from tasks.plan.jobs import FinetuneJob, GenerateJob, stage_arguments
from tasks.plan.pool import Batch, Progress, StageCall, _label, run_in_pool
from tasks.store.results import adapter_path, model_path, outputs_path
from tasks.store.store import Store
from tasks.train.finetune import finetune_task

if TYPE_CHECKING:

    from tasks.config.schema import ComputeConfig, Merge


def merge_all(merges: list[tuple[Merge, str]], paths: dict[str, str], compute: ComputeConfig,
              store: str) -> list[tuple[str, bool]]:
    """(merged model folder, reused?) for each (merge, its key), in order. None may need another of the list: in pool
    mode they are sent at once, so a search round's merges run side by side, not each waited for alone."""
    if compute.mode == "local":
        return [merge_task(m, paths, key, store) for m, key in merges]
    calls = [StageCall("merge", f"merge-{m.name}", {"merge": m.model_dump(mode="json"), "paths": paths, "key": key,
                                                    "store_root": store}, model_path(key), key) for m, key in merges]
    st = Store(store)
    return st.each(lambda r: (str(st.local_dir(r[0])), r[1]), run_in_pool(calls, compute, store).results)


def merge_waves(merges: list[Merge]) -> list[list[Merge]]:
    """`merges` in waves that merge_all can take, the config's order kept within each: a merge goes in the wave after
    the latest merge it names (the config's check lets a merge name only candidates and the merges before it)."""
    wave_of: dict[str, int] = {}
    for m in merges:
        wave_of[m.name] = 1 + max((wave_of[n] for n in recipe_models(m.recipe) if n in wave_of), default=-1)
    return [[m for m in merges if wave_of[m.name] == w] for w in range(max(wave_of.values(), default=-1) + 1)]


def finetune_all(jobs: list[FinetuneJob], compute: ComputeConfig, store: str) -> Batch:
    """(adapter folder, reused?) for every job, in order, and the pool's device time."""
    if compute.mode == "local":
        return Batch(_local(jobs, finetune_task, store, "finetune", local_workers(compute)))
    calls = [StageCall("finetune", f"finetune-{j.model}-{j.dataset}", _params(j), adapter_path(j.key), j.key)
             for j in jobs]
    st, ran = Store(store), run_in_pool(calls, compute, store)
    return Batch(st.each(lambda r: (str(st.local_dir(r[0])), r[1]), ran.results), ran.device_s)


def generate_all(jobs: list[GenerateJob], compute: ComputeConfig, store: str, rows_per_job: int = 0) -> Batch:
    """(outputs Parquet path, reused?) for every job, in order, and the pool's device time; `rows_per_job` (test
    rows) sizes the bar."""
    if compute.mode == "local" and jobs and jobs[0].cfg.engine == "vllm":
        return Batch(_local_vllm(jobs, store, rows_per_job))
    if compute.mode == "local":
        return Batch(_local(jobs, generate_task, store, "generate", rows_per_job=rows_per_job))
    calls = [StageCall("generate", f"generate-{j.model}-{j.dataset}", _params(j), outputs_path(j.key),
                       j.key) for j in jobs]
    return run_in_pool(calls, compute, store)


def _local_vllm(jobs: list[GenerateJob], store: str, rows_per_job: int) -> list[tuple[str, bool]]:
    """generate.engine: vllm in this process's stead: one vLLM batch per base model (every adapter of it at once,
    tasks/generate/vllm_engine.py), results in the jobs' order, the bar advanced as each job's result is written."""
    from tasks.generate.outputs import note_generated
    from tasks.generate.vllm_engine import by_base, check_engine, generate_group

    python, label = check_engine(jobs[0].cfg), _label("generate", [j.dataset for j in jobs])
    artifact, found = Progress(label, len(jobs)), {}
    with progress.bar(label, len(jobs) * (rows_per_job or 1), "rows" if rows_per_job else "jobs") as bar:
        def done(job: GenerateJob, df: Any) -> None:
            """One more job's result in the store: its rate and log line when new, the artifact and the bar."""
            if df is not None:
                note_generated(Store(store), job.model, job.dataset, df)
            artifact.done(1)
            bar.advance(rows_per_job or 1)

        for group in by_base(jobs):
            bar.describe(f"{label}: {group[0].model} (vLLM, {len(group)} at once)")
            found |= {j.key: r for j, r in zip(group, generate_group(group, store, python, done))}
    return [found[j.key] for j in jobs]


def _params(job: FinetuneJob | GenerateJob) -> dict[str, Any]:
    """A job as a batch flow's job (flows/stages.py): its fields, configs as plain dicts."""
    return {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in stage_arguments(job).items()}


def _local(
    jobs: list[Any], task: Callable[..., tuple[str, bool]], store: str, stage: str, workers: int = 1,
    rows_per_job: int = 0,
) -> list[tuple[str, bool]]:
    """Run jobs in this process, with a progress artifact (the UI) and a bar (the terminal): one after another,
    or with `workers` over 1 submitted together, each task handing its work to a worker process (tasks.compute.workers).

    The bar counts jobs, or with `rows_per_job` the rows the jobs tick through (generation: one tick per row).
    """
    label = _label(stage, [j.dataset for j in jobs])
    artifact = Progress(label, len(jobs))
    unit = "rows" if rows_per_job else "jobs"
    with progress.bar(label, len(jobs) * (rows_per_job or 1), unit) as bar, progress.ticking(bar), batched_rates():
        def finished(i: int, job: Any) -> None:
            """One more job done: the artifact, and the bar up to where this job ends (a reused one ticks none)."""
            artifact.done(1)
            bar.advance((i + 1) * (rows_per_job or 1) - bar.done)
            if i + 1 < len(jobs):
                bar.describe(f"{label}: {jobs[i + 1].model}")

        bar.describe(f"{label}: {jobs[0].model}" if jobs else label)
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for i, job in enumerate(jobs):
                results.append(task(**stage_arguments(job), store_root=store))
                finished(i, job)
            return results
        with side_by_side(workers):
            futures = [task.submit(**stage_arguments(job), store_root=store) for job in jobs]
            results = []
            for i, (f, job) in enumerate(zip(futures, jobs)):
                results.append(f.result())
                finished(i, job)
        return results
