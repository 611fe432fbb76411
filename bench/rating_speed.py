"""Rating speed: our Bradley-Terry solver against its fair peers on the same data, same process: choix's
ilsr_pairwise_dense and FastChat's L-BFGS (bench/fastchat_bt.py) on the same counts, rate() against FastChat's
compute_bt on the same judgments; also the earlier choix.ilsr_pairwise on raw pairs, rate() with the bootstrap, and
the Davidson tie model's fit on its own (no peer fits it).

The solver and choix's dense solver take well under a millisecond, so they are timed interleaved (one call of each
per round, best of many rounds): a burst of load from another job then slows both, not one.

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

from tasks.config.schema import RatingConfig
from tasks.rating.bt import bradley_terry
from tasks.rating.rate import ELO_PER_NAT, rate  # noqa: E402


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


def interleaved(fns: list, rounds: int) -> tuple[list[float], list[object], float]:
    """Best wall time (seconds) of each function over `rounds` rounds of one call each, their last results, and the
    median over rounds of the first's time over the second's (the ratio the load moves least)."""
    best, out, ratio = [float("inf")] * len(fns), [None] * len(fns), []
    for _ in range(rounds):
        sec = []
        for n, fn in enumerate(fns):
            t0 = time.perf_counter()
            out[n] = fn()
            sec.append(time.perf_counter() - t0)
            best[n] = min(best[n], sec[-1])
        ratio.append(sec[0] / sec[1])
    return best, out, float(np.median(ratio))


def davidson_counts(n: int, k: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Win and tie count matrices of n judgments among k contenders drawn from a Davidson model (nu = 0.7: ~26% ties)."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0.0, 1.0, k)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    d = theta[a] - theta[b]
    den = np.exp(d / 2) + np.exp(-d / 2) + 0.7
    u = rng.random(n)
    a_wins, tie = u < np.exp(d / 2) / den, u > 1 - 0.7 / den
    win, lose = np.where(a_wins, a, b)[~tie], np.where(a_wins, b, a)[~tie]
    w = np.bincount(win * k + lose, minlength=k * k).reshape(k, k).astype(float)
    t = np.bincount(a[tie] * k + b[tie], minlength=k * k).reshape(k, k).astype(float)
    return w, t + t.T


def main() -> int:
    """Run the benchmark and print one table: each of our rows beside the peer it is measured against."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="100k judgments instead of 1M (seconds, for CI)")
    args = ap.parse_args()
    import choix  # test extra: pip install choix

    from bench import fastchat_bt
    from tasks.rating.bt import fit

    n = 100_000 if args.quick else 1_000_000
    rows = []

    def add(name: str, k: int, sec: float, peer: str = "", peer_sec: float = float("nan"), gap: float = float("nan")):
        rows.append((name, k, sec, peer, peer_sec / sec if peer else float("nan"), gap))

    def centred(theta: np.ndarray) -> np.ndarray:
        return ELO_PER_NAT * (theta - theta.mean())

    df, win, lose = judgments(n, 100, n_examples=1000, n_datasets=1)
    # The same K x K count matrix for both: counts[i, j] = times i beat j.
    counts = np.bincount(win * 100 + lose, minlength=100 * 100).reshape(100, 100).astype(float)
    no_ties = np.zeros((1, 100, 100))
    (t_dense, t_ours_c), (p_dense, p_ours_c), med = interleaved(
        [lambda: choix.ilsr_pairwise_dense(counts), lambda: fit(counts[None], no_ties, "bt", 1e-4)[0][0]], 300)
    add("choix.ilsr_pairwise_dense, count matrix", 100, t_dense)
    add("ours: tasks.rating.bt.fit, the same count matrix", 100, t_ours_c, "choix dense", t_dense,
        np.abs(centred(p_ours_c) - centred(p_dense)).max())
    notes = [f"fit vs choix dense, interleaved, 300 rounds: best {1e3 * t_ours_c:.3f} ms vs {1e3 * t_dense:.3f} ms "
             f"({t_dense / t_ours_c:.2f}x); median of the rounds' ratios {med:.2f}x"]
    w_d, t_d = davidson_counts(n, 100)
    share = t_d.sum() / 2 / (w_d.sum() + t_d.sum() / 2)
    (t_dav, t_plain), _, _ = interleaved([lambda: fit(w_d[None], t_d[None], "davidson", 1e-4),
                                          lambda: fit((w_d + t_d / 2)[None], no_ties, "bt", 1e-4)], 100)
    add(f"ours: fit, Davidson ties ({share:.0%} ties)", 100, t_dav)
    add("ours: fit, the same with ties as half wins (bt)", 100, t_plain)
    notes.append(f"Davidson fit {1e3 * t_dav:.3f} ms, {t_dav / t_plain:.1f}x the plain fit of the same judgments "
                 "(ties as half wins)")
    # FastChat's L-BFGS on its preferred input: the distinct (a, b, outcome) rows of the battles with their counts
    battles = fastchat_bt.battles_from_judgments(df)
    m, o, models, wts = fastchat_bt.schedule(battles)
    alpha = float(np.log(10.0))
    t_lbfgs, p_lbfgs = best_of(lambda: fastchat_bt.fit(m, o, wts, len(models), alpha), 5)
    add("FastChat fit_bt (L-BFGS), distinct rows + counts", 100, t_lbfgs)
    order = [int(x.split("-")[1]) for x in models]
    p_fc = np.empty(100)
    p_fc[order] = p_lbfgs * alpha  # base-10 logits -> nats
    add("ours: tasks.rating.bt.fit, the same count matrix", 100, t_ours_c, "FastChat fit_bt", t_lbfgs,
        np.abs(centred(p_ours_c) - centred(p_fc)).max())
    t_fc, _ = best_of(lambda: fastchat_bt.compute_bt(battles), 3)
    add("FastChat compute_bt(battles DataFrame)", 100, t_fc)
    t_fish, r = best_of(lambda: rate(df, {}, RatingConfig(ci="fisher")), 3)
    ours = r[r.scope == "overall"].sort_values("contender")["rating"].to_numpy()
    add("ours: rate(DataFrame), Fisher CI", 100, t_fish, "FastChat compute_bt", t_fc,
        np.abs((ours - ours.mean()) - centred(p_dense)).max())
    # choix's sparse solver fed the raw pairs, as the earlier table did: not the fair peer (it never counts them)
    data = np.stack([win, lose], axis=1).tolist()
    t_choix, _ = best_of(lambda: choix.ilsr_pairwise(100, data), 3)
    add(f"choix.ilsr_pairwise, list of {n:,} (winner, loser)", 100, t_choix)
    t_core, _ = best_of(lambda: bradley_terry(win, lose, 100), 5)
    add("ours: bradley_terry(winner, loser arrays)", 100, t_core, "choix pairs", t_choix)
    cfg = RatingConfig(ci="bootstrap", bootstrap_rounds=100)
    t_boot, _ = best_of(lambda: rate(df, {}, cfg), 3)
    add("ours: rate(DataFrame) + 100 bootstrap rounds", 100, t_boot)
    df4, _, _ = judgments(n, 100, n_examples=250, n_datasets=4, seed=1)
    t_boot4, _ = best_of(lambda: rate(df4, {}, cfg), 3)
    add("ours: same, 4 datasets (4 fits + pooled)", 100, t_boot4)
    df_k, win_k, lose_k = judgments(n, 1000, n_examples=1000, n_datasets=1, seed=2)
    t_k, _ = best_of(lambda: rate(df_k, {}, RatingConfig(ci="fisher")), 3)
    add("ours: rate(DataFrame), Fisher CI", 1000, t_k)
    t_k_core, _ = best_of(lambda: bradley_terry(win_k, lose_k, 1000), 3)
    add("ours: bradley_terry(winner, loser arrays)", 1000, t_k_core)

    print(f"# rating speed: {n:,} judgments (no ties but the Davidson rows), best of 3-5 runs each (the count-matrix "
          "fits: of interleaved rounds), one process")
    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end, numpy {np.__version__}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}"
    )
    print(f"# command: python bench/rating_speed.py{' --quick' if args.quick else ''}")
    for note in notes:
        print(f"# {note}")
    print(f"{'method':<50} {'K':>5} {'seconds':>9} {'vs peer':>22} {'max |dElo|':>11}")
    for name, k, sec, peer, ratio, d in rows:
        vs = f"{ratio:.1f}x {peer}" if peer else ""
        d_s = "" if np.isnan(d) else f"{d:.4f}"
        print(f"{name:<50} {k:>5} {sec:>9.4f} {vs:>22} {d_s:>11}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
