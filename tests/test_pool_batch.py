"""A batch of stage jobs sent to a work pool as a few runs (tasks/plan/pool.py) that take its jobs in turn
(flows/stages.py): each result still computed once, a held job left for last and waited for, no server needed."""

from __future__ import annotations

import threading
import time

import pandas as pd

from tasks.config.stages import ComputeConfig, FinetuneConfig
from tasks.plan.jobs import FinetuneJob
from tasks.plan.pool import StageCall, pool_runs, runs_for
from tasks.store.results import outputs_path
from tasks.store.store import Store


def jobs(n: int) -> list[FinetuneJob]:
    """`n` jobs whose keys name their results; their paths are never opened by the fake task."""
    return [FinetuneJob(f"m{i}", "d", "/nowhere", "/nowhere.jsonl", FinetuneConfig(), f"{i:016x}") for i in range(n)]


def recording_task(store: Store, made: list[tuple[str, str]], seconds: float):
    """A stand-in stage task: computes its job's result once through the store, noting who made it."""
    def task(**kw) -> tuple[str, bool]:
        rel = outputs_path(kw["key"])

        def compute() -> str:
            time.sleep(seconds)
            made.append((threading.current_thread().name, kw["key"]))
            return store.write_parquet(rel, pd.DataFrame({"x": [1]}))
        _, reused = store.compute_once(rel, compute)
        return rel, reused
    return task


def test_two_runs_of_a_batch_share_its_jobs_and_compute_each_once(tmp_path, monkeypatch):
    import flows.stages
    from flows.stages import take_in_turn

    monkeypatch.setattr(flows.stages, "share_cores", lambda: None)  # this test process keeps its torch threads

    st, made, batch = Store(str(tmp_path / "store")), [], jobs(6)
    task = recording_task(st, made, 0.2)
    results: dict[str, list] = {}

    def run(first: int) -> None:
        results[threading.current_thread().name] = take_in_turn(batch, first, st.url, task, outputs_path)

    threads = [threading.Thread(target=run, args=(first,), name=f"run{first}") for first in (0, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(key for _, key in made) == sorted(j.key for j in batch)  # each once
    assert {who for who, _ in made} == {"run0", "run3"}  # both worked
    for got in results.values():  # each run answers for the whole batch, in its order
        assert [rel for rel, _ in got] == [outputs_path(j.key) for j in batch]


def test_a_job_another_run_holds_is_left_for_last_then_reused(tmp_path, monkeypatch):
    import flows.stages
    from flows.stages import take_in_turn

    monkeypatch.setattr(flows.stages, "share_cores", lambda: None)

    st, made, batch = Store(str(tmp_path / "store")), [], jobs(2)
    held = outputs_path(batch[0].key)
    taken, release = threading.Event(), threading.Event()

    def holder() -> None:
        with st.lock(held):
            taken.set()
            release.wait(30)
            st.write_parquet(held, pd.DataFrame({"x": [1]}))
            made.append(("holder", batch[0].key))

    t = threading.Thread(target=holder, name="holder")
    t.start()
    taken.wait(30)
    threading.Timer(1.0, release.set).start()  # the holder finishes while the run waits for it
    got = take_in_turn(batch, 0, st.url, recording_task(st, made, 0.0), outputs_path)
    t.join()
    assert made == [("MainThread", batch[1].key), ("holder", batch[0].key)]  # the free job first, not the held one
    assert got == [(held, True), (outputs_path(batch[1].key), False)]


def test_a_batch_goes_as_runs_that_each_start_at_their_share(tmp_path):
    st = Store(str(tmp_path / "store"))
    calls = [StageCall("finetune", f"finetune-{j.model}-d", {"key": j.key, "dataset": "d"}, f"adapters/{j.key}", j.key)
             for j in jobs(5)]
    runs = pool_runs(calls, 2, st)
    assert [(r.name, r.parameters["first"]) for r in runs] == [("finetune-d-1of2", 0), ("finetune-d-2of2", 2)]
    assert all(r.parameters["jobs"] == [c.parameters for c in calls] for r in runs)
    assert len({r.idempotency_key for r in runs}) == 2
    assert pool_runs(calls, 2, st)[0].idempotency_key == runs[0].idempotency_key  # a re-sent search finds its runs
    assert [r.name for r in pool_runs(calls[:1], 1, st)] == ["finetune-m0-d"]  # one job: named as the job
    merge = StageCall("merge", "merge-ab", {"key": "k", "paths": {}, "store_root": st.url}, "models/k", "k")
    assert [(r.name, r.parameters) for r in pool_runs([merge], 1, st)] == [("merge-ab", merge.parameters)]
    assert runs_for(None, ComputeConfig(mode="pool", pool="gpu", pool_runs=8), 5) == 5  # never more runs than jobs
