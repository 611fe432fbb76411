"""Wall time of the demo search per stage: a first run on an empty store, then a second run with nothing changed.

    python bench/demo_stages.py [--config configs/demo.yaml]

Runs `python -m flows.search` twice in a fresh temporary store and prints each stage's seconds and how
many results it computed or reused (from runs/<id>/stages.json), plus each run's total wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(config: str, store: Path) -> tuple[float, list[dict]]:
    """(wall seconds, stage rows) of one `python -m flows.search` run."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.search", "--config", config, "--store", str(store)], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    run_id = (store / "runs" / "LATEST").read_text().strip()
    return wall, json.loads((store / "runs" / run_id / "stages.json").read_text())


def main() -> None:
    """Two runs, one table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        first_wall, first = run(args.config, Path(tmp))
        second_wall, second = run(args.config, Path(tmp))
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, torch threads default")
    print(f"# command: python bench/demo_stages.py --config {os.path.relpath(args.config, ROOT)}")
    print(f"{'stage':28} {'1st run s':>10} {'computed':>9} {'2nd run s':>10} {'computed':>9} {'reused':>7}")
    for a, b in zip(first, second):
        print(f"{a['stage']:28} {a['seconds']:>10.2f} {a['computed']:>9} {b['seconds']:>10.2f} {b['computed']:>9} {b['reused']:>7}")
    print(f"{'total wall (process)':28} {first_wall:>10.1f} {'':>9} {second_wall:>10.1f}")


if __name__ == "__main__":
    main()
