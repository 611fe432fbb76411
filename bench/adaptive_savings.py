"""Adaptive planning: are its "separated" claims right, and what does it save, against random allocation and all pairs?

A simulated judge where examples differ (the adaptive planner's savings target). On example e contender k
plays at theta_k + u_ek (u ~ N(0, s_u^2)): every pair and both orders of one example share the example's shifts; an
(example, pair) shift w ~ N(0, s_w^2) is shared by the two orders of one comparison; a per-example tie propensity
log nu_e = log nu + v_e (v ~ N(0, s_v^2)); the contender shown first gains 0.3 nats; ties by Davidson's model (nu as in
bench/coverage.py, ~1/3 of verdicts). Both orders are judged (orders=2, the LLM judge's default), so a budget counts
both. Effects (s_u, s_w, s_v) = (1.0, 0.6, 1.0): bench/coverage.py's "strong" setting, where Fisher covered 81%.

Cases (true log-strengths: the best `gap` nats above the second, the rest spread from 0.3 to 1.5 below the second):
clear leader (8 contenders, gap 0.5), near-tie (8 contenders, the top two exactly equal: every "separated" claim is
then wrong) and 24 contenders (gap 0.5). 3 datasets x 100 examples; warm-up 4 per pair, rounds of 200 comparisons.

Strategies, on the same simulated judge (its random effects drawn once per search):
- adaptive: tasks.judge.rounds.plan_round until it stops; its claim is the stop reason "top contender separated";
- uniform, same n: every pair judged on random examples (all-pairs strategy capped at the adaptive search's own number
  of judgments), then one test at 95% (tasks.judge.rounds.standing: the same sandwich gap test, one look);
- all pairs: every pair on every example, both orders, then the same single test.
A wrong-winner claim: "separated" said of a contender that is not strictly the best (in the near-tie: any claim).
Its interval is Wilson's 95%. "true best on top": the top-rated contender at the end is a truly best one.

python bench/adaptive_savings.py [--quick] [--searches N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see rating_speed.py: stable timings on a shared machine

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _machine  # noqa: E402
from bench.coverage import BIAS, SETTINGS, calibrate_nu, davidson  # noqa: E402
from tasks.config.schema import BudgetConfig
from tasks.judge.rounds import PLAN_COLUMNS, plan_round, standing  # noqa: E402

EFFECTS = SETTINGS["strong"]  # (s_u, s_w, s_v) nats
CASES = {"clear leader": (8, 0.5), "near-tie": (8, 0.0), "24 contenders": (24, 0.5)}  # (contenders, gap)
DATASETS = 3
COLUMNS = PLAN_COLUMNS + ["order", "winner", "strength", "error"]


def field(k: int, gap: float) -> np.ndarray:
    """True log-strengths (nats): best = gap, second = 0, the rest from -0.3 down to -1.5."""
    return np.concatenate([[gap, 0.0], -np.linspace(0.3, 1.5, k - 2)])


class Judge:
    """One simulated search's judge: per-example effects drawn once, so re-asking an example sees the same example."""

    def __init__(self, theta: np.ndarray, per_dataset: int, nu: float, rng: np.random.Generator):
        s_u, s_w, s_v = EFFECTS
        k, e = len(theta), DATASETS * per_dataset
        self.theta, self.nu, self.rng, self.k = theta, nu, rng, k
        self.names = [f"model-{i:02d}" for i in range(k)]
        self.pos = {n: i for i, n in enumerate(self.names)}
        self.examples = {f"dataset-{d}": [f"ex-{i}" for i in range(per_dataset)] for d in range(DATASETS)}
        self.u = rng.normal(0.0, s_u, (e, k))
        self.w = rng.normal(0.0, s_w, (e, k, k))
        self.w = np.triu(self.w, 1) - np.triu(self.w, 1).transpose(0, 2, 1)  # w[e, b, a] = -w[e, a, b]
        self.v = rng.normal(0.0, s_v, e)
        self.per_dataset = per_dataset

    def __call__(self, plan: pd.DataFrame) -> pd.DataFrame:
        """Both orders of every planned comparison, winner named as 'a' (contender_a) / 'b' / 'tie'."""
        a = plan.contender_a.map(self.pos).to_numpy()
        b = plan.contender_b.map(self.pos).to_numpy()
        ds = plan.dataset.str.slice(8).astype(int).to_numpy()
        e = ds * self.per_dataset + plan.example_id.str.slice(3).astype(int).to_numpy()
        d = self.theta[a] - self.theta[b] + self.u[e, a] - self.u[e, b] + self.w[e, a, b]
        d2 = np.stack([d + BIAS, d - BIAS], axis=1)  # order ab: a shown first; ba: b shown first
        pa, _, pt = davidson(d2, (self.nu * np.exp(self.v[e]))[:, None])
        r = self.rng.random(d2.shape)
        winner = np.where(r < pa, "a", np.where(r < pa + pt, "tie", "b"))
        both = pd.concat([plan.assign(order="ab", winner=winner[:, 0]), plan.assign(order="ba", winner=winner[:, 1])],
                         ignore_index=True)
        return both.assign(strength=np.where(both.winner == "tie", 0, 1), error=None)[COLUMNS]


