"""A batch of stage jobs sent to a work pool as a few runs (tasks/plan/pool.py) that take its jobs in turn
(flows/stages.py): each result still computed once, a held job left for last and waited for; and runs that stay for a
whole search, taking its queued stage runs from the store (tasks/plan/queue.py). No server needed."""

from __future__ import annotations

import threading
import time

import pandas as pd

from tasks.config.stages import ComputeConfig, FinetuneConfig
from tasks.plan.jobs import FinetuneJob
from tasks.plan.pool import StageCall, pool_runs, runs_for
from tasks.plan.queue import close_queue, done, look, open_queue, put, serve
from tasks.store.results import outputs_path
from tasks.store.store import Store
from tests.conftest import wait_for


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


def test_staying_runs_take_each_queued_run_once_and_end_with_the_search(tmp_path):
    st = Store(str(tmp_path / "store"))
    open_queue(st, "s1", "test")
    entries = [put(st, "s1", i, "finetune", f"finetune-d-{i}", {"i": i}) for i in range(1, 7)]
    ran: list[int] = []
    guard = threading.Lock()

    def run_entry(entry: dict) -> tuple[str, str | None]:
        with guard:
            ran.append(entry["parameters"]["i"])
        time.sleep(0.05)
        return f"run-{entry['parameters']['i']}", "Failed: boom" if entry["parameters"]["i"] == 3 else None

    counts: list[int] = []
    runs = [threading.Thread(target=lambda: counts.append(serve(st, "s1", 60, 0.02, run_entry))) for _ in range(2)]
    for t in runs:
        t.start()
    wait_for(lambda: len(done(st, "s1", entries)) == 6, 30, lambda: f"6 entries done, not {done(st, 's1', entries)}")
    later = put(st, "s1", 7, "generate", "generate-d", {"i": 7})  # a later batch: taken by the runs still there
    wait_for(lambda: later in done(st, "s1", [later]), 30, "the later entry done")
    records = done(st, "s1", entries)
    assert sorted(ran) == [1, 2, 3, 4, 5, 6, 7] and look(st, "s1")[1] == []  # each taken once, none left
    assert records[entries[0]] == {"flow_run_id": "run-1", "error": None}
    assert records[entries[2]] == {"flow_run_id": "run-3", "error": "Failed: boom"}  # the search raises on it
    assert all(t.is_alive() for t in runs)  # nothing to do, but stay_s (60 s) not over: they wait
    close_queue(st, "s1")  # the search ends
    for t in runs:
        t.join(10)
    assert not any(t.is_alive() for t in runs) and sum(counts) == 7
    assert not (tmp_path / "store" / ".queue" / "s1").exists()


def test_a_staying_run_ends_after_stay_s_with_nothing_to_take(tmp_path):
    st = Store(str(tmp_path / "store"))
    open_queue(st, "s2", "test")
    t0 = time.monotonic()
    assert serve(st, "s2", 0.3, 0.02, lambda entry: ("never", None)) == 0
    assert 0.3 <= time.monotonic() - t0 < 10


def test_an_entry_still_being_written_is_not_pending(tmp_path):
    """On a folder store an entry is written as a temp beside it and renamed: the temp is no entry to take yet."""
    from tasks.store.guards import tmp_name

    st = Store(str(tmp_path / "store"))
    open_queue(st, "s4", "test")
    entry = put(st, "s4", 1, "merge", "merge-ab", {})
    (tmp_path / "store" / ".queue" / "s4" / "jobs" / tmp_name()).write_text("{")  # half an entry, mid-write
    assert look(st, "s4")[1] == [entry] and st.names(".queue/s4/jobs") == {entry}


