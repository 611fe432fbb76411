"""Where a stage run's time goes on a work pool: the miniature search in pool mode over moto's S3 server, and each
stage run's timeline as the Prefect server recorded it.

python bench/pool_overhead.py [--workers 1] [--limit 1] [--pool-runs 1000,auto] [--stay-s 0]

For every stage flow run (merge-, finetune-, generate-...): seconds queued (Scheduled to Pending: the worker's poll),
starting (Pending to Running: the worker starts `python -m prefect.engine`, which imports the flow's module, i.e.
torch, transformers and Prefect, and loads the flow), before its first task (fetching `store:` inputs), in its tasks
(the stage's own work: claim, model load, training or generation, upload), and after (task end to Completed); with one
worker slot, also the gap from a run's end to the next one's Pending (the process exiting, the next poll). The search's
wall time is printed beside. Each --pool-runs value (compute.pool_runs: 1000 sends a run per job, auto a run per
worker slot) and --stay-s value (compute.pool_stay_s: 0 sends a run per batch; over 0, runs of the `stages` flow stay
for the search and run each batch as a subflow, whose timeline is listed) is one search on a fresh prefix of the
bucket, one after the other on the same server and workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from _machine import header, table  # noqa: E402

BUCKET = "basesearch-overhead"


def mini_config(work: Path) -> dict:
    """The tests' one-dataset miniature search (two tiny models, one merge, extraction) with its files in `work`."""
    from tasks.demo.data import make_split
    from tasks.demo.zoo import build_tokenizer
    from tests.conftest import make_tiny_model, one_dataset_config_dict, write_jsonl

    tok = build_tokenizer()
    models = {n: make_tiny_model(work / n, seed, tok) for seed, n in enumerate(["alpha", "beta"])}
    data = {}
    for name in ("extraction",):
        train, test = make_split(name, 16, 6)
        data[name] = (write_jsonl(work / f"{name}_train.jsonl", train), write_jsonl(work / f"{name}_test.jsonl", test))
    return one_dataset_config_dict(models, data | {"classification": data["extraction"], "orders": data["extraction"]})


def timelines(api_url: str, seen: set) -> list[dict]:
    """Each stage flow run's phases in seconds, from its state history and its task runs, in the order they ran
    (those whose ids are not in `seen`, which gets them)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    rows = []
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for run in client.read_flow_runs():
            if run.parent_task_run_id is None or run.id in seen:  # the search itself, or an earlier search's
                continue
            seen.add(run.id)
            states = {s.type.value: s.timestamp for s in client.read_flow_run_states(run.id)}
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            if not any(t.start_time and t.end_time for t in tasks):  # a staying run that found nothing to take
                continue
            t0 = min(t.start_time for t in tasks if t.start_time)
            t1 = max(t.end_time for t in tasks if t.end_time)
            # a subflow (a staying run's) is never scheduled, and may skip Pending: it runs in its parent's process
            states.setdefault("PENDING", states["RUNNING"])
            states.setdefault("SCHEDULED", states["PENDING"])
            rows.append({"name": run.name, "scheduled": states["SCHEDULED"], "pending": states["PENDING"],
                         "running": states["RUNNING"], "task_start": t0, "task_end": t1,
                         "completed": states["COMPLETED"]})
    rows.sort(key=lambda r: r["pending"])
    for prev, row in zip([None, *rows], rows):
        sec = lambda a, b: (row[b] - row[a]).total_seconds()  # noqa: E731
        row |= {"queued s": sec("scheduled", "pending"), "starting s": sec("pending", "running"),
                "before task s": sec("running", "task_start"), "task s": sec("task_start", "task_end"),
                "after task s": sec("task_end", "completed"),
                "to next pending s": (row["pending"] - prev["completed"]).total_seconds() if prev else None}
    return rows


def main() -> None:
    """Run the miniature search in pool mode over S3 and print each stage run's phases."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--limit", type=int, default=1, help="runs at once per worker")
    parser.add_argument("--pool-runs", default="1000,auto", help="compute.pool_runs values, one search each")
    parser.add_argument("--stay-s", default="0", help="compute.pool_stay_s values, one search each per --pool-runs")
    args = parser.parse_args()
    import yaml

    from tests.prefect_server import prefect_env, run_search, start, start_server, stop, wait_worker_online
    from tests.s3_server import make_bucket, s3_env, s3_server

    work = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    procs: list[subprocess.Popen] = []
    try:
        cfg = mini_config(work) | {"compute": {"mode": "pool", "pool": "gpu"}}
        with s3_server(work) as endpoint:
            make_bucket(endpoint, BUCKET)
            (work / "prefect").mkdir()
            server, api_url = start_server(work / "prefect")
            procs.append(server)
            env = prefect_env(work / "prefect", api_url) | s3_env(endpoint)
            for i in range(args.workers):
                own = work / f"worker-{i}"
                (own / "tmp").mkdir(parents=True)
                procs.append(start([sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu", "--type",
                                    "process", "--limit", str(args.limit)],
                                   env | {"BASESEARCH_CACHE_DIR": str(own / "cache"), "TMPDIR": str(own / "tmp")},
                                   own / "worker.log", cwd=own))
            wait_worker_online(api_url, "gpu")
            out = subprocess.run([sys.executable, "deployments/apply.py"], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=600)
            if out.returncode:
                raise SystemExit(f"error: applying the deployments failed: {out.stderr[-500:]}")
            seen: set = set()
            results = []
            for runs, stay in [(r, s) for r in args.pool_runs.split(",") for s in args.stay_s.split(",")]:
                cfg["compute"] |= {"pool_runs": int(runs) if runs.isdigit() else runs, "pool_stay_s": float(stay)}
                (work / "pool.yaml").write_text(yaml.safe_dump(cfg))
                t0 = time.perf_counter()
                rc, log = run_search(["--config", str(work / "pool.yaml"), "--store",
                                      f"s3://{BUCKET}/{uuid.uuid4().hex[:6]}"],
                                     env | {"BASESEARCH_CACHE_DIR": str(work / f"search-cache-{runs}-{stay}")},
                                     work / "search.log", timeout_s=1800)
                wall = time.perf_counter() - t0
                if rc:
                    raise SystemExit(f"error: the search exited {rc}: {log[-2000:]}")
                results.append((f"{runs}, compute.pool_stay_s {stay}", wall, timelines(api_url, seen)))
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(work, ignore_errors=True)
    cols = ["name", "queued s", "starting s", "before task s", "task s", "after task s", "to next pending s"]
    for runs, wall, rows in results:
        fmt = [{c: (f"{r[c]:.2f}" if isinstance(r[c], float) else r[c] or "") for c in cols} for r in rows]
        summary = {c: f"{median(r[c] for r in rows if r[c] is not None):.2f}" for c in cols[1:]}
        print(f"compute.pool_runs {runs}:")
        print(table(fmt + [{"name": "median"} | summary], cols))
        total = {c: sum(r[c] or 0.0 for r in rows) for c in cols[1:]}
        print(f"{len(rows)} stage runs; search wall {wall:.1f} s; summed: " +
              ", ".join(f"{c} {v:.1f}" for c, v in total.items()) + "\n")
    print(header())


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
