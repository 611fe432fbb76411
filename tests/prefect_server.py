"""Helpers for tests that need real Prefect processes: a server on loopback and process workers.

Every process starts in its own process group, so that stopping it also stops what it started (a worker's
flow-run subprocesses, a CLI's temporary server).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(home: Path, api_url: str | None) -> dict[str, str]:
    """Environment for Prefect processes: own PREFECT_HOME, SQLite, no analytics, quick polling, offline HF."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5", "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "BASESEARCH_POLL_SECONDS": "0.5", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """Start a process in a new process group, its output in `log`."""
    fh = open(log, "ab")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 10.0) -> None:
    """Stop a process, its process group and every descendant (some run in their own session): `sig`, then SIGKILL."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)  # before the parent dies and they are orphaned
    except psutil.NoSuchProcess:
        children = []
    for signum in (sig, signal.SIGKILL):
        try:
            os.killpg(proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
        for child in children:
            try:
                child.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
        try:
            proc.wait(wait_s)  # Popen reaps its own child, so returncode tells how it ended
        except subprocess.TimeoutExpired:
            pass
        _, children = psutil.wait_procs(children, timeout=wait_s if signum == sig else 5)
        if proc.returncode is not None and not children:
            return


def run_search(args: list[str], env: dict[str, str], log: Path, timeout_s: float = 600) -> tuple[int, str]:
    """`python -m flows.search ARGS` in its own process group, stopped with all it started whatever happens (a
    plain subprocess.run would leave the temporary server it started running after a timeout): (exit code, output)."""
    proc = start([sys.executable, "-m", "flows.search", *args], env, log)
    try:
        rc = proc.wait(timeout=timeout_s)
    finally:
        stop(proc, wait_s=5)
    return rc, log.read_text()


def group_alive(pgid: int) -> bool:
    """True while any process of a process group is still alive."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_while_running(proc: subprocess.Popen, log: Path, cond: Callable[[], bool], timeout_s: float, what: str,
                       poll_s: float = 0.05) -> None:
    """wait_for `cond` while `proc` runs: fail at once when the process ends first, or after `timeout_s`, either
    way with the tail of its log."""
    def check() -> bool:
        if cond():
            return True
        assert proc.poll() is None, f"process ended before {what}:\n{log.read_text()[-3000:]}"
        return False

    wait_for(check, timeout_s, lambda: f"{what}:\n{log.read_text()[-3000:]}", poll_s)


def wait_healthy(api_url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 600.0) -> None:
    """Wait until the server answers /health; fail with its log when it exits or takes too long."""
    def healthy() -> bool:
        try:
            return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_while_running(proc, log, healthy, timeout_s, "the prefect server to answer /health", poll_s=0.5)


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    """A real `prefect server start` on 127.0.0.1 and a free port, with SQLite in `home`: (process, API URL)."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log = home / "server.log"
    proc = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 prefect_env(home, None), log)
    try:
        wait_healthy(api_url, proc, log)
    except Exception:
        stop(proc)
        raise
    return proc, api_url


def start_worker(pool: str, env: dict[str, str], log: Path, limit: int = 2) -> subprocess.Popen:
    """A process worker on `pool` (created as a process pool if missing), running at most `limit` runs at once."""
    return start([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                  "--limit", str(limit)], env, log)


def wait_worker_online(api_url: str, pool: str, timeout_s: float = 600.0) -> None:
    """Wait until `pool` has a worker online."""
    def online() -> bool:
        r = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, timeout=5)
        return r.status_code == 200 and any(w.get("status") == "ONLINE" for w in r.json())

    wait_for(online, timeout_s, f"a worker online on pool {pool}", poll_s=0.5)


def slowed_search(prefix: str, seconds: float = 1.0) -> str:
    """Source for `python -c`: the search CLI with every store Parquet write under `prefix` slowed by `seconds`,
    so that a test can catch the search in that stage."""
    return f"""
import sys, time
from tasks.store.store import Store
write = Store.write_parquet
def slow(self, rel, df):
    if rel.startswith({prefix!r}):
        time.sleep({seconds})
    return write(self, rel, df)
Store.write_parquet = slow
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""
