"""Ctrl-C in the middle of a search: the command leaves at once with a one-line message and exit status 130,
leaves no process behind, and keeps every finished result (a re-run reuses it)."""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil
import pytest
import yaml

from tests.conftest import mini_config_dict
from tests.prefect_server import prefect_env, run_search, slowed_search, start, stop

pytestmark = pytest.mark.filterwarnings("ignore")

# The search, with every outputs write slowed down, so that it is still running when Ctrl-C comes.
SLOW_OUTPUTS = slowed_search("outputs/")


def test_ctrl_c_leaves_at_once_and_keeps_finished_results(tiny_models, tiny_data, tmp_path):
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["datasets"] = cfg["datasets"][:1]
    cfg.pop("validation")
    config = tmp_path / "mini.yaml"
    config.write_text(yaml.safe_dump(cfg))
    store = tmp_path / "store"
    env = prefect_env(tmp_path, None)  # no server: the CLI starts Prefect's temporary one
    args = ["--config", str(config), "--store", str(store)]
    log = tmp_path / "search.log"
    proc = start([sys.executable, "-c", SLOW_OUTPUTS, *args], env, log)  # its own process group, like a terminal's
    try:
        deadline = time.monotonic() + 600  # a loaded machine: the temporary server alone took 34 s
        while not (store / "outputs").is_dir() or not any((store / "outputs").glob("*.parquet")):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        family = psutil.Process(proc.pid).children(recursive=True)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group (start() made it a new one)
        rc = proc.wait(timeout=30)
        waited = time.monotonic() - sent
    finally:
        stop(proc, signal.SIGKILL)
    text = log.read_text()
    # It leaves at once: Prefect's own crash handling, retrying the dead server, took a minute or more.
    assert rc == 130 and waited < 30, (rc, waited, text[-3000:])
    assert "interrupted: every result finished before it is in the store" in text and "Traceback" not in text
    time.sleep(1)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]  # server, workers gone
    adapters = [p.name for p in (store / "adapters").iterdir() if not p.name.startswith(".")]
    assert len(adapters) == 3  # the fine-tunes had finished; they stay

    rc, out = run_search(args, env, tmp_path / "rerun.log")
    assert rc == 0, out[-3000:]
    run = (store / "runs" / "LATEST").read_text().strip()
    stages = {s["stage"]: s for s in yaml.safe_load((store / "runs" / run / "stages.json").read_text())}
    assert stages["finetune:extraction"]["computed"] == 0 and stages["finetune:extraction"]["reused"] == 3
