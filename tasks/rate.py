"""Bradley-Terry ratings with a tie model (solver: tasks/bt.py), on the Elo scale, with example-level bootstrap or
Fisher intervals.

The solver works on aggregated count matrices, never on one row per judgment: judgments are binned with
np.bincount into (dataset, outcome, i, j) counts, and bootstrap replicates are counts too, made by one
sparse product of a (rounds x examples) resampling matrix with an (examples x cells) count matrix.
All replicates of a scope are fitted at once by batched, damped Newton on the concave log-likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Mapping

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp

from tasks import progress
from tasks.config import RatingConfig  # defined with the rest of the config; importable from here too
from tasks.bt import bradley_terry, fit, tau_bounds  # noqa: F401  (bradley_terry: importable from here too)
from tasks.errors import UserError

# 400 Elo per factor of 10 in odds: one natural-log unit of strength is 400 / ln(10) ~= 173.7 Elo.
ELO_PER_NAT = 400.0 / math.log(10.0)
REQUIRED_COLUMNS = ("dataset", "example_id", "contender_a", "contender_b", "winner")
WINNERS = ("a", "b", "tie")
KINDS = ("candidate", "merge", "reference", "baseline")
RATING_COLUMNS = [
    "scope", "contender", "kind", "rating", "ci_low", "ci_high",
    "n_comparisons", "win_rate", "rank", "separated_from_next",
]
# Bootstrap replicates are materialised as dense (rounds, datasets, 3, K, K) counts in chunks of at most
# this many floats (2e7 floats = 160 MB), so 1,000 contenders bootstrap in small batches instead of 2.4 GB.
_MAX_CHUNK_FLOATS = 20_000_000


@dataclass(frozen=True)
class _Judged:
    """Judgments reduced to integer codes: one entry per usable judgment, pairs canonicalised to i < j."""

    names: np.ndarray  # contender names, sorted
    datasets: np.ndarray  # dataset names, sorted
    ds: np.ndarray  # dataset code per judgment
    ex: np.ndarray  # example code per judgment; examples are numbered dataset by dataset
    ex_ds: np.ndarray  # dataset code per example
    i: np.ndarray  # lower contender code
    j: np.ndarray  # higher contender code
    out: np.ndarray  # 0: i won, 1: j won, 2: tie
    w: np.ndarray  # weight of the verdict (strong_weight for strength 2)


# ----------------------------------------------------------------------------------------------- input


def _check_columns(judgments: pd.DataFrame, required: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    """Raise one line naming the missing judgment columns."""
    if not isinstance(judgments, pd.DataFrame):
        raise UserError(f"judgments must be a pandas DataFrame, got {type(judgments).__name__}")
    missing = [c for c in required if c not in judgments.columns]
    if missing:
        raise UserError(f"judgments are missing column(s): {', '.join(missing)} (need {', '.join(required)})")


def _usable(judgments: pd.DataFrame) -> pd.DataFrame:
    """Drop judgments with a non-empty error; check contenders and winner values."""
    _check_columns(judgments)
    df = judgments
    if "error" in df.columns:
        err = df["error"]
        failed = err.notna().to_numpy().copy()
        if failed.any():
            failed[failed] = err[failed].astype(str).str.len().to_numpy() > 0
            df = df.loc[~failed]
    if df["contender_a"].isna().any() or df["contender_b"].isna().any():
        raise UserError("judgments have empty contender_a/contender_b values")
    winner = df["winner"]
    bad = ~winner.isin(WINNERS).to_numpy()
    if bad.any():
        shown = sorted({str(v) for v in pd.unique(winner[bad])})[:5]
        raise UserError(f"judgments have unknown winner value(s) {', '.join(map(repr, shown))} (allowed: a, b, tie)")
    return df


def _codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of a column and its distinct values (factorize: hashing, no per-row Python)."""
    codes, uniques = pd.factorize(values)
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def _prepare(judgments: pd.DataFrame, cfg: RatingConfig) -> _Judged:
    """Validate the judgments and encode them as integer arrays; self-comparisons are dropped."""
    df = _usable(judgments)
    ca, ua = _codes(df["contender_a"])
    cb, ub = _codes(df["contender_b"])
    names = np.array(sorted({str(v) for v in ua} | {str(v) for v in ub}), dtype=object)
    if len(names) < 2:
        found = ", ".join(map(str, names)) or "none"
        raise UserError(f"judgments compare fewer than two contenders (found: {found}); need at least two to rate")
    pos = {n: k for k, n in enumerate(names)}
    a = np.array([pos[str(n)] for n in ua], dtype=np.int64)[ca]
    b = np.array([pos[str(n)] for n in ub], dtype=np.int64)[cb]
    ds_raw, ds_names = _codes(df["dataset"])
    ds_order = np.argsort([str(v) for v in ds_names], kind="stable")
    ds = np.argsort(ds_order)[ds_raw]  # datasets numbered in sorted name order
    datasets = np.array([str(ds_names[k]) for k in ds_order], dtype=object)
    # Examples are identified within their dataset; numbering by (dataset, example) keeps each dataset's
    # examples contiguous so the bootstrap can resample them dataset by dataset.
    ex_local, _ = _codes(df["example_id"])
    stride = int(ex_local.max(initial=0)) + 1
    ex, ukey = pd.factorize(ds * stride + ex_local, sort=True)
    ex_ds = (np.asarray(ukey) // stride).astype(np.int64)
    win_codes, win_names = _codes(df["winner"])
    out_ab = np.array([WINNERS.index(str(v)) for v in win_names], dtype=np.int64)[win_codes]
    keep = a != b
    # Canonical order i < j: when a > b the verdict flips (a win for a is a win for the higher code).
    swap = a > b
    i, j = np.where(swap, b, a), np.where(swap, a, b)
    out = np.where(swap & (out_ab < 2), 1 - out_ab, out_ab)
    w = np.ones(len(df))
    if "strength" in df.columns:
        strong = (pd.to_numeric(df["strength"], errors="coerce").to_numpy() == 2) & (out < 2)
        w[strong] = cfg.strong_weight
    if not keep.all():
        ds, ex, i, j, out, w = ds[keep], ex[keep], i[keep], j[keep], out[keep], w[keep]
    return _Judged(names, datasets, ds, ex.astype(np.int64), ex_ds, i, j, out, w)


def _counts(p: _Judged, weights: np.ndarray | None) -> np.ndarray:
    """Dense (datasets, 3, K, K) counts: [d, 0, i, j] i beat j, [d, 1, i, j] j beat i, [d, 2, i, j] ties (i < j)."""
    k, nd = len(p.names), len(p.datasets)
    flat = ((p.ds * 3 + p.out) * k + p.i) * k + p.j
    return np.bincount(flat, weights=weights, minlength=nd * 3 * k * k).reshape(nd, 3, k, k)


# ------------------------------------------------------------------------------------------- scopes


@dataclass
class _Scope:
    """One rating scope: a dataset, or all datasets pooled with equal weight."""

    name: str
    mix: np.ndarray  # weight of each dataset's counts in this scope
    members: np.ndarray  # contender codes compared in this scope
    model: str  # 'bt', 'davidson' or 'rao-kupper' (no ties in a scope -> plain Bradley-Terry)
    theta: np.ndarray | None = None
    tau: np.ndarray | None = None
    cov: np.ndarray | None = None
    boot: np.ndarray | None = None  # (B, members) bootstrap log-strengths


def _scope_matrices(counts: np.ndarray, scope: _Scope, cfg: RatingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Win matrix W[i,j] (i beat j) and symmetric tie matrix T of a scope, batched: counts is (B, D, 3, K, K)."""
    x = np.tensordot(counts, scope.mix, axes=([1], [0]))
    m = scope.members
    x = x[:, :, m][:, :, :, m]
    w = x[:, 0] + x[:, 1].transpose(0, 2, 1)
    t = x[:, 2] + x[:, 2].transpose(0, 2, 1)
    if cfg.ties == "half":
        w, t = w + 0.5 * t, np.zeros_like(t)
    return w, t


def _scopes(p: _Judged, raw: np.ndarray, weighted: np.ndarray, cfg: RatingConfig) -> list[_Scope]:
    """The per-dataset scopes and the pooled 'overall' scope (datasets weighted equally)."""
    nd = len(p.datasets)
    totals = weighted.sum(axis=(1, 2, 3))
    scopes = []
    for d in range(nd):
        mix = np.zeros(nd)
        mix[d] = 1.0
        scopes.append(_scope_for(str(p.datasets[d]), mix, raw, weighted, cfg))
    if nd > 1:
        # Equal weight per dataset: scale each so its total weight is the mean total (sum stays the same),
        # e.g. 10,000 and 1,000 judgments become 5,500 each, so neither dataset dominates the pooled fit.
        mix = np.where(totals > 0, totals.mean() / np.maximum(totals, 1e-12), 0.0)
        scopes.insert(0, _scope_for("overall", mix, raw, weighted, cfg))
    return scopes


def _scope_for(name: str, mix: np.ndarray, raw: np.ndarray, weighted: np.ndarray, cfg: RatingConfig) -> _Scope:
    """Build one scope: its members are the contenders with at least one judgment there."""
    n = np.tensordot(mix > 0, raw, axes=([0], [0])).sum(axis=0)
    per = n.sum(axis=1) + n.sum(axis=0)
    members = np.flatnonzero(per > 0)
    ties = np.tensordot(mix, weighted, axes=([0], [0]))[2].sum()
    model = "bt" if cfg.ties == "half" or ties <= 0 else cfg.ties
    return _Scope(name, mix, members, model)


# ------------------------------------------------------------------------------------------ bootstrap


def _resample_weights(p: _Judged, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """(rounds, examples) multinomial counts: each dataset's examples are redrawn with replacement."""
    e = len(p.ex_ds)
    r = np.zeros((rounds, e))
    for d in np.unique(p.ex_ds):
        cols = np.flatnonzero(p.ex_ds == d)
        r[:, cols] = rng.multinomial(len(cols), np.full(len(cols), 1.0 / len(cols)), size=rounds)
    return r


def _replicate_counts(p: _Judged, resample: np.ndarray) -> np.ndarray:
    """Counts of every bootstrap replicate at once: (B, E) resampling @ (E, cells) per-example counts."""
    k, nd = len(p.names), len(p.datasets)
    cells = nd * 3 * k * k
    flat = ((p.ds * 3 + p.out) * k + p.i) * k + p.j
    used = np.bincount(flat, minlength=cells) > 0
    col = (np.cumsum(used) - 1)[flat]
    n_used = int(used.sum())
    # (cells x examples) sparse matrix; duplicates (same example, same cell) are summed on construction.
    per_example = sp.csr_matrix((p.w, (col, p.ex)), shape=(n_used, len(p.ex_ds)))
    reps = np.asarray(per_example @ resample.T).T
    full = np.zeros((resample.shape[0], cells))
    full[:, used] = reps
    return full.reshape(resample.shape[0], nd, 3, k, k)


# --------------------------------------------------------------------------------------------- output


def _to_elo(theta: np.ndarray, anchor: int | None, cfg: RatingConfig) -> np.ndarray:
    """Log-strengths (..., K) to Elo ratings pinned at the anchor, or with the mean pinned."""
    ref = theta[..., anchor : anchor + 1] if anchor is not None else theta.mean(axis=-1, keepdims=True)
    return cfg.anchor_rating + ELO_PER_NAT * (theta - ref)


def _contrast_var(cov: np.ndarray, anchor: int | None) -> np.ndarray:
    """Variance of each theta_k minus the anchor's (or minus the mean theta), from the covariance of theta."""
    if anchor is None:
        # diag(P C P) with P = I - 11'/K, in O(K^2): C_kk - 2 mean_j C_kj + mean C (C is symmetric).
        return np.diag(cov) - 2 * cov.mean(axis=1) + cov.mean()
    return np.diag(cov) + cov[anchor, anchor] - 2 * cov[:, anchor]


def _scope_table(
    p: _Judged, scope: _Scope, raw: np.ndarray, kinds: Mapping[str, str], cfg: RatingConfig
) -> pd.DataFrame:
    """Ratings rows of one scope: point estimate, interval, counts, win rate, rank and separation."""
    m = scope.members
    names = [str(x) for x in p.names[m]]
    anchor = names.index(cfg.anchor) if cfg.anchor is not None and cfg.anchor in names else None
    rating = _to_elo(scope.theta, anchor, cfg)
    alpha = 1.0 - cfg.confidence
    order = np.argsort(-rating, kind="stable")
    nxt = np.empty(len(m), dtype=np.int64)
    nxt[order[:-1]] = order[1:]
    nxt[order[-1]] = order[-1]
    if scope.boot is not None:
        reps = _to_elo(scope.boot, anchor, cfg)
        lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2], axis=0)
        # Percentile intervals of a skewed bootstrap can miss the estimate; widen them to contain it.
        lo, hi = np.minimum(lo, rating), np.maximum(hi, rating)
        gap = reps - reps[:, nxt]
        sep = np.quantile(gap, alpha / 2, axis=0) > 0
    else:
        z = NormalDist().inv_cdf(1 - alpha / 2)
        se = ELO_PER_NAT * np.sqrt(np.maximum(_contrast_var(scope.cov, anchor), 0.0))
        lo, hi = rating - z * se, rating + z * se
        c = scope.cov
        idx = np.arange(len(m))
        gap_var = c[idx, idx] + c[nxt, nxt] - 2 * c[idx, nxt]
        sep = scope.theta - scope.theta[nxt] > z * np.sqrt(np.maximum(gap_var, 0.0))
    sep[order[-1]] = False
    x = np.tensordot(scope.mix > 0, raw, axes=([0], [0]))[:, m][:, :, m]
    wins = x[0] + x[1].T
    ties = x[2] + x[2].T
    n = wins.sum(axis=1) + wins.sum(axis=0) + ties.sum(axis=1)
    rank = np.empty(len(m), dtype=np.int64)
    rank[order] = np.arange(1, len(m) + 1)
    table = pd.DataFrame(
        {
            "scope": scope.name,
            "contender": names,
            "kind": [kinds.get(nm, "candidate") or "candidate" for nm in names],
            "rating": rating,
            "ci_low": lo,
            "ci_high": hi,
            "n_comparisons": n.astype(np.int64),
            "win_rate": (wins.sum(axis=1) + 0.5 * ties.sum(axis=1)) / np.maximum(n, 1),
            "rank": rank,
            "separated_from_next": sep,
        }
    )
    return table.iloc[order].reset_index(drop=True)


