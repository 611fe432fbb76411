"""The search's proposal rule (tasks/plan/propose.py) against grids, on synthetic fitness landscapes with noise.

    python bench/merge_search.py [--landscapes 300] [--rounds 5] [--noise 0.005] [--margin 0.01] [--seed 0]
                                 [--widths 0.08 0.25] [--quick]

Each landscape: three models A (0.60), B (0.55), C (0.50) and their common base (0.30); slerp(A, B) at t is the
line between its parents plus a bump of random height (0.05..0.15), centre (0.05..0.95) and width (--widths,
0.08..0.25); TIES(A, B, C | base) at density d is 0.55 plus such a bump. An evaluation (a fine-tune judged on dev)
returns the true fitness plus Gaussian noise (sd --noise), with a 95% interval of +-1.96 sd; the pick is the best
*measured* point. Success: the pick's *true* fitness within --margin of the landscape's optimum (the best of both
curves on a grid of 1001 points). The rule runs with the search's defaults (4 proposals a round, 3 leaders, slerp and
ties) for 2..--rounds rounds (no early stop; its config's `rounds` is that number, so its last round exploits), and
again with the search's stop rule (stop when no proposal beats the leader's interval); merges of merges are not
proposed here (the landscape defines only the two families). The grids evaluate every t and density at spacings
0.05..0.25, on the same landscapes and noise draws, side by side in one run. --seed and --widths (and --noise) give
landscapes the rule was not developed on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _machine import header, table  # noqa: E402

from tasks.config.merge_search import MergeSearchConfig
from tasks.plan.propose import Point, improved, propose  # noqa: E402

MODELS = {"A": 0.60, "B": 0.55, "C": 0.50, "base": 0.30}


class Landscape:
    """True fitness of every model and merge of one random landscape."""

    def __init__(self, rng: np.random.Generator, widths: tuple[float, float] = (0.08, 0.25)) -> None:
        """Draw the two bumps (height, centre, width)."""
        self.bumps = {m: (rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.95), rng.uniform(*widths))
                      for m in ("slerp", "ties")}

    def fitness(self, method: str, p: float) -> float:
        """True fitness of a merge at its parameter (slerp's t towards B, TIES' density)."""
        h, c, w = self.bumps[method]
        line = (1 - p) * MODELS["A"] + p * MODELS["B"] if method == "slerp" else 0.55
        return line + h * float(np.exp(-((p - c) / w) ** 2))

    def point(self, pt: Point) -> float:
        """True fitness of a proposal (slerp parents are sorted, so t is already towards B)."""
        return self.fitness(pt.method, pt.param)

    def optimum(self) -> float:
        """The best true fitness anywhere: both curves on a fine grid, and the models."""
        xs = np.linspace(0, 1, 1001)
        return max(max(self.fitness(m, x) for x in xs) for m in ("slerp", "ties"))


def table_of(measured: dict[str, float], sd: float) -> pd.DataFrame:
    """Measured fitness as a ratings table (x1000, Elo-like), with +-1.96 sd intervals."""
    return pd.DataFrame([{"scope": "overall", "contender": n, "kind": "candidate" if n in MODELS else "merge",
                          "rating": 1000 * v, "ci_low": 1000 * (v - 1.96 * sd), "ci_high": 1000 * (v + 1.96 * sd)}
                         for n, v in measured.items()])


def run_rule(land: Landscape, rng: np.random.Generator, sd: float, rounds: int, stop: bool) -> tuple[float, int]:
    """(true fitness of the pick, evaluations) of the search's rule on one landscape."""
    cfg = MergeSearchConfig(rounds=rounds)
    measured = {n: v + rng.normal(0, sd) for n, v in MODELS.items()}
    points: list[Point] = []
    truth: dict[str, float] = {}
    for r in range(1, rounds + 1):
        new = propose(table_of(measured, sd), points, cfg, "base", lambda names: set(names) <= set(MODELS), r)
        if not new:
            break
        for p in new:
            truth[p.name] = land.point(p)
            measured[p.name] = truth[p.name] + rng.normal(0, sd)
        points += new
        if stop and not improved(table_of(measured, sd), [p.name for p in new])[0]:
            break
    if not truth:
        return max(MODELS.values()), 0
    best = max(truth, key=lambda n: measured[n])
    return truth[best], len(truth)  # the kept proposal: the best measured one


def run_grid(land: Landscape, rng: np.random.Generator, sd: float, spacing: float) -> tuple[float, int]:
    """(true fitness of the pick, evaluations) of a grid over t in (0, 1) and density in (0, 1]."""
    ts = np.arange(spacing, 1 - 1e-9, spacing)
    ds = np.arange(spacing, 1 + 1e-9, spacing)
    pts = [("slerp", t) for t in ts] + [("ties", d) for d in ds]
    true = [land.fitness(m, p) for m, p in pts]
    meas = [v + rng.normal(0, sd) for v in true]
    return true[int(np.argmax(meas))], len(pts)


def main() -> None:
    """Every method on the same landscapes; one table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--landscapes", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--noise", type=float, default=0.005, help="sd of one evaluation's measured fitness")
    ap.add_argument("--margin", type=float, default=0.01, help="success: within this of the optimum's fitness")
    ap.add_argument("--quick", action="store_true", help="20 landscapes (the test's mode)")
    ap.add_argument("--seed", type=int, default=0, help="first landscape's seed (landscapes seed..seed+n-1)")
    ap.add_argument("--widths", type=float, nargs=2, default=(0.08, 0.25), metavar=("LO", "HI"),
                    help="range of the bumps' widths")
    args = ap.parse_args()
    n = 20 if args.quick else args.landscapes
    sd = args.noise
    methods = {f"rule, {r} rounds x 4": (lambda r: lambda l, g: run_rule(l, g, sd, r, False))(r)
               for r in range(2, args.rounds + 1)}
    methods[f"rule, up to {args.rounds} rounds, stop rule"] = lambda l, g: run_rule(l, g, sd, args.rounds, True)
    methods |= {f"grid, spacing {s}": (lambda s: lambda l, g: run_grid(l, g, sd, s))(s)
                for s in (0.05, 0.0625, 0.075, 0.1, 0.125, 0.25)}
    found: dict[str, list[tuple[float, int]]] = {k: [] for k in methods}
    for seed in range(args.seed, args.seed + n):
        land = Landscape(np.random.default_rng(seed), tuple(args.widths))
        best = land.optimum()
        for name, fn in methods.items():
            fit, evals = fn(land, np.random.default_rng(10_000 + seed))
            found[name].append((best - fit, evals))
    rows = []
    for name, res in found.items():
        gaps, evals = np.array([g for g, _ in res]), np.array([e for _, e in res])
        rows.append({"method": name, "mean evaluations": f"{evals.mean():.1f}",
                     f"within {args.margin} of optimum": f"{np.mean(gaps <= args.margin):.0%}",
                     "mean gap": f"{gaps.mean():.4f}", "worst gap": f"{gaps.max():.4f}"})
    print(header())
    print(f"{n} landscapes (seeds {args.seed}..{args.seed + n - 1}, bump widths {args.widths[0]}..{args.widths[1]}), "
          f"evaluation noise sd {sd}, margin {args.margin}")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
