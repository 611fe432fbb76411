"""Coverage of the rating intervals: do the 95% intervals of rate() contain the truth 95% of the time?

A simulation with known strengths in which examples differ (the coverage target of the ratings' intervals). Each simulated
search judges every pair of 6 contenders on every one of 60 examples, in both orders (1,800 judgments), with:
- per-example random effects: on example e contender k plays at theta_k + u_ek (u ~ N(0, s_u^2)), so every pair and
  both orders of one example share the example's shifts; an (example, pair) shift w ~ N(0, s_w^2), shared by the two
  orders of that comparison; and a per-example tie propensity log nu_e = log nu + v_e (v ~ N(0, s_v^2)): easy
  examples, where both answers are right, tie more often;
- position bias: the contender shown first gains 0.3 nats;
- ties: Davidson's model with nu set per setting so that ~34% of the verdicts are ties; a share of the decisive
  verdicts is strong (strength 2; the default strong_weight is 1, so it does not change the fit).
Settings: none (s_u = s_w = s_v = 0), moderate (0.5, 0.3, 0.5) and strong (1.0, 0.6, 1.0).

Methods, all through the public rate() on the same judgments:
- example bootstrap: RatingConfig() as users get it (ci='bootstrap' over examples, its default rounds);
- sandwich: ci='sandwich' (the cluster-robust covariance H^-1 (sum_e g_e g_e^T) H^-1, score contributions summed per
  (dataset, example); as fast as Fisher; what the adaptive planner stops on);
- fisher: ci='fisher' (inverse observed information, every judgment independent);
- battle bootstrap: FastChat's `compute_bootstrap_bt` resampling unit, each judgment row redrawn independently,
  done by giving every row its own example_id so that rate()'s own bootstrap resamples rows (same rounds, same
  solver, same tie model: only the resampling unit differs from the default).

The truth. With random effects and position bias the data are not Davidson-distributed, and the default tie model
(Davidson) stretches the scale against plain win rates, so the generating theta is *not* what rate() estimates.
The estimand is the pseudo-true parameter: the limit of rate()'s fit as the number of examples grows, i.e. the
Davidson MLE of the *expected* counts of one example (the random effects integrated out by Gauss-Hermite quadrature,
both orders), fitted by the same solver (tasks.rating.bt.fit). This keeps the default tie model (what users get) instead of
switching to ties='half', and it also absorbs the attenuation that random effects cause; both would bias coverage if
the generating theta were used (the settings table prints both scales). Contenders with equal theta stay equal in the
pseudo-truth (they are exchangeable). The scale is pinned by RatingConfig(anchor='m5'): m5's rating is 1000 exactly, so
the rating coverage counts the 5 other contenders (a rating interval is then the interval of a difference to m5).
Pairwise differences: rate() is called once per anchor m1..m5 (same bootstrap seed), and the interval of m_i's rating
with anchor m_j is the interval of theta_i - theta_j; all 15 pairs are counted.

Truly equal pairs (m0 = m1 and m2 = m3 = m4: 4 of the 15 pairs): "false separation" is the share of them whose 95%
difference interval excludes 0; "false flags" is the share that rate() marks `separated_from_next` when adjacent in
rank. "Wrong marks" is the share of all `separated_from_next` marks that are not true strict orderings.
Cells show the share and, in brackets, its Monte Carlo standard error over the simulated searches.

python bench/coverage.py [--quick] [--sims N] [--examples E] [--rounds B]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see rating_speed.py: stable timings on a shared machine

import numpy as np
import pandas as pd
from numpy.polynomial.hermite_e import hermegauss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _machine
from tasks.config.schema import RatingConfig
from tasks.rating.bt import fit
from tasks.rating.rate import ELO_PER_NAT, rate

THETA = np.array([0.4, 0.4, 0.1, 0.1, 0.1, -0.3])  # true log-strengths (nats); m0 = m1, m2 = m3 = m4
NAMES = [f"m{k}" for k in range(len(THETA))]
ANCHOR = len(THETA) - 1  # m5, pinned at 1000
BIAS = 0.3  # nats for the contender shown first
TIE_SHARE = 0.34
STRONG = 0.35  # share of decisive verdicts that are strong (~23% of all verdicts)
SETTINGS = {"none": (0.0, 0.0, 0.0), "moderate": (0.5, 0.3, 0.5), "strong": (1.0, 0.6, 1.0)}  # (s_u, s_w, s_v)
METHODS = ("example bootstrap", "sandwich", "fisher", "battle bootstrap")
PAIRS = [(i, j) for i in range(len(THETA)) for j in range(i + 1, len(THETA))]


def davidson(d: np.ndarray, nu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P(a wins), P(b wins), P(tie) for strength difference d (a minus b, position bias included) and tie factor nu."""
    ea, eb = np.exp(d / 2), np.exp(-d / 2)
    den = ea + eb + nu
    return ea / den, eb / den, nu / den


