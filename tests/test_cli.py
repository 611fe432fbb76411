"""The command line on a slow or broken machine: a temporary server slower than Prefect's own 20 s timeout still
runs the search; one that cannot start is one line; --help and a config error import nothing heavy."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import one_dataset_config_dict
from tests.prefect_server import ROOT, prefect_env, run_search

pytestmark = pytest.mark.filterwarnings("ignore")

# Put in a folder on PYTHONPATH as sitecustomize.py: it runs first in every Python process, and acts only in
# Prefect's temporary server (`python -m uvicorn ... prefect.server.api.server:create_app`).
SERVER_HOOK = """
import os, time
argv = open("/proc/self/cmdline", "rb").read().split(b"\\0")
if b"uvicorn" in argv:
    if os.environ.get("TEST_SERVER_EXIT"):
        os._exit(int(os.environ["TEST_SERVER_EXIT"]))
    time.sleep(float(os.environ.get("TEST_SERVER_DELAY_S", "0")))
"""


def hooked_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The CLI's environment (no PREFECT_API_URL: it starts the temporary server) with the server hook on."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SERVER_HOOK)
    home = tmp_path / "prefect"
    home.mkdir(exist_ok=True)
    env = prefect_env(home, None)
    env["PYTHONPATH"] = f"{hook}:{env['PYTHONPATH']}"
    return env | extra


def small_config(tmp_path: Path, tiny_models, tiny_data) -> Path:
    """The miniature search cut to one dataset, no merge and no validation: the quickest real search."""
    cfg = one_dataset_config_dict(tiny_models, tiny_data)
    cfg["merges"] = []
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_server_slower_than_prefects_default_timeout_still_runs(tmp_path, tiny_models, tiny_data):
    # Prefect waits 20 s for its temporary server by default; this one takes 25 s before it even imports.
    env = hooked_env(tmp_path, TEST_SERVER_DELAY_S="25")
    config = small_config(tmp_path, tiny_models, tiny_data)
    rc, out = run_search(["--config", str(config), "--store", str(tmp_path / "store")], env, tmp_path / "cli.log", 600)
    assert rc == 0, out[-3000:]
    assert "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith("report: ")


@pytest.mark.parametrize("code", ["1", "3"])  # 3: uvicorn's "port taken", but also its "startup failed"
def test_server_that_cannot_start_is_one_line(tmp_path, tiny_models, tiny_data, code):
    env = hooked_env(tmp_path, TEST_SERVER_EXIT=code)
    config = small_config(tmp_path, tiny_models, tiny_data)
    t0 = time.monotonic()
    rc, out = run_search(["--config", str(config), "--store", str(tmp_path / "store")], env, tmp_path / "cli.log", 300)
    assert rc == 1, out[-3000:]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"temporary server exited with code {code}" in errors[0] and "PREFECT_API_URL" in errors[0]
    assert time.monotonic() - t0 < 240  # noticed when the process died, not after the 10-minute start timeout
    assert not (tmp_path / "store" / "adapters").exists()  # nothing was trained for a run that could not run


def test_prefect_home_that_cannot_be_made_is_one_line(tmp_path, tiny_models, tiny_data):
    (tmp_path / "a-file").write_text("")
    env = hooked_env(tmp_path, PREFECT_HOME=str(tmp_path / "a-file" / "home"))
    config = small_config(tmp_path, tiny_models, tiny_data)
    rc, out = run_search(["--config", str(config), "--store", str(tmp_path / "store")], env, tmp_path / "cli.log", 300)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert rc == 1 and "Traceback" not in out, out[-3000:]
    assert errors == [f"error: PREFECT_HOME {tmp_path / 'a-file' / 'home'}: cannot create it (Not a directory); set "
                      "PREFECT_HOME to a writable folder"]


def test_a_prefect_server_that_is_gone_is_one_line(tmp_path, tiny_models, tiny_data):
    """PREFECT_API_URL persisted for the UI, server since stopped: one line with both ways out, nothing trained."""
    import socket

    with socket.socket() as s:  # a port nothing listens on once this is closed
        s.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    env = hooked_env(tmp_path, PREFECT_API_URL=gone)
    config = small_config(tmp_path, tiny_models, tiny_data)
    rc, out = run_search(["--config", str(config), "--store", str(tmp_path / "store")], env, tmp_path / "cli.log", 300)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot reach the Prefect server at {gone}")
    assert "prefect server start" in errors[0] and "prefect config unset PREFECT_API_URL" in errors[0]
    assert not (tmp_path / "store" / "adapters").exists()


@pytest.mark.parametrize("args", [["--help"], ["--config", "CONFIG"]])
def test_help_and_config_errors_import_nothing_heavy(tmp_path, args):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncandidates: []\ndatasets: []\n")
    args = [str(bad) if a == "CONFIG" else a for a in args]
    code = ("import sys\nfrom flows.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    rc = e.code\nheavy = sorted(m for m in ('torch', 'transformers', 'prefect', 'mergekit', 'pandas') "
            "if m in sys.modules)\nprint('HEAVY', heavy, 'RC', rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "HEAVY [] RC" in proc.stdout, proc.stdout + proc.stderr
    if args[0] == "--help":
        assert "usage: python -m flows.search" in proc.stdout and "RC 0" in proc.stdout
    else:
        assert "RC 2" in proc.stdout and proc.stderr.strip().startswith(f"error: {bad}:2: candidates")