def _fit_scopes(p: _Judged, scopes: list[_Scope], weighted: np.ndarray, cfg: RatingConfig) -> None:
    """Point fits (and Fisher covariances) of every scope, then the bootstrap replicates if asked for."""
    for s in scopes:
        w, t = _scope_matrices(weighted[None], s, cfg)
        theta, tau, hess = fit(w, t, s.model, cfg.ridge, want_hess=cfg.ci == "fisher")
        s.theta, s.tau = theta[0], tau[0]
        if cfg.ci == "fisher":
            # Covariance of theta: the theta block of the inverse of the negative Hessian (tau profiled out).
            k = len(s.members)
            s.cov = scipy.linalg.cho_solve(scipy.linalg.cho_factor(-hess[0]), np.eye(len(hess[0])))[:k, :k]
    if cfg.ci != "bootstrap":
        return
    rng = np.random.default_rng(cfg.seed)
    resample = _resample_weights(p, cfg.bootstrap_rounds, rng)
    per_round = len(p.datasets) * 3 * len(p.names) ** 2
    chunk = max(1, _MAX_CHUNK_FLOATS // per_round)
    parts: dict[str, list[np.ndarray]] = {s.name: [] for s in scopes}
    # A bar only when it takes a while: the demo's 200 rounds of 7 contenders take ~0.2 s.
    with progress.bar("rate: bootstrap", cfg.bootstrap_rounds if per_round * cfg.bootstrap_rounds > 1e7 else 0,
                      "rounds") as bar:
        for start in range(0, cfg.bootstrap_rounds, chunk):
            counts = _replicate_counts(p, resample[start : start + chunk])
            for s in scopes:
                w, t = _scope_matrices(counts, s, cfg)
                theta, _, _ = fit(w, t, s.model, cfg.ridge, theta0=s.theta, tau0=s.tau)
                parts[s.name].append(theta)
            bar.advance(len(counts))
    for s in scopes:
        s.boot = np.concatenate(parts[s.name])


def rate(
    judgments: pd.DataFrame, kinds: Mapping[str, str] | None = None, cfg: RatingConfig = RatingConfig()
) -> pd.DataFrame:
    """Bradley-Terry ratings per dataset and pooled ('overall', datasets weighted equally), best first."""
    kinds = kinds or {}
    p = _prepare(judgments, cfg)
    raw = _counts(p, None)
    weighted = _counts(p, p.w)
    scopes = _scopes(p, raw, weighted, cfg)
    _fit_scopes(p, scopes, weighted, cfg)
    tables = [_scope_table(p, s, raw, kinds, cfg) for s in scopes]
    if len(p.datasets) == 1:
        # One dataset: the pooled rating is that dataset's fit.
        tables.insert(0, tables[0].assign(scope="overall"))
    return pd.concat(tables, ignore_index=True)[RATING_COLUMNS]


def win_matrix(judgments: pd.DataFrame, scope: str | None = None) -> pd.DataFrame:
    """Row contender's win rate against the column contender (ties as half; NaN where never compared)."""
    df = _usable(judgments)
    if scope not in (None, "overall"):
        df = df.loc[df["dataset"].astype(str) == scope]
    p = _prepare(df, RatingConfig()) if len(df) else None
    if p is None:
        return pd.DataFrame()
    x = _counts(p, None).sum(axis=0)
    wins = x[0] + x[1].T
    ties = x[2] + x[2].T
    n = wins + wins.T + ties
    with np.errstate(invalid="ignore", divide="ignore"):
        rate_ = np.where(n > 0, (wins + 0.5 * ties) / n, np.nan)
    names = [str(v) for v in p.names]
    return pd.DataFrame(rate_, index=pd.Index(names, name="contender"), columns=names)


def separated(ratings: pd.DataFrame) -> pd.DataFrame:
    """Ratings with `separated_from_next`: is each contender clear of the next one in rank within its scope?

    rate() computes it from the bootstrap (or Fisher) distribution of the gap; for a table without it,
    fall back to the conservative check that the two intervals do not overlap.
    """
    if "separated_from_next" in ratings.columns:
        return ratings
    out = ratings.sort_values(["scope", "rank"]).copy()
    next_high = out.groupby("scope")["ci_high"].shift(-1)
    out["separated_from_next"] = (out["ci_low"] > next_high).fillna(False).astype(bool)
    return out.loc[ratings.index]
