"""The search's steps over one run: a small run context, the stage log, and the two steps every part of the search
composes (fine-tune and answer a dataset; judge outputs), shared by the test rating, the search loop
(flows/evolve.py) and validation (flows/search.py).

Every step walks jobs the plan module keys (tasks/plan/jobs.py dataset_keys, finetune_jobs, generate_jobs): the
plan the command line prints and the run compute the same results under the same keys.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, TypeVar

import pandas as pd
from prefect import get_run_logger

from tasks.config.base import TEACHER, TRIVIAL, UNTUNED
from tasks.config.schema import SearchConfig
from tasks.data.load import DatasetInfo
from tasks.generate.floors import trivial_outputs
from tasks.generate.outputs import teacher_outputs
from tasks.generate.references import reference_outputs
from tasks.judge.judgments import judge_task, run_openai_judge
from tasks.plan.execute import finetune_all, generate_all
from tasks.plan.jobs import DatasetKeys, FinetuneJob, GenerateJob, Guard, dataset_keys, finetune_jobs, generate_jobs
from tasks.plan.jobs import untuned_jobs
from tasks.plan.pool import Batch
from tasks.plan.prepare import Prepared
from tasks.store.results import adapter_path, outputs_path
from tasks.store.store import Store

Job = TypeVar("Job", FinetuneJob, GenerateJob)


class StageLog:
    """Wall time and computed/reused counts of every stage, for the log, the report and BENCHMARKS.md."""

    def __init__(self) -> None:
        """Start with no stages."""
        self.rows: list[dict[str, Any]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a stage; the body fills `computed` and `reused` in the yielded dict."""
        row = {"stage": name, "computed": 0, "reused": 0}
        t0 = time.perf_counter()
        yield row
        row["seconds"] = round(time.perf_counter() - t0, 2)
        self.rows.append(row)
        get_run_logger().info(
            f"stage {name}: {row['computed']} computed, {row['reused']} reused from the store, {row['seconds']} s"
        )


@dataclass
class Run:
    """One run of the search: its config, its store (the object and its root, which stage tasks take as text),
    its folder in the store, its stage log and its budget guard."""

    cfg: SearchConfig
    store: Store
    rel: str  # runs/<run-id>
    log: StageLog
    guard: Guard

    @property
    def root(self) -> str:
        """The store's root as stage tasks and pool runs take it."""
        return self.store.url

    def with_config(self, cfg: SearchConfig) -> Run:
        """The same run under another config (the search loop's and validation's: no references)."""
        return Run(cfg, self.store, self.rel, self.log, self.guard)


def count(row: dict[str, Any], reused: bool) -> None:
    """Add one result to a stage's computed or reused count."""
    row["reused" if reused else "computed"] += 1


def _gpu_spent(run: Run) -> None:
    """Count the last stage's GPU time as spent when it computed something: its pool runs' device time, or in local
    mode its wall time (this machine's device was held throughout)."""
    row = run.log.rows[-1]
    if row["computed"]:
        run.guard.gpu_s += row.get("device_s", row["seconds"])


def _device_time(row: dict[str, Any], batch: Batch) -> None:
    """Record a pool batch's device time in its stage's row (stages.json), beside the stage's wall time."""
    if batch.device_s is not None:
        row["device_s"] = round(batch.device_s, 2)


def _finetune(run: Run, models: list[str], datasets: dict[str, DatasetInfo], paths: dict[str, str],
              prep: Prepared) -> dict[str, tuple[DatasetKeys, list[FinetuneJob], list[GenerateJob]]]:
    """Fine-tune every model on the datasets as one stage (one batch): per dataset its keys, the fine-tunes, and their
    generation jobs."""
    cfg, st, guard = run.cfg, run.store, run.guard
    keys = {ds: dataset_keys(cfg, prep.models, data, models) for ds, data in datasets.items()}
    ft = {ds: finetune_jobs(cfg, prep.models, data, models, paths, keys[ds]) for ds, data in datasets.items()}
    every = by_model([j for jobs in ft.values() for j in jobs])
    names = ",".join(data.spec.name for data in datasets.values())
    guard.gpu(f"fine-tuning on {names.replace(',', ', ')}", sum(
        guard.finetune_s(datasets[ds].train, prep.models[j.model].signature)
        for ds, jobs in ft.items() for j in jobs if not st.exists(adapter_path(j.key))))
    with run.log.stage(f"finetune:{names}") as row:
        batch = finetune_all(every, cfg.compute, run.root)
        _device_time(row, batch)
        for _, reused in batch.results:
            count(row, reused)
    _gpu_spent(run)
    folders = {job.key: folder for job, (folder, _) in zip(every, batch.results)}
    return {ds: (keys[ds], ft[ds], generate_jobs(cfg, datasets[ds], ft[ds], [folders[j.key] for j in ft[ds]], keys[ds]))
            for ds in datasets}


