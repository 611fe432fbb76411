"""Workers that share no disk: a Prefect server, two process workers each in its own empty folder with its own cache
and temp folder, and a search in pool mode whose store is a bucket on moto's S3 server; nothing in common but the S3
endpoint (and the code). The ratings equal a local run's."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pandas as pd
import pytest
import yaml

from tests.conftest import one_dataset_config_dict
from tests.prefect_server import ROOT, prefect_env, run_search, start, start_server, stop, wait_worker_online
from tests.s3_server import make_bucket, s3_env, s3_server

pytestmark = pytest.mark.filterwarnings("ignore")
BUCKET = "basesearch-pool"


def test_two_workers_sharing_only_a_bucket_rate_as_a_local_run(tiny_models, tiny_data, tmp_path):
    from flows.cli import main
    from tasks.store.store import Store

    cfg = one_dataset_config_dict(tiny_models, tiny_data)
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(cfg | {"compute": {"mode": "pool", "pool": "gpu"}}))
    assert main(["--config", str(tmp_path / "local.yaml"), "--store", str(tmp_path / "local")]) == 0
    procs: list[subprocess.Popen] = []
    with s3_server(tmp_path) as endpoint:
        make_bucket(endpoint, BUCKET)
        try:
            home = tmp_path / "prefect"
            home.mkdir()
            server, api_url = start_server(home)
            procs.append(server)
            env = prefect_env(home, api_url) | s3_env(endpoint)
            for name in ("a", "b"):  # each in its own empty folder, with its own cache and temp folder
                own = tmp_path / f"worker-{name}"
                (own / "tmp").mkdir(parents=True)
                procs.append(start([sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu", "--type",
                                    "process", "--limit", "2"],
                                   env | {"BASESEARCH_CACHE_DIR": str(own / "cache"), "TMPDIR": str(own / "tmp")},
                                   own / "worker.log", cwd=own))
            wait_worker_online(api_url, "gpu")
            out = subprocess.run([sys.executable, "deployments/apply.py"], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=600)
            assert out.returncode == 0, out.stdout + out.stderr
            url = f"s3://{BUCKET}/{uuid.uuid4().hex[:6]}"
            search_env = env | {"BASESEARCH_CACHE_DIR": str(tmp_path / "search-cache")}
            rc, log = run_search(["--config", str(tmp_path / "pool.yaml"), "--store", url], search_env,
                                 tmp_path / "search.log", timeout_s=900)
            assert rc == 0, log[-3000:]
            import os

            old = {k: os.environ.get(k) for k in s3_env(endpoint)}
            os.environ.update(s3_env(endpoint))
            try:
                remote = Store(url)
                run = remote.read_text("runs/LATEST").strip()
                pooled = remote.read_parquet(f"runs/{run}/ratings.parquet")
                stages = {r["stage"]: r for r in remote.read_json(f"runs/{run}/stages.json")}
            finally:
                for k, v in old.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            local = Store(str(tmp_path / "local"))
            pd.testing.assert_frame_equal(
                pooled, local.read_parquet(f"runs/{local.read_text('runs/LATEST').strip()}/ratings.parquet"))
            assert stages["finetune:extraction"]["computed"] == 3
            worked = [(tmp_path / f"worker-{n}" / "cache" / "adapters").is_dir() for n in ("a", "b")]
            assert any(worked), "no worker made an adapter"
        finally:
            for p in reversed(procs):
                stop(p)
