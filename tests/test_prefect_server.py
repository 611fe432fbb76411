"""On a real Prefect server: deploy deployments/prefect.yaml, trigger the search deployment with compute.mode pool,
and get the same results as a local run; a pool with no worker, a missing deployment or an unreachable server
each give one clear line, fast.

One server and two process workers (pools `cpu` and `gpu`, as named in deployments/prefect.yaml) serve the
whole module; every process is stopped at the end, with whatever it started.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from tests.conftest import one_dataset_config_dict, wait_for
from tests.prefect_server import ROOT, free_port, prefect_env, start_server, start_worker, stop, wait_worker_online

pytestmark = pytest.mark.filterwarnings("ignore")
STAGES = ("merge", "finetune", "generate")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A server, a worker per pool, the deployments applied: {'api_url', 'env', 'home'}."""
    home = tmp_path_factory.mktemp("prefect-server")
    procs: list[subprocess.Popen] = []
    try:
        server, api_url = start_server(home)
        procs.append(server)
        env = prefect_env(home, api_url)
        # The worker creates its pool; three GPU-stage runs at once covers the miniature search's widest stage.
        procs += [start_worker("cpu", env, home / "worker-cpu.log", limit=1),
                  start_worker("gpu", env, home / "worker-gpu.log", limit=3)]
        for pool in ("cpu", "gpu"):
            wait_worker_online(api_url, pool)
        out = subprocess.run([sys.executable, "deployments/apply.py"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        import yaml

        listed = yaml.safe_load((ROOT / "deployments/prefect.yaml").read_text())["deployments"]
        assert f"applied {len(listed)} deployments" in out.stdout  # every deployment the file lists
        yield {"api_url": api_url, "env": env, "home": home}
    finally:
        for p in reversed(procs):
            stop(p)


def small_config(tiny_models, tiny_data, **compute) -> dict:
    """The miniature search cut to one dataset and no held-out check (the pool run costs ~10 s per stage run)."""
    return one_dataset_config_dict(tiny_models, tiny_data) | ({"compute": compute} if compute else {})


def final_run(client, run_id, timeout_s: float):
    """The flow run `run_id` once its state is final, polled each second; fail after `timeout_s`."""
    seen = {}

    def final() -> bool:
        seen["run"] = client.read_flow_run(run_id)
        return seen["run"].state.is_final()

    wait_for(final, timeout_s, lambda: f"run {seen['run'].name} to end (still {seen['run'].state.name})", poll_s=1)
    return seen["run"]


def below(client, parents: list) -> list:
    """Every flow run under the runs `parents`: those started by their task runs (stage runs, subflows), and theirs."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    if not parents:
        return []
    tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=parents)),
                                  limit=200)
    found = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[t.id for t in tasks])), limit=200) if tasks else []
    return found + below(client, [r.id for r in found])


@pytest.mark.parametrize("stay_s", [60.0, 0.0], ids=["staying-runs", "a-run-per-batch"])
def test_pool_run_from_the_search_deployment_matches_local(stack, tiny_models, tiny_data, tmp_path, stay_s):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.search import search
    from tasks.config.schema import SearchConfig
    from tasks.store.store import Store

    with temporary_settings({PREFECT_API_URL: stack["api_url"]}):
        # The same config twice: through the search deployment with GPU stages on the pool, and meanwhile
        # in this process with compute.mode local.
        t0 = time.monotonic()
        run = run_deployment("search/ui", timeout=0, parameters={
            "config": small_config(tiny_models, tiny_data, mode="pool", pool="gpu", pool_stay_s=stay_s),
            "store": str(tmp_path / "pool")})
        local = search(SearchConfig.model_validate(small_config(tiny_models, tiny_data)), str(tmp_path / "local"))
        with get_client(sync_client=True) as client:
            run = final_run(client, run.id, 900 - (time.monotonic() - t0))  # 900 s from t0, at load 15 too
            assert run.state.is_completed(), run.state.message
            children = below(client, [run.id])  # its stage runs, and a staying run's subflows
            client_tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=[r.id for r in children])), limit=200)
            jobs = {t.name: t for t in client_tasks}
            progress = [a for a in client.read_artifacts() if a.type == "progress"]

    # Readable names: every stage run a child of the search run and finished; a batch's runs (one here: the pool's
    # one worker) hold a task run per job, named as the job.
    assert run.name == "search-mini"
    assert children and all(r.state.is_completed() for r in children), [(r.name, r.state.name) for r in children]
    assert {"merge-alpha-beta", "finetune-extraction", "generate-extraction"} <= {r.name for r in children}
    stages = {"merge-alpha-beta", *(f"{s}-{m}-extraction" for s in ("finetune", "generate")
                                    for m in ("alpha", "beta", "alpha-beta"))}
    assert stages <= set(jobs) and all(jobs[name].state.is_completed() for name in stages)
    staying = [r for r in children if r.name.startswith("stages-")]
    if stay_s:  # one run stayed for the whole search (the pool's one worker), ended with it; its queue is gone
        assert [r.name for r in staying] == ["stages-search-mini-1"], [r.name for r in children]
        assert not any((tmp_path / "pool" / ".queue").glob("*/*"))
        in_staying = {t.id for t in client_tasks if t.flow_run_id == staying[0].id}
        assert all(r.parent_task_run_id in in_staying for r in children if r.name.split("-")[0] in STAGES)
    else:
        assert not staying
    mine = [a for a in progress if a.flow_run_id == run.id]
    # one progress artifact for the whole run (each batch of stage jobs points it at itself), finished at 100%
    assert len(mine) == 1 and mine[0].data == 100.0, [(a.description, a.data) for a in mine]

    # Same results: outputs under the same content keys with the same text, and the same ratings.
    pool_store, local_store = Store(str(tmp_path / "pool")), Store(str(tmp_path / "local"))
    local_outputs = sorted(p.name for p in (tmp_path / "local" / "outputs").iterdir())
    assert sorted(p.name for p in (tmp_path / "pool" / "outputs").iterdir()) == local_outputs
    for name in local_outputs:
        cols = ["example_id", "contender", "output", "completion_tokens"]
        pd.testing.assert_frame_equal(pool_store.read_parquet(f"outputs/{name}")[cols],
                                      local_store.read_parquet(f"outputs/{name}")[cols])
    pool_run = pool_store.read_text("runs/LATEST").strip()
    pd.testing.assert_frame_equal(pool_store.read_parquet(f"runs/{pool_run}/ratings.parquet"),
                                  local_store.read_parquet(f"runs/{local['run_id']}/ratings.parquet"))
    stage_rows = {r["stage"]: r for r in pool_store.read_json(f"runs/{pool_run}/stages.json")}
    assert stage_rows["finetune:extraction"]["computed"] == 3 and stage_rows["merges"]["computed"] == 1
    # GPU time in pool mode is the stage runs' time on the worker, as the server recorded it, not the stage's wall
    # time (which includes queueing); the local run has no such figure and counts its wall time.
    ft = stage_rows["finetune:extraction"]
    ran = sum(r.total_run_time.total_seconds() for r in children if r.name.startswith("finetune-"))
    assert ft["device_s"] == pytest.approx(ran, abs=0.01) and ft["device_s"] > 0
    assert "device_s" not in {r["stage"]: r for r in local["stages"]}["finetune:extraction"]


def test_pool_problems_give_one_line_and_a_hint(stack, tiny_models, tiny_data, tmp_path, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    with temporary_settings({PREFECT_API_URL: stack["api_url"]}), get_client(sync_client=True) as client:
        # `idle`: a pool with the stage deployments but no worker; `bare`: a pool with nothing deployed to it.
        for name in ("idle", "bare"):
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        for flow in ("stages", *STAGES):
            d = client.read_deployment_by_name(f"{flow}/gpu")
            client.create_deployment(flow_id=d.flow_id, name="idle", work_pool_name="idle", entrypoint=d.entrypoint,
                                     path=d.path, pull_steps=d.pull_steps)
    cases = {
        "idle": "work pool 'idle' has no worker online",
        "bare": "no deployment of the 'stages' stage flow on work pool 'bare'",
        "nopool": "work pool 'nopool' (compute.pool) does not exist",
    }
    down = f"http://127.0.0.1:{free_port()}/api"
    for pool, url, expected in [*((p, stack["api_url"], e) for p, e in cases.items()),
                                ("idle", down, f"cannot reach the Prefect server at {down}"),
                                ("idle", None, "compute.mode pool needs a Prefect server, and PREFECT_API_URL is not set")]:
        cfg = tmp_path / f"{pool}.yaml"
        cfg.write_text(yaml.safe_dump(small_config(tiny_models, tiny_data, mode="pool", pool=pool)))
        t0 = time.monotonic()
        with temporary_settings({PREFECT_API_URL: url}):
            assert main(["--config", str(cfg), "--store", str(tmp_path / "store")]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {expected}") and "hint: " in errors[0], err
        assert "Traceback" not in err and time.monotonic() - t0 < 120, err  # seconds, not a hang (at load 15 too)


def test_server_that_refuses_the_credentials_is_named():
    """A server with an auth string, a client without it: one line saying so (health stays open, as Prefect's)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.core.errors import UserError
    from tasks.plan.pool import check_server

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200 if self.path.endswith("/health") else 401)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):  # quiet
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{server.server_port}/api"}):
            with pytest.raises(UserError, match=r"refused this client \(401\); hint: set PREFECT_API_AUTH_STRING"):
                check_server()
    finally:
        server.shutdown()


def test_waiting_on_stage_runs_never_hangs(monkeypatch):
    """Runs queued on a pool whose workers are gone end the wait with a hint; a failed stage run is named."""
    from datetime import timedelta
    from types import SimpleNamespace
    from uuid import uuid4

    from prefect.states import Completed, Failed, Running, Scheduled

    import tasks.plan.pool as compute
    from tasks.core.errors import UserError

    monkeypatch.setattr(compute, "POLL_S", 0.01)
    monkeypatch.setattr(compute, "NO_WORKER_GRACE_S", 0.2)
    names = [f"finetune-d-{i}of2" for i in (1, 2)]

    class Client:
        def __init__(self, states):
            self.states = states

        def read_flow_run(self, run_id):
            return SimpleNamespace(id=run_id, state=self.states[run_id], total_run_time=timedelta(seconds=1.5))

        def read_workers_for_work_pool(self, pool):
            return []

    ids = {n: uuid4() for n in names}
    runs = {n: SimpleNamespace(id=i) for n, i in ids.items()}
    progress = compute.Progress("finetune on d", 2)  # outside a flow run: no artifact
    stored = lambda: 0  # noqa: E731 - the batch's results in the store (progress only)
    stuck = Client({ids[names[0]]: Scheduled(), ids[names[1]]: Running()})
    with pytest.raises(UserError, match=r"work pool 'gpu' has had no worker online .* 1 stage run\(s\) wait; hint: "
                                        r"prefect worker start --pool gpu"):
        compute._wait(stuck, runs, "gpu", progress, stored)
    broken = Client({ids[names[0]]: Completed(), ids[names[1]]: Failed(message="CUDA out of memory")})
    with pytest.raises(RuntimeError, match=r"finetune-d-2of2 \(Failed: CUDA out of memory\)"):
        compute._wait(broken, runs, "gpu", progress, stored)
    # Completed runs: each one's time in the Running state, which the budget counts as GPU time (not the wait)
    done = Client({i: Completed() for i in ids.values()})
    assert compute._wait(done, runs, "gpu", progress, stored) == {n: 1.5 for n in names}


def test_the_ui_form_starts_from_the_demo_and_a_wrong_path_fails_in_one_line(stack, tiny_models, tiny_data, tmp_path):
    """The deployed search/ui form holds the demo's values; a wrong dataset path typed into it ends the run Failed
    with the command line's one line as its message, and no traceback anywhere in the run's log."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.config.schema import load_config

    cfg = small_config(tiny_models, tiny_data)
    cfg["datasets"][0]["train"] = "no/such/train.jsonl"  # relative: the worker's working folder, the repository root
    with temporary_settings({PREFECT_API_URL: stack["api_url"]}), get_client(sync_client=True) as client:
        deployed = client.read_deployment_by_name("search/ui").parameters["config"]
        assert deployed["finetune"] == load_config(ROOT / "configs" / "demo.yaml").finetune.model_dump(mode="json")
        run = run_deployment("search/ui", timeout=0, parameters={"config": cfg, "store": str(tmp_path / "store")})
        run = final_run(client, run.id, 300)
        message = "no/such/train.jsonl: dataset file not found"
        assert run.state.is_failed() and run.state.message == message, run.state
        logged = lambda: "\n".join(log.message for log in client.read_logs(  # noqa: E731
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))))
        # The run's process sends its log lines as it exits, after its final state: they come a moment later.
        wait_for(lambda: f"error: {message}" in logged(), 60, lambda: f"the run's error line in its log:\n{logged()}",
                 poll_s=0.5)
        text = logged()
    assert f"error: {message}" in text and "Traceback" not in text, text
