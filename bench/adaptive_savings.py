"""Adaptive planning vs all pairs with a simulated judge: how often each names the true winner, and at what cost.

16 contenders, the best ahead of the second by 0.2 logit (--gap), outcomes drawn from the Bradley-Terry model.
With --gap 0 the top two are exactly tied: every "top contender separated" stop is then a false claim, and the
table's last line counts them (nominal: at most 1 - confidence = 5%).
python bench/adaptive_savings.py [--quick] [--seeds N] [--gap G] [--adaptive-only]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see rating_speed.py: stable timings on a shared machine

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.plan import PLAN_COLUMNS, BudgetConfig, plan_round  # noqa: E402
from tasks.rate import RatingConfig, rate  # noqa: E402


def field(k: int, gap: float) -> dict[str, float]:
    """True log-strengths: best = gap, second = 0, the rest spread evenly from -0.1 down to -1.5 logit."""
    theta = np.concatenate([[gap, 0.0], -np.linspace(0.1, 1.5, k - 2)])
    return {f"model-{i:02d}": float(t) for i, t in enumerate(theta)}


def judge(plan: pd.DataFrame, strength: dict[str, float], rng: np.random.Generator) -> pd.DataFrame:
    """Simulated judge: A wins with probability sigma(theta_A - theta_B), no ties."""
    d = plan.contender_a.map(strength).to_numpy() - plan.contender_b.map(strength).to_numpy()
    win = np.where(rng.random(len(plan)) < 1.0 / (1.0 + np.exp(-d)), "a", "b")
    return plan.assign(order="ab", winner=win, strength=1, error=None)


def search(strategy: str, seed: int, strength: dict[str, float], examples: dict[str, list[str]]) -> tuple[bool, int, int, str]:
    """Plan, judge and re-plan until a stop reason; returns (true winner named?, judgments, rounds, reason)."""
    rng = np.random.default_rng(seed)
    cfg = BudgetConfig(strategy=strategy, warmup_per_pair=4, round_size=200)
    done = pd.DataFrame(columns=PLAN_COLUMNS + ["order", "winner", "strength", "error"])
    rounds, reason = 0, None
    while reason is None:
        plan, reason = plan_round(list(strength), examples, done, cfg, rng)
        if len(plan):
            rounds += 1
            new = judge(plan, strength, rng)
            done = new if len(done) == 0 else pd.concat([done, new], ignore_index=True)
    table = rate(done, {}, RatingConfig(ci="fisher"))
    named = table[table.scope == "overall"].iloc[0].contender
    return named == max(strength, key=strength.get), len(done), rounds, reason or ""


def main() -> int:
    """Run both strategies over the seeds and print one table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="3 seeds and 50 examples per dataset (seconds)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 20, quick 3)")
    ap.add_argument("--gap", type=float, default=0.2, help="logit lead of the best over the second (0: a tie)")
    ap.add_argument("--adaptive-only", action="store_true", help="skip the all-pairs baseline")
    args = ap.parse_args()
    seeds = args.seeds or (3 if args.quick else 20)
    per_dataset = 50 if args.quick else 200
    strength = field(16, args.gap)
    examples = {f"dataset-{d}": [f"ex-{i}" for i in range(per_dataset)] for d in range(3)}
    results: dict[str, list[tuple[bool, int, int, str]]] = {}
    times: dict[str, float] = {}
    for strategy in ("adaptive",) if args.adaptive_only else ("all-pairs", "adaptive"):
        t0 = time.perf_counter()
        results[strategy] = [search(strategy, seed, strength, examples) for seed in range(seeds)]
        times[strategy] = time.perf_counter() - t0

    n_all = np.mean([r[1] for r in results["all-pairs"]]) if "all-pairs" in results else 120 * 3 * per_dataset
    cmd = "python bench/adaptive_savings.py" + (" --quick" if args.quick else "") + (
        f" --seeds {args.seeds}" if args.seeds else "") + (f" --gap {args.gap}" if args.gap != 0.2 else "") + (
        " --adaptive-only" if args.adaptive_only else "")
    print(f"# adaptive savings: 16 contenders, best ahead of second by {args.gap} logit, BT judge, {seeds} seeds,")
    print(f"#   3 datasets x {per_dataset} examples = {120 * 3 * per_dataset:,} (pair, example) slots; warm-up 4/pair, rounds of 200")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}")
    print(f"# command: {cmd}")
    print(f"{'strategy':<10} {'right':>7} {'judgments mean':>15} {'median':>8} {'min':>7} {'max':>7} {'saved':>7} {'rounds':>7} {'sec':>6}")
    for strategy, res in results.items():
        n = np.array([r[1] for r in res])
        right = sum(r[0] for r in res)
        saved = 1.0 - n.mean() / n_all
        print(
            f"{strategy:<10} {right:>3}/{len(res):<3} {n.mean():>15,.0f} {np.median(n):>8,.0f} {n.min():>7,} {n.max():>7,} "
            f"{saved:>7.0%} {np.mean([r[2] for r in res]):>7.1f} {times[strategy]:>6.1f}"
        )
    reasons = pd.Series([r[3].split(" (")[0] for r in results["adaptive"]]).value_counts()
    print("# adaptive stop reasons: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
    if args.gap == 0:  # the top two are equal: any claim that the leader is separated is false
        false = sum(r[3].startswith("top contender separated") for r in results["adaptive"])
        print(f"# false 'separated' claims with the top two tied: {false}/{seeds} = {false / seeds:.1%} (nominal <= 5%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