def by_model(jobs: list[Job]) -> list[Job]:
    """A batch's jobs ordered by base model (an untuned job's too), the datasets' order kept within: a pool's runs take
    a batch's jobs from their own shares of this list (flows/stages.py), so each run fetches, and for answers loads,
    about its share of the bases instead of every base."""
    return sorted(jobs, key=lambda j: j.model.removesuffix(UNTUNED))


def train_and_answer(run: Run, models: list[str], data: DatasetInfo, paths: dict[str, str],
                     prep: Prepared) -> dict[str, tuple[str, str]]:
    """Fine-tune every model on one dataset and answer its test rows: contender -> (outputs path, outputs key)."""
    name = data.spec.name
    keys, _, gen_jobs = _finetune(run, models, {name: data}, paths, prep)[name]
    outputs = _answers(run, f"generation on {name}", f"generate:{name}", gen_jobs, data, prep,
                       (TEACHER, keys.outputs[TEACHER], lambda: teacher_outputs(name, data.test, TEACHER)))
    return outputs | _references(run, data, keys)


def train_and_answer_together(run: Run, models: list[str], datasets: dict[str, DatasetInfo], paths: dict[str, str],
                              prep: Prepared, floors: bool = True,
                              ) -> tuple[dict[str, dict[str, tuple[str, str]]], dict[str, dict]]:
    """Every model fine-tuned on every dataset as one stage, then every dataset's test rows answered by every
    fine-tune (and with `floors` each base untuned and the trivial answer, tasks/generate/floors.py) as one more:
    (outputs, floors), each dataset -> contender -> (outputs path, outputs key).

    One batch, not one a dataset: in pool mode each batch's hand-off and its last job (while the other runs wait)
    cost seconds (bench/remote_store.py), and with generate.engine: vllm each batch starts an engine per base
    (tasks/generate/vllm_engine.py). The floors are scored with the dataset's metric, never judged."""
    cfg, st, guard = run.cfg, run.store, run.guard
    planned = _finetune(run, models, datasets, paths, prep)
    gen = {ds: (jobs, untuned_jobs(cfg, datasets[ds], ft, keys) if floors else [])
           for ds, (keys, ft, jobs) in planned.items()}
    every = by_model([j for ds in gen for jobs in gen[ds] for j in jobs])
    base = lambda job: prep.models[job.model.removesuffix(UNTUNED)].signature  # an untuned job's model too
    names, untuned = ",".join(data.spec.name for data in datasets.values()), {j.key for ds in gen for j in gen[ds][1]}
    guard.gpu(f"generation on {names.replace(',', ', ')}", sum(
        guard.generate_s(datasets[j.dataset].test, base(j)) for j in every if not st.exists(outputs_path(j.key))))
    with run.log.stage("generate:by-base" if cfg.generate.engine == "vllm" else f"generate:{names}") as row:
        batch = generate_all(every, cfg.compute, run.root)
        _device_time(row, batch)
        for job, (_, reused) in zip(every, batch.results):
            if job.key not in untuned:
                count(row, reused)
    _gpu_spent(run)
    if floors:  # answered in the batch above (its seconds, said in the name), counted apart as the plan counts them
        with run.log.stage(f"floors:{names} (answered in the generate stage)") as row:
            for job, (_, reused) in zip(every, batch.results):
                if job.key in untuned:
                    count(row, reused)
    found = {job.key: rel for job, (rel, _) in zip(every, batch.results)}
    outputs, floor = {}, {}
    for ds, data in datasets.items():
        keys, name = planned[ds][0], data.spec.name
        outputs[ds] = {j.model: (found[j.key], j.key) for j in gen[ds][0]}
        outputs[ds][TEACHER] = _free(run, (TEACHER, keys.outputs[TEACHER], partial(teacher_outputs, name, data.test,
                                                                                   TEACHER)))
        outputs[ds] |= _references(run, data, keys)
        if floors:
            floor[ds] = {j.model: (found[j.key], j.key) for j in gen[ds][1]}
            floor[ds][TRIVIAL] = _free(run, (TRIVIAL, keys.floors[TRIVIAL], partial(
                trivial_outputs, name, data.train, data.test, data.metric)))
    return outputs, floor


def _free(run: Run, free: tuple[str, str, Callable[[], pd.DataFrame]]) -> tuple[str, str]:
    """A contender that costs nothing (the teacher, the trivial answer: name, key, outputs), written once: (path, key)."""
    _, key, make = free
    if not run.store.exists(outputs_path(key)):
        run.store.write_parquet(outputs_path(key), make())
    return outputs_path(key), key


