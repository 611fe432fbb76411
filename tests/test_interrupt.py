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

from tests.conftest import one_dataset_config_dict, wait_for
from tests.prefect_server import prefect_env, run_search, slowed_search, start, stop, wait_while_running

pytestmark = pytest.mark.filterwarnings("ignore")

# The search, with every outputs write slowed down, so that it is still running when Ctrl-C comes.
SLOW_OUTPUTS = slowed_search("outputs/")


def left_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of `procs` still running (zombies, waiting to be reaped, count as ended)."""
    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in procs if running(p)]


def test_ctrl_c_leaves_at_once_and_keeps_finished_results(tiny_models, tiny_data, tmp_path):
    config = tmp_path / "mini.yaml"
    config.write_text(yaml.safe_dump(one_dataset_config_dict(tiny_models, tiny_data)))
    store = tmp_path / "store"
    env = prefect_env(tmp_path, None)  # no server: the CLI starts Prefect's temporary one
    args = ["--config", str(config), "--store", str(store)]
    log = tmp_path / "search.log"
    proc = start([sys.executable, "-c", SLOW_OUTPUTS, *args], env, log)  # its own process group, like a terminal's
    try:
        # 600 s: a loaded machine, where the temporary server alone took 34 s
        wait_while_running(proc, log, lambda: any((store / "outputs").glob("*.parquet")), 600, "a first outputs file")
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
    # the server and workers gone, within the 30 s the command itself has to leave
    wait_for(lambda: not left_running(family), 30, lambda: f"the search's processes to end: {left_running(family)}")
    adapters = [p.name for p in (store / "adapters").iterdir() if not p.name.startswith(".")]
    assert len(adapters) == 3  # the fine-tunes had finished; they stay

    rc, out = run_search(args, env, tmp_path / "rerun.log")
    assert rc == 0, out[-3000:]
    run = (store / "runs" / "LATEST").read_text().strip()
    stages = {s["stage"]: s for s in yaml.safe_load((store / "runs" / run / "stages.json").read_text())}
    assert stages["finetune:extraction"]["computed"] == 0 and stages["finetune:extraction"]["reused"] == 3
