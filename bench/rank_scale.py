"""`python -m flows.rank` at scale, with and without `--length-control`: wall, CPU and peak RSS of fresh processes.

Each run is a child process timed from outside (start-up, imports, the Parquet read, the fit, the ratings written),
started by a small watcher process of its own whose resource.getrusage(RUSAGE_CHILDREN) is that one child's CPU
seconds (user + system) and peak RSS. The ratio of each length-controlled run to the plain run on the same file in
the same bench is what the target is stated in (`--length-control` within 2x of without it).

python bench/rank_scale.py [--n 1000000 5000000] [--contenders 200] [--rounds 200] [--repeats 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BETA = 1.0  # nats per unit of (len_a - len_b) / (len_a + len_b): the simulated judge's taste for length
ROW_GROUP = 500_000  # rows per Parquet row group and per generated block (a run's file is written in one piece)


def block(n: int, k: int, first: int, n_examples: int, rng: np.random.Generator, theta: np.ndarray,
          verbose: np.ndarray) -> pa.Table:
    """n judgments among k contenders as a run writes them (with len_a, len_b), example ids from `first` on."""
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    la = np.round(300 * verbose[a] * rng.lognormal(0.0, 0.6, n))
    lb = np.round(300 * verbose[b] * rng.lognormal(0.0, 0.6, n))
    d = theta[a] - theta[b] + BETA * (la - lb) / np.maximum(la + lb, 1.0)
    # Davidson with nu = 0.9: P(a) : P(b) : P(tie) = e^{d/2} : e^{-d/2} : 0.9, about 30% ties among close pairs.
    pa_, pb_ = np.exp(d / 2), np.exp(-d / 2)
    u = rng.random(n) * (pa_ + pb_ + 0.9)
    winner = np.where(u < pa_, "a", np.where(u < pa_ + pb_, "b", "tie"))
    names = np.array([f"model-{x:03d}" for x in range(k)])
    ex = first + np.arange(n) if n_examples <= 0 else rng.integers(0, n_examples, n)
    return pa.table({
        "dataset": pa.array(np.full(n, "chat")), "example_id": pa.array(ex.astype(str)),
        "contender_a": pa.array(names[a]), "contender_b": pa.array(names[b]),
        "order": pa.array(np.where(rng.random(n) < 0.5, "ab", "ba")), "winner": pa.array(winner),
        "strength": pa.array(np.where(winner == "tie", 0, 1)), "judge": pa.array(np.full(n, "gpt-4o-mini")),
        "cost_usd": pa.array(np.zeros(n)), "error": pa.nulls(n, pa.string()),
        "kind_a": pa.array(np.full(n, "candidate")), "kind_b": pa.array(np.full(n, "candidate")),
        "len_a": pa.array(la), "len_b": pa.array(lb),
    })


def write_judgments(path: Path, n: int, k: int, n_examples: int = 0, seed: int = 0) -> None:
    """A judgments Parquet of n rows among k contenders, written block by block (5M rows never in memory at once);
    n_examples 0: every judgment on its own example (the bootstrap's largest case)."""
    rng = np.random.default_rng(seed)
    theta, verbose = rng.normal(0.0, 1.0, k), rng.lognormal(0.0, 0.4, k)
    writer = None
    for first in range(0, n, ROW_GROUP):
        t = block(min(ROW_GROUP, n - first), k, first, n_examples, rng, theta, verbose)
        writer = writer or pq.ParquetWriter(path, t.schema)
        writer.write_table(t, row_group_size=ROW_GROUP)
    assert writer is not None
    writer.close()


WATCH = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=False)
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(done.returncode, u.ru_utime + u.ru_stime, u.ru_maxrss)
sys.stderr.write(done.stderr[-2000:])
"""


def measured(cmd: list[str]) -> dict[str, float]:
    """Wall and CPU seconds and peak RSS (MB) of one child process (must exit 0), seen by its own watcher."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WATCH, *cmd], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    rc, cpu, peak_kib = done.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"{' '.join(cmd[2:5])} failed: {done.stderr[-2000:]}")
    return {"wall": wall, "cpu": float(cpu), "rss": int(peak_kib) / 1024}


def main() -> int:
    """Write each file, run flows.rank with and without --length-control on it, print one table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000, 5_000_000], help="judgments per file")
    ap.add_argument("--contenders", type=int, default=200)
    ap.add_argument("--examples", type=int, default=0, help="distinct examples (0: one per judgment)")
    ap.add_argument("--rounds", type=int, default=200, help="bootstrap rounds (flows.rank's default 200)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each, interleaved; the best wall is reported")
    ap.add_argument("--keep", metavar="DIR", default=None, help="write (and reuse) the judgment files here")
    a = ap.parse_args()
    rows = []
    start_load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(a.keep or tmp)
        where.mkdir(parents=True, exist_ok=True)
        for n in sorted(a.n):
            path = where / f"judgments-{n}-{a.contenders}-{a.examples}.parquet"
            if not path.exists():
                write_judgments(path, n, a.contenders, a.examples)
            rank = [sys.executable, "-m", "flows.rank", "--judgments", str(path), "--rounds", str(a.rounds),
                    "--out", str(Path(tmp) / "out")]
            runs: dict[str, list[dict[str, float]]] = {"plain": [], "length control": []}
            for _ in range(a.repeats):
                for name, extra in (("plain", []), ("length control", ["--length-control"])):
                    runs[name].append(measured(rank + extra))
            best = {name: min(r, key=lambda x: x["wall"]) for name, r in runs.items()}
            for name, r in runs.items():
                rows.append((n, name, best[name], best[name]["wall"] / best["plain"]["wall"],
                             " ".join(f"{x['wall']:.1f}" for x in r)))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# flows.rank, {a.contenders} contenders, {'one example per judgment' if a.examples <= 0 else a.examples}"
          f", {a.rounds} bootstrap rounds; fresh processes, best wall of {a.repeats}")
    print(f"# machine: {os.cpu_count()} CPUs; load average (1/5/15 min) at the start {start_load}, at the end {load}; "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(f"# command: python bench/rank_scale.py {' '.join(sys.argv[1:])}".rstrip())
    print("| judgments | run            | wall s | CPU s | peak RSS MB | vs plain (wall) | runs (wall s) |")
    print("|-----------|----------------|--------|-------|-------------|-----------------|---------------|")
    for n, name, r, ratio, each in rows:
        print(f"| {n:>9,} | {name:<14} | {r['wall']:6.1f} | {r['cpu']:5.1f} | {r['rss']:11.0f} | {ratio:14.2f}x | {each} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