def searching(judge: Judge, cfg: BudgetConfig, rng: np.random.Generator) -> tuple[pd.DataFrame, str, int]:
    """Plan, judge and re-plan until the planner stops: (judgments, stop reason, rounds)."""
    done = pd.DataFrame(columns=COLUMNS)
    rounds = 0
    while True:
        plan, reason = plan_round(judge.names, judge.examples, done, cfg, rng, orders=2)
        if reason is not None:
            return done, reason, rounds
        rounds += 1
        new = judge(plan)
        done = new if len(done) == 0 else pd.concat([done, new], ignore_index=True)


def outcome(judge: Judge, done: pd.DataFrame, claimed: bool, leader: str | None) -> dict:
    """Did it claim separation, was the claim wrong, is the top-rated contender a true best?"""
    best = set(np.flatnonzero(judge.theta == judge.theta.max()))
    right_top = leader is not None and judge.pos[leader] in best
    strict = len(best) == 1 and right_top
    return {"n": len(done), "claim": claimed, "wrong": claimed and not strict, "top": right_top}


def one_search(case: str, seed: int, per_dataset: int, nu: float) -> dict[str, dict]:
    """Adaptive, uniform with the same number of judgments, and all pairs, on one simulated judge."""
    k, gap = CASES[case]
    judge = Judge(field(k, gap), per_dataset, nu, np.random.default_rng([13, k, int(gap * 100), seed]))
    rng = np.random.default_rng(seed)
    cfg = BudgetConfig(warmup_per_pair=4, round_size=200)
    out: dict[str, dict] = {}
    t0 = time.perf_counter()
    done, reason, rounds = searching(judge, cfg, rng)
    at = reason.find("top contender separated")  # the stop itself, or the last look when the slots ran out
    claimed = at >= 0
    leader = reason[at:].split("(")[1].split(",")[0].split(";")[0] if claimed else None
    if leader is None:
        st = standing(done, judge.names, 0.95)
        leader = st.leader if st else None
    out["adaptive"] = outcome(judge, done, claimed, leader) | {"rounds": rounds, "sec": time.perf_counter() - t0,
                                                               "reason": reason.split(" (")[0].split(";")[0]}
    for name, cap in (("uniform, same n", len(done)), ("all pairs", None)):
        t0 = time.perf_counter()
        plan, _ = plan_round(judge.names, judge.examples, done.iloc[:0],
                             BudgetConfig(strategy="all-pairs", max_comparisons=cap), rng, orders=2)
        fixed = judge(plan)
        st = standing(fixed, judge.names, 0.95)  # one look, at the stated confidence
        out[name] = outcome(judge, fixed, st is not None and not st.challengers, st.leader if st else None) | {
            "rounds": 1, "sec": time.perf_counter() - t0, "reason": ""}
    return out


def wilson(k: int, n: int, z: float = 1.959964) -> str:
    """k/n with its Wilson 95% interval, e.g. '2/100 = 2.0% (0.6-7.0%)'."""
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{k}/{n} = {p:.1%} ({max(mid - half, 0):.1%}-{min(mid + half, 1):.1%})"


def main() -> int:
    """Run every case and print one table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 searches per case, 20 examples per dataset (seconds)")
    ap.add_argument("--searches", type=int, default=None, help="simulated searches per case (default 100, quick 3)")
    args = ap.parse_args()
    searches = args.searches or (3 if args.quick else 100)
    per_dataset = 20 if args.quick else 100
    nu = calibrate_nu(EFFECTS)
    t_start = time.perf_counter()
    rows, reasons = [], []
    for case in CASES:
        res = [one_search(case, s, per_dataset, nu) for s in range(searches)]
        for strategy in ("adaptive", "uniform, same n", "all pairs"):
            r = [x[strategy] for x in res]
            n = np.array([x["n"] for x in r])
            rows.append({
                "case": case, "strategy": strategy, "searches": len(r),
                "judgments mean": f"{n.mean():,.0f}", "median": f"{np.median(n):,.0f}",
                "separated claims": f"{sum(x['claim'] for x in r)}",
                "wrong-winner claims (Wilson 95%)": wilson(sum(x["wrong"] for x in r), len(r)),
                "true best on top": f"{np.mean([x['top'] for x in r]):.0%}",
                "rounds": f"{np.mean([x['rounds'] for x in r]):.1f}",
                "sec": f"{sum(x['sec'] for x in r):.0f}",
            })
        counts = pd.Series([x["adaptive"]["reason"] for x in res]).value_counts()
        reasons.append(f"# {case}, adaptive stops: " + "; ".join(f"{k}: {v}" for k, v in counts.items()))
    k_all = {c: k * (k - 1) // 2 * DATASETS * per_dataset * 2 for c, (k, _) in CASES.items()}
    print(_machine.header())
    print()
    print(f"# adaptive planning vs uniform allocation of the same judgments vs all pairs: {searches} simulated searches"
          f" per case, {DATASETS} datasets x {per_dataset} examples, both orders; per-example effects (s_u, s_w, s_v) ="
          f" {EFFECTS}, position bias {BIAS} nats, Davidson ties (nu {nu:.2f}); all pairs = "
          + ", ".join(f"{c} {n:,}" for c, n in k_all.items()) + " judgments")
    print("# wrong-winner claim: 'separated at 95%' said of a contender that is not strictly the best (nominal <= 5%)")
    print()
    print(_machine.table(rows, list(rows[0])))
    print()
    print("\n".join(reasons))
    print(f"# total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