def expected(setting: tuple[float, float, float], nu: float, n: int = 48) -> tuple[np.ndarray, np.ndarray, float]:
    """Expected (K, K) wins W[i, j] (i beat j) and ties T (symmetric) of one example, both orders; and the tie share."""
    s_u, s_w, s_v = setting
    x, wx = hermegauss(n)
    wx = wx / wx.sum()
    z = np.sqrt(2 * s_u**2 + s_w**2) * x[:, None]  # u_i - u_j + w: the pair's share of the example's effects
    v = np.exp(s_v * x[None, :])  # tie propensity factor
    wgt = wx[:, None] * wx[None, :]
    k = len(THETA)
    w, t = np.zeros((k, k)), np.zeros((k, k))
    for i, j in PAIRS:
        d = THETA[i] - THETA[j] + z
        pa1, pb1, pt1 = davidson(d + BIAS, nu * v)  # order ab: i shown first
        pa2, pb2, pt2 = davidson(d - BIAS, nu * v)  # order ba: j shown first
        w[i, j] = (wgt * (pa1 + pa2)).sum()
        w[j, i] = (wgt * (pb1 + pb2)).sum()
        t[i, j] = t[j, i] = (wgt * (pt1 + pt2)).sum()
    share = t[np.triu_indices(k, 1)].sum() / (2 * len(PAIRS))
    return w, t, share


def calibrate_nu(setting: tuple[float, float, float]) -> float:
    """The tie factor nu giving TIE_SHARE ties in expectation (bisection on log nu)."""
    lo, hi = -5.0, 5.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(setting, np.exp(mid))[2] < TIE_SHARE else (lo, mid)
    return float(np.exp((lo + hi) / 2))


def pseudo_truth(setting: tuple[float, float, float], nu: float) -> np.ndarray:
    """Elo ratings (anchor m5 at 1000) that rate()'s default Davidson fit converges to: the MLE of expected counts."""
    w, t, _ = expected(setting, nu)
    scale = 1e6  # many examples' worth, so the ridge is negligible as it is in rate()
    theta, _, _ = fit(scale * w[None], scale * t[None], "davidson", 1e-6)
    return ELO_PER_NAT * (theta[0] - theta[0][ANCHOR]) + 1000.0


def simulate(setting: tuple[float, float, float], nu: float, n_examples: int, rng: np.random.Generator) -> pd.DataFrame:
    """One search's judgments: every pair on every example, both orders, with the example's random effects."""
    s_u, s_w, s_v = setting
    k, p = len(THETA), len(PAIRS)
    i = np.array([a for a, _ in PAIRS])
    j = np.array([b for _, b in PAIRS])
    u = rng.normal(0.0, s_u, (n_examples, k)) if s_u else np.zeros((n_examples, k))
    w = rng.normal(0.0, s_w, (n_examples, p)) if s_w else np.zeros((n_examples, p))
    v = rng.normal(0.0, s_v, n_examples) if s_v else np.zeros(n_examples)
    d = THETA[i] - THETA[j] + u[:, i] - u[:, j] + w  # (E, P)
    d2 = np.stack([d + BIAS, d - BIAS], axis=2)  # (E, P, 2): order ab, ba
    nu_e = np.broadcast_to((nu * np.exp(v))[:, None, None], d2.shape)
    pa, _, pt = davidson(d2, nu_e)
    r = rng.random(d2.shape)
    winner = np.where(r < pa, "a", np.where(r < pa + pt, "tie", "b"))
    strength = np.where(winner == "tie", 0, np.where(rng.random(d2.shape) < STRONG, 2, 1))
    ex = np.broadcast_to(np.arange(n_examples)[:, None, None], d2.shape)
    names = np.array(NAMES)
    return pd.DataFrame({
        "dataset": "sim",
        "example_id": [f"ex-{x}" for x in ex.ravel()],
        "contender_a": np.broadcast_to(names[i][None, :, None], d2.shape).ravel(),
        "contender_b": np.broadcast_to(names[j][None, :, None], d2.shape).ravel(),
        "order": np.broadcast_to(np.array(["ab", "ba"])[None, None, :], d2.shape).ravel(),
        "winner": winner.ravel(),
        "strength": strength.ravel(),
        "error": None,
    })