def test_a_queued_run_held_by_another_run_is_not_taken_twice(tmp_path):
    """Across machines the entry's lease holds it; here another thread's lock: the run ends idle, taking nothing."""
    st = Store(str(tmp_path / "store"))
    open_queue(st, "s3", "test")
    entry = put(st, "s3", 1, "merge", "merge-ab", {})
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with st.lock(f".queue/s3/jobs/{entry}"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        assert serve(st, "s3", 0.3, 0.02, lambda e: ("taken", None)) == 0 and look(st, "s3")[1] == [entry]
    finally:
        release.set()
        t.join()


def stand_in_client(states: dict, seconds: float):
    """A Prefect client stand-in for the search's side: each run's state read from `states` (by id), `seconds` of
    Running each, and one worker listed."""
    from datetime import timedelta
    from types import SimpleNamespace

    return SimpleNamespace(
        read_flow_run=lambda rid: SimpleNamespace(id=rid, state=states.get(rid),
                                                  total_run_time=timedelta(seconds=seconds)),
        read_workers_for_work_pool=lambda name: [SimpleNamespace(status=None)])


def test_the_search_replaces_a_crashed_staying_run_and_names_a_failed_entry(tmp_path, monkeypatch):
    """The search's side of a session (tasks/plan/pool.py in_session), with a stand-in Prefect client: a staying run
    that crashes is replaced and its work done by the next; an entry whose subflow failed is named in one error."""
    from types import SimpleNamespace
    from uuid import uuid4

    import pytest
    from prefect.states import Crashed, Running

    import tasks.plan.pool as pool

    monkeypatch.setattr(pool, "QUEUE_POLL_S", 0.02)
    monkeypatch.setattr(pool, "POLL_S", 0.05)
    st = Store(str(tmp_path / "store"))
    states: dict = {}
    started: list[str] = []
    threads: list[threading.Thread] = []

    def run_entry(entry: dict) -> tuple[str, str | None]:
        return str(uuid4()), ("Failed: CUDA out of memory" if entry["name"].startswith("generate") else None)

    def submit(client, run, pool_name) -> SimpleNamespace:
        started.append(run.name)
        rid = uuid4()
        if len(started) == 1:  # the first dies before it takes anything (kill -9 of its worker)
            states[rid] = Crashed(message="the worker's process was killed")
        else:
            states[rid] = Running()
            t = threading.Thread(target=serve, args=(st, run.parameters["session"], 60, 0.02, run_entry))
            t.start()
            threads.append(t)
        return SimpleNamespace(id=rid)

    client = stand_in_client(states, 2)
    monkeypatch.setattr(pool, "_submit", submit)
    open_queue(st, "s4", "test")
    session = pool.Session("s4", st, "gpu", "search-x", 60.0, "me")
    share = [pool.PoolRun("finetune", f"finetune-d-{i}of2", {"first": i}, f"k{i}") for i in (0, 1)]
    progress = pool.Progress("finetune on d", 2)
    try:
        assert pool.in_session(client, session, share, 1, progress, lambda: 0) == {r.name: 2.0 for r in share}
        assert started == ["stages-search-x-1", "stages-search-x-2"] and session.crashes == 1
        with pytest.raises(RuntimeError, match=r"generate-d \(Failed: CUDA out of memory\)"):
            pool.in_session(client, session, [pool.PoolRun("generate", "generate-d", {}, "g")], 1, progress, lambda: 0)
        assert len(started) == 2  # the staying run took the next batch: no new process
    finally:
        close_queue(st, "s4")
        for t in threads:
            t.join(10)


def test_a_round_s_merges_go_at_once_to_no_more_staying_runs_than_a_batch(tmp_path, monkeypatch):
    """run_in_pool with three merges in stay mode: one queue, pool_runs (2) staying runs, each merge made once."""
    from contextlib import nullcontext
    from types import SimpleNamespace
    from uuid import uuid4

    from prefect.states import Completed, Running

    import tasks.plan.pool as pool
    from tasks.store.results import model_path

    monkeypatch.setattr(pool, "QUEUE_POLL_S", 0.02)
    st = Store(str(tmp_path / "store"))
    states: dict = {}
    started: list[str] = []
    threads: list[threading.Thread] = []
    made: list[str] = []

    def run_entry(entry: dict) -> tuple[str, str | None]:
        key = entry["parameters"]["key"]
        st.folder_once(model_path(key), lambda p: (made.append(key), (p / "w.bin").write_bytes(b"1")))
        return str(uuid4()), None

    def submit(client, run, pool_name) -> SimpleNamespace:
        started.append(run.name)
        rid = uuid4()
        states[rid] = Running()

        def stay() -> None:  # the run completes when its queue closes
            serve(st, run.parameters["session"], 60, 0.02, run_entry)
            states[rid] = Completed()
        t = threading.Thread(target=stay)
        t.start()
        threads.append(t)
        return SimpleNamespace(id=rid)

    client = stand_in_client(states, 1)
    monkeypatch.setattr(pool, "_submit", submit)
    monkeypatch.setattr(pool, "_client", lambda: nullcontext(client))
    compute = ComputeConfig(mode="pool", pool="gpu", pool_runs=2, pool_stay_s=60)
    calls = [StageCall("merge", f"merge-m{i}", {"key": f"{i:016x}"}, model_path(f"{i:016x}"), f"{i:016x}")
             for i in range(3)]
    try:
        batch = pool.run_in_pool(calls, compute, st.url)
        assert [r for r, _ in batch.results] == [c.result_rel for c in calls] and batch.device_s == 3.0
        assert sorted(made) == sorted(c.key for c in calls) and len(started) == 2
    finally:
        pool.end_sessions()
        for t in threads:
            t.join(10)


def test_merges_go_in_waves_each_after_the_merges_it_names():
    from tasks.config.schema import Merge
    from tasks.plan.execute import merge_waves

    def merge(name: str, *models: str) -> Merge:
        return Merge(name=name, recipe={"merge_method": "linear", "models": [
            {"model": m, "parameters": {"weight": 0.5}} for m in models]})

    a, b, c = merge("a", "x", "y"), merge("b", "a", "z"), merge("c", "x", "z")
    assert merge_waves([a, b, c]) == [[a, c], [b]]
    assert merge_waves([c]) == [[c]] and merge_waves([]) == []


def test_a_queue_closed_while_a_run_looks_is_no_error(tmp_path, monkeypatch):
    import os

    from tasks.store.store import Store

    st = Store(str(tmp_path / "store"))
    open_queue(st, "s5", "search")
    put(st, "s5", 1, "merge", "merge-a", {})
    scandir, listed, closed = os.scandir, [], []

    def closing_scandir(path=".", *args):
        """The search closes the queue after the run listed its folder, before it lists `jobs/` in it."""
        if listed and not closed:
            closed.append(path)  # once (the removal lists folders too)
            close_queue(st, "s5")
        listed.append(path)
        return scandir(path, *args)

    monkeypatch.setattr(os, "scandir", closing_scandir)
    assert look(st, "s5") == (True, [])  # what it saw before the close, and no FileNotFoundError; the next look ends
    monkeypatch.setattr(os, "scandir", scandir)
    assert look(st, "s5") == (False, [])