def _references(run: Run, data: DatasetInfo, keys: DatasetKeys) -> dict[str, tuple[str, str]]:
    """The API references answering one dataset's test rows, as one stage: contender -> (outputs path, key)."""
    cfg, name, st, guard, outputs = run.cfg, data.spec.name, run.store, run.guard, {}
    if cfg.references:
        with run.log.stage(f"references:{name}") as row:  # API models answer the same test rows, cached the same way
            row["requests"], row["cost_usd"] = 0, 0.0
            for ref in cfg.references:
                if not st.exists(outputs_path(keys.outputs[ref.name])):
                    guard.dollars(f"{ref.name} answering {name}", guard.reference_usd(ref, data.test))
                outputs[ref.name], reused, requests, spent = reference_outputs(
                    ref, name, data.test, data.test_fp, cfg.prices, run.root)
                guard.usd += spent
                count(row, reused)
                row["requests"] += requests
                row["cost_usd"] = round(row["cost_usd"] + spent, 6)
    return outputs


def judge_all(run: Run, datasets: dict[str, DatasetInfo], all_outputs: dict[str, dict[str, tuple[str, str]]],
              pairs_with: str | None = None) -> list:
    """Judge the outputs with every judge of the search (cfg.judge_list()): the metric judge every pair per dataset (it
    is free), an LLM judge (openai, or combined: the metric where ground truth separates, the LLM the rest) in
    budget.strategy's rounds over all datasets at once. `pairs_with` (validation) judges all of that contender's
    pairs, no other.

    Returns metric batches [(path, A, B)] and the LLM judges' [table]s, for load_judgments.
    """
    cfg, batches = run.cfg, []
    judges = cfg.judge_list()
    for judge in judges:
        if judge.kind == "metric":
            for ds, data in datasets.items():
                with run.log.stage(f"judge:{ds}") as row:
                    found, reused = judge_task(ds, data.test, data.metric, data.test_fp, all_outputs[ds], judge,
                                               run.root, pairs_with)
                    row["computed"], row["reused"] = len(found) - reused, reused
                batches += found
            continue
        name = f"judge:{next(iter(datasets)) if pairs_with else cfg.budget.strategy}"
        with run.log.stage(name + (f":{judge.model}" if len(judges) > 1 else "")) as row:
            llm = run_openai_judge({ds: d.test for ds, d in datasets.items()}, all_outputs, cfg, run.root,
                                   all_pairs=pairs_with is not None, spent_usd=run.guard.usd, pairs_with=pairs_with,
                                   judge=judge, metrics={ds: d.metric for ds, d in datasets.items()})
            _judge_row(row, llm, run.guard)
        batches.append(llm.judgments)
    return batches


def _judge_row(row: dict[str, Any], llm: Any, guard: Guard) -> None:
    """Fill a judge stage's row (stages.json and the report), count its dollars, and log why judging stopped."""
    guard.usd += llm.new_cost_usd  # budget.max_usd covers references and judge; reused results cost nothing now
    row["computed"], row["reused"] = llm.new, llm.reused + llm.free
    row.update(llm.stats())
    logger = get_run_logger()
    logger.info(f"judge: {llm.requests} requests, ${llm.new_cost_usd:.4f} spent; stopped: {llm.stop_reason}")
    if llm.stop_reason.startswith("dollar budget"):
        logger.warning(f"judge: budget.max_usd reached, judging stopped early: {llm.stop_reason}")


def _answers(run: Run, what: str, stage: str, jobs: list[GenerateJob], data: DatasetInfo, prep: Prepared,
             free: tuple[str, str, Callable[[], pd.DataFrame]]) -> dict[str, tuple[str, str]]:
    """Generation jobs on a dataset's test rows as one stage, the budget checked first, then a contender that costs
    nothing (`free`: the teacher or the trivial answer; its name, key and outputs), written once. Returns
    contender -> (outputs path, outputs key)."""
    st, guard = run.store, run.guard
    base = lambda job: prep.models[job.model.removesuffix(UNTUNED)].signature  # noqa: E731  (an untuned job's model)
    guard.gpu(what, sum(guard.generate_s(data.test, base(j)) for j in jobs if not st.exists(outputs_path(j.key))))
    with run.log.stage(stage) as row:
        batch = generate_all(jobs, run.cfg.compute, run.root, rows_per_job=len(data.test))
        _device_time(row, batch)
        outputs = {job.model: (rel, job.key) for job, (rel, _) in zip(jobs, batch.results)}
        for _, reused in batch.results:
            count(row, reused)
        outputs[free[0]] = _free(run, free)
    _gpu_spent(run)
    return outputs