def intervals(df: pd.DataFrame, cfg: RatingConfig) -> tuple[dict, pd.DataFrame]:
    """{(i, j): (estimate, low, high)} of theta_i - theta_j in Elo for every pair, and the table anchored at m5."""
    out: dict[tuple[int, int], tuple[float, float, float]] = {}
    base = None
    for anchor in range(1, len(THETA)):
        r = rate(df, {}, RatingConfig(**{**cfg.model_dump(), "anchor": NAMES[anchor]}))
        r = r[r["scope"] == "overall"].set_index("contender")
        if (r["unbounded"] != "").any():
            raise RuntimeError(f"an unbounded contender in a simulated search: {r['note'].tolist()}")
        for i in range(anchor):
            row = r.loc[NAMES[i]]
            out[(i, anchor)] = (row.rating - 1000.0, row.ci_low - 1000.0, row.ci_high - 1000.0)
        if anchor == ANCHOR:
            base = r
    return out, base


def score(diffs: dict, table: pd.DataFrame, truth: np.ndarray) -> dict[str, float]:
    """One search, one method: coverage counts, widths, estimates and separation marks."""
    true_d = {(i, j): truth[i] - truth[j] for i, j in PAIRS}
    cov = {p: lo <= true_d[p] <= hi for p, (_, lo, hi) in diffs.items()}
    rated = [(i, ANCHOR) for i in range(ANCHOR)]
    equal = [p for p in PAIRS if THETA[p[0]] == THETA[p[1]]]
    excl = [not (diffs[p][1] <= 0.0 <= diffs[p][2]) for p in equal]
    order = table.sort_values("rank").index.tolist()
    flags = {(order[r], order[r + 1]) for r in range(len(order) - 1) if table.loc[order[r], "separated_from_next"]}
    pos = {n: k for k, n in enumerate(NAMES)}
    marks = [(pos[a], pos[b]) for a, b in flags]
    flagged_equal = [((NAMES[a], NAMES[b]) in flags or (NAMES[b], NAMES[a]) in flags) for a, b in equal]
    return {
        "rating_cov": np.mean([cov[p] for p in rated]),
        "diff_cov": np.mean(list(cov.values())),
        "false_sep": np.mean(excl),
        "false_flag": np.mean(flagged_equal),
        "marks": len(marks),
        "wrong_marks": sum(THETA[a] <= THETA[b] for a, b in marks),
        "width": np.mean([diffs[p][2] - diffs[p][1] for p in rated]),
        "est": np.array([diffs[p][0] for p in rated]),
    }


def cell(values: list[float]) -> str:
    """Mean share and its standard error over searches, as '94.2% (0.6)'."""
    x = np.asarray(values, dtype=float)
    se = x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    return f"{x.mean():.1%} ({100 * se:.1f})"


