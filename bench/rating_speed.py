"""Rating speed: our Bradley-Terry fit (+100 bootstrap rounds) against choix.ilsr_pairwise, same judgments, same process.

python bench/rating_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

# Single-threaded BLAS, set before numpy loads it: on this shared 2-core machine a busy second core made
# OpenBLAS's threads spin, and a 1000x1000 Cholesky took 8 s instead of 0.3 s. Override from the shell.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.rate import ELO_PER_NAT, RatingConfig, bradley_terry, rate  # noqa: E402


def judgments(n: int, k: int, n_examples: int, n_datasets: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """n judgments (no ties, so choix sees exactly the same data) among k contenders; also (winner, loser) codes."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0.0, 1.0, k)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    a_wins = rng.random(n) < 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))
    names = np.array([f"model-{x:04d}" for x in range(k)])
    df = pd.DataFrame(
        {
            "dataset": np.array([f"dataset-{d}" for d in range(n_datasets)])[rng.integers(0, n_datasets, n)],
            "example_id": rng.integers(0, n_examples, n),
            "contender_a": names[a],
            "contender_b": names[b],
            "order": np.where(rng.random(n) < 0.5, "ab", "ba"),
            "winner": np.where(a_wins, "a", "b"),
            "strength": 1,
            "error": None,
        }
    )
    return df, np.where(a_wins, a, b), np.where(a_wins, b, a)


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Fastest wall time of `repeats` calls (seconds) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    """Run the benchmark and print one table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="100k judgments instead of 1M (seconds, for CI)")
    args = ap.parse_args()
    import choix  # test extra: pip install choix

    n = 100_000 if args.quick else 1_000_000
    rows = []
    df, win, lose = judgments(n, 100, n_examples=1000, n_datasets=1)
    # choix gets its documented input, a list of [winner, loser] (3x faster for it than an ndarray).
    data = np.stack([win, lose], axis=1).tolist()
    t_choix, p_choix = best_of(lambda: choix.ilsr_pairwise(100, data), 3)
    rows.append(("choix.ilsr_pairwise, list of (winner, loser)", 100, t_choix, 1.0, 0.0))
    t_core, p_core = best_of(lambda: bradley_terry(win, lose, 100), 5)
    gap = ELO_PER_NAT * np.abs((p_core - p_core.mean()) - (p_choix - p_choix.mean())).max()
    rows.append(("ours: bradley_terry(winner, loser arrays)", 100, t_core, t_choix / t_core, gap))
    t_fish, r = best_of(lambda: rate(df, {}, RatingConfig(ci="fisher")), 3)
    ours = r[r.scope == "overall"].sort_values("contender")["rating"].to_numpy()
    gap = np.abs((ours - ours.mean()) - ELO_PER_NAT * (p_choix - p_choix.mean())).max()
    rows.append(("ours: rate(DataFrame), Fisher CI", 100, t_fish, t_choix / t_fish, gap))
    cfg = RatingConfig(ci="bootstrap", bootstrap_rounds=100)
    t_boot, _ = best_of(lambda: rate(df, {}, cfg), 3)
    rows.append(("ours: rate(DataFrame) + 100 bootstrap rounds", 100, t_boot, t_choix / t_boot, gap))
    df4, _, _ = judgments(n, 100, n_examples=250, n_datasets=4, seed=1)
    t_boot4, _ = best_of(lambda: rate(df4, {}, cfg), 3)
    rows.append(("ours: same, 4 datasets (4 fits + pooled)", 100, t_boot4, float("nan"), float("nan")))
    df_k, win_k, lose_k = judgments(n, 1000, n_examples=1000, n_datasets=1, seed=2)
    t_k, _ = best_of(lambda: rate(df_k, {}, RatingConfig(ci="fisher")), 3)
    rows.append(("ours: rate(DataFrame), Fisher CI", 1000, t_k, float("nan"), float("nan")))
    t_k_core, _ = best_of(lambda: bradley_terry(win_k, lose_k, 1000), 3)
    rows.append(("ours: bradley_terry(winner, loser arrays)", 1000, t_k_core, float("nan"), float("nan")))

    print(f"# rating speed: {n:,} judgments (no ties), best of 3-5 runs each")
    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end, numpy {np.__version__}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}"
    )
    print(f"# command: python bench/rating_speed.py{' --quick' if args.quick else ''}")
    print(f"{'method':<48} {'K':>5} {'seconds':>9} {'x choix':>8} {'max |dElo| vs choix':>20}")
    for name, k, sec, ratio, d in rows:
        ratio_s = "" if np.isnan(ratio) else f"{ratio:.0f}x"
        d_s = "" if np.isnan(d) else f"{d:.4f}"
        print(f"{name:<48} {k:>5} {sec:>9.3f} {ratio_s:>8} {d_s:>20}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
