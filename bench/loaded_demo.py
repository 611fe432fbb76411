"""The README's first command on a busy machine: `python -m flows.search` beside N busy-loop processes.

    python bench/loaded_demo.py --busy 3            # first run on a fresh store, then the unchanged re-run
    python bench/loaded_demo.py --busy 6 --rerun-only --store DIR
    python bench/loaded_demo.py --busy 8 --command "python -m pytest"   # any command (the README's test one)

Each busy loop is `python -c "while True: pass"`, one runnable process each: with B of them on C cores the
search gets about C / (B + its own runnable processes) of the CPU. Prints, per run: exit code, wall seconds,
the wall and CPU seconds (of the search's own process) at its first line of output, and the 1-minute load
average sampled every 2 s while it ran (min / median / max). The first-line CPU is read from /proc at the
moment the first byte arrives.
"""

from __future__ import annotations

import argparse
import os
import select
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._machine import header  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (not its children), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy(n: int) -> list[subprocess.Popen]:
    """n busy-loop processes, each in its own process group."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(n)]


def run(cmd: list[str], log: Path) -> dict[str, float]:
    """One run of a command: exit code, wall s, first-line wall and CPU s, load average samples."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    first_wall = first_cpu = None
    loads: list[float] = []
    next_sample = t0
    out = bytearray()
    assert proc.stdout is not None
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            if first_wall is None:
                first_wall, first_cpu = time.monotonic() - t0, cpu_seconds(proc.pid)
            out += chunk
        if time.monotonic() >= next_sample:
            loads.append(os.getloadavg()[0])
            next_sample += 2.0
    rc = proc.wait()
    log.write_bytes(bytes(out))
    return {"rc": rc, "wall": time.monotonic() - t0, "first_wall": first_wall or float("nan"),
            "first_cpu": first_cpu or float("nan"), "load_min": min(loads), "load_med": statistics.median(loads),
            "load_max": max(loads)}


def main() -> None:
    """Start the busy loops, wait for the load to build, run the search (and the re-run), print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=3, help="busy-loop processes beside the search")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds for the load average to build first")
    ap.add_argument("--config", default=None, help="search config (default: the demo)")
    ap.add_argument("--store", default=None, help="store folder (default: a fresh temporary one)")
    ap.add_argument("--rerun-only", action="store_true", help="only the unchanged re-run (the store is filled)")
    ap.add_argument("--command", default=None, help="run this shell-split command instead of the search")
    args = ap.parse_args()
    store = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="loaded-demo-")) / "store"
    loops = busy(args.busy)
    rows = []
    try:
        time.sleep(args.warmup)
        logs = Path(tempfile.mkdtemp(prefix="loaded-demo-logs-"))
        search = [sys.executable, "-m", "flows.search", "--store", str(store)] + (
            ["--config", args.config] if args.config else [])
        names = ["command"] if args.command else ["re-run"] if args.rerun_only else ["first run", "re-run"]
        for name in names:
            cmd = shlex.split(args.command) if args.command else search
            r = run(cmd, logs / f"{name.replace(' ', '-')}.log")
            rows.append((name, r))
            if r["rc"] != 0:
                print((logs / f"{name.replace(' ', '-')}.log").read_text()[-3000:])
                break
    finally:
        for p in loops:
            os.killpg(p.pid, signal.SIGKILL)
    print(header())
    print(f"busy loops: {args.busy}; store {store}; logs {logs}")
    print(f"{'run':<10} {'rc':>3} {'wall s':>8} {'1st line wall s':>16} {'1st line cpu s':>15} "
          f"{'load min':>9} {'median':>7} {'max':>6}")
    for name, r in rows:
        print(f"{name:<10} {r['rc']:>3} {r['wall']:>8.1f} {r['first_wall']:>16.2f} {r['first_cpu']:>15.2f} "
              f"{r['load_min']:>9.2f} {r['load_med']:>7.2f} {r['load_max']:>6.2f}")


if __name__ == "__main__":
    main()