def main() -> int:
    """Simulate, rate with each method, print the settings and one table of coverage."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 searches per setting (seconds)")
    ap.add_argument("--sims", type=int, default=None, help="simulated searches per setting (default 300, quick 10)")
    ap.add_argument("--examples", type=int, default=60, help="examples per search (all pairs, both orders on each)")
    ap.add_argument("--rounds", type=int, default=None, help="bootstrap rounds (default: RatingConfig's default)")
    args = ap.parse_args()
    sims = args.sims or (10 if args.quick else 300)
    rounds = args.rounds or RatingConfig().bootstrap_rounds
    t_start = time.perf_counter()
    rows, truth_rows = [], []
    for name, setting in SETTINGS.items():
        nu = calibrate_nu(setting)
        truth = pseudo_truth(setting, nu)
        res: dict[str, list[dict]] = {m: [] for m in METHODS}
        ties, strong = [], []
        t0 = time.perf_counter()
        for s in range(sims):
            rng = np.random.default_rng([13, list(SETTINGS).index(name), s])
            df = simulate(setting, nu, args.examples, rng)
            ties.append((df.winner == "tie").mean())
            strong.append((df.strength == 2).mean())
            battle = df.assign(example_id=np.arange(len(df)))  # every row its own resampling unit
            cfgs = {
                "example bootstrap": (df, RatingConfig(bootstrap_rounds=rounds, seed=s)),
                "sandwich": (df, RatingConfig(ci="sandwich")),
                "fisher": (df, RatingConfig(ci="fisher")),
                "battle bootstrap": (battle, RatingConfig(bootstrap_rounds=rounds, seed=s)),
            }
            for m, (data, cfg) in cfgs.items():
                t1 = time.perf_counter()
                diffs, table = intervals(data, cfg)
                res[m].append(score(diffs, table, truth) | {"ms": 1000 * (time.perf_counter() - t1) / (len(THETA) - 1)})
        sec = time.perf_counter() - t0
        check = "-"
        if not args.quick:  # the estimand, checked: one search with 20,000 examples lands on the pseudo-truth
            big = rate(simulate(setting, nu, 20_000, np.random.default_rng([13, 99])), {},
                       RatingConfig(ci="fisher", anchor=NAMES[ANCHOR]))
            big = big[big["scope"] == "overall"].set_index("contender")
            check = " ".join(f"{big.loc[n, 'rating']:.0f}" for n in NAMES[:ANCHOR])
        est = np.stack([r["est"] for r in res["fisher"]])  # the point estimate is the same for every method
        gen = ELO_PER_NAT * (THETA - THETA[ANCHOR]) + 1000.0
        truth_rows.append({
            "setting": name, "s_u, s_w, s_v": ", ".join(f"{x:g}" for x in setting), "nu": f"{nu:.2f}",
            "ties": f"{np.mean(ties):.1%}", "strong": f"{np.mean(strong):.1%}",
            "generating Elo m0..m5": " ".join(f"{x:.0f}" for x in gen),
            "pseudo-true Elo m0..m5": " ".join(f"{x:.0f}" for x in truth),
            "one 20k-example fit m0..m4": check,
            "mean estimate m0..m4": " ".join(f"{1000 + x:.0f}" for x in est.mean(axis=0)),
            "sd of estimate m0..m4": " ".join(f"{x:.1f}" for x in est.std(axis=0, ddof=1)),
            "sec": f"{sec:.0f}",
        })
        for m in METHODS:
            rs = res[m]
            marks = sum(r["marks"] for r in rs)
            wrong = sum(r["wrong_marks"] for r in rs)
            rows.append({
                "setting": name, "method": m,
                "rating coverage": cell([r["rating_cov"] for r in rs]),
                "difference coverage": cell([r["diff_cov"] for r in rs]),
                "false separation (equal pairs)": cell([r["false_sep"] for r in rs]),
                "false flags (equal pairs)": cell([r["false_flag"] for r in rs]),
                "wrong marks / marks": f"{wrong}/{marks} = {wrong / max(marks, 1):.1%}",
                "mean width (Elo)": f"{np.mean([r['width'] for r in rs]):.1f}",
                "ms per rate()": f"{np.mean([r['ms'] for r in rs]):.0f}",
            })
    total = time.perf_counter() - t_start
    print(_machine.header())
    print()
    print(f"# coverage of 95% intervals: {len(THETA)} contenders (theta = {', '.join(f'{x:g}' for x in THETA)} nats),"
          f" {args.examples} examples x {len(PAIRS)} pairs x 2 orders = {args.examples * len(PAIRS) * 2:,} judgments"
          f" per search, {sims} searches per setting")
    print(f"# position bias {BIAS} nats (first shown), ties ~{TIE_SHARE:.0%} (Davidson nu per setting), "
          f"{STRONG:.0%} of decisive verdicts strong (strong_weight 1); default tie model (Davidson), "
          f"anchor m5 = 1000; bootstrap rounds {rounds}; truth = pseudo-true Davidson fit of the expected counts")
    print()
    print(_machine.table(truth_rows, list(truth_rows[0])))
    print()
    print(_machine.table(rows, list(rows[0])))
    print()
    print(f"# rating coverage: the 5 non-anchor contenders' intervals (differences to m5); difference coverage: all "
          f"{len(PAIRS)} pairs; false separation: the 95% difference interval of a truly equal pair excludes 0 "
          f"(nominal 5%); false flags: rate() marks an equal pair separated_from_next; (n.n) = Monte Carlo s.e. in "
          f"points over searches")
    print(f"# total {total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
