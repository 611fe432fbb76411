"""Bradley-Terry ratings with a tie model (solver: tasks/rating/bt.py), on the Elo scale, with example-level bootstrap or
Fisher intervals.

The solver works on aggregated count matrices, never on one row per judgment: judgments are binned with
np.bincount into (dataset, outcome, i, j) counts, and bootstrap replicates are counts too, made by one
sparse product of a (rounds x examples) resampling matrix with an (examples x cells) count matrix.
All replicates of a scope are fitted at once by batched, damped Newton on the concave log-likelihood.

Guards: contenders never compared (directly or through others) form separate groups, each rated on its own scale and
never marked separated across; a contender that never lost (never won) has no finite maximum-likelihood rating, so it
is left out of the fit and reported unbounded with a one-sided bound; contenders whose judgments all failed are listed,
unrated, with the most common error; a named anchor must be a contender.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits
from scipy.sparse.csgraph import connected_components

from tasks.config.schema import RatingConfig
from tasks.rating.bt import fit, sweep_bound
from tasks.rating.judged import Judged, check_anchor, common_error, outcome_counts, prepare_judgments
from tasks.rating.length_control import Controlled
from tasks.rating.scopes import MAX_CHUNK_FLOATS, Scope, fit_scopes, make_scopes, scope_for, scope_matrices

# 400 Elo per factor of 10 in odds: one natural-log unit of strength is 400 / ln(10) ~= 173.7 Elo.
ELO_PER_NAT = 400.0 / math.log(10.0)
KINDS = ("candidate", "merge", "reference", "baseline")
RATING_COLUMNS = [
    "scope", "contender", "kind", "rating", "ci_low", "ci_high",
    "n_comparisons", "win_rate", "rank", "separated_from_next",
    # Guards: `group` numbers the sets of contenders linked by comparisons (ratings in different groups
    # are not comparable); `unbounded` is 'above' (unbeaten: lower bound only) or 'below' (never won); `note` says
    # why in words; `ci_method` and `ci_level` say how the intervals were made, so a report labels them truly.
    "group", "unbounded", "note", "ci_method", "ci_level",
    # `rating_arena`: the same judgments as FastChat and Chatbot Arena rate them (a tie half a win for each side, all
    # of a scope's judgments in one pool), on the same anchor: comparable with Arena's numbers, where the default
    # Davidson ratings are stretched ~1.9x against half-win ties.
    "rating_arena",
]
# With rating.length_control: the plain fit beside the controlled one (which then fills rating, ci_low, ci_high,
# rank), and the length term in Elo per unit of (len_a - len_b) / (len_a + len_b) with its interval, per scope.
LENGTH_COLUMNS = ["rating_raw", "ci_low_raw", "ci_high_raw", "length_coef", "length_coef_low", "length_coef_high"]
_MAX_CHUNK_FLOATS = MAX_CHUNK_FLOATS  # floats per chunk of bootstrap counts (tasks/rating/scopes.py); tests set it here


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


def _components(n: np.ndarray) -> np.ndarray:
    """Connected components (0, 1, ...) of the graph whose edges are the compared pairs (n[i, j] > 0)."""
    return connected_components(sp.csr_matrix(n > 0), directed=False)[1].astype(np.int64)


def _local_anchor(idx: np.ndarray, anchor: int | None) -> int | None:
    """The anchor's position within the index set idx, or None when it is not in it."""
    hit = np.flatnonzero(idx == anchor) if anchor is not None else []
    return int(hit[0]) if len(hit) else None


def _grouped_elo(theta: np.ndarray, labels: np.ndarray, anchor: int | None, cfg: RatingConfig) -> np.ndarray:
    """Elo ratings (..., K), each group pinned on its own: at the anchor in its group, elsewhere at the group's mean.

    Groups never compared with each other share no scale (only the ridge would set their offsets), so each gets its
    own reference; with one group this is _to_elo itself.
    """
    if labels.max() == 0:
        return _to_elo(theta, anchor, cfg)
    out = np.empty_like(theta)
    for g in np.unique(labels):
        idx = np.flatnonzero(labels == g)
        out[..., idx] = _to_elo(theta[..., idx], _local_anchor(idx, anchor), cfg)
    return out


def _grouped_var(cov: np.ndarray, labels: np.ndarray, anchor: int | None) -> np.ndarray:
    """Variance of each log-strength minus its group's reference (the anchor, or the group's mean)."""
    if labels.max() == 0:
        return _contrast_var(cov, anchor)  # the covariance as it is: a copy would sum in another order
    out = np.empty(len(labels))
    for g in np.unique(labels):
        idx = np.flatnonzero(labels == g)
        out[idx] = _contrast_var(cov[np.ix_(idx, idx)], _local_anchor(idx, anchor))
    return out


def _core_intervals(
    scope: Scope, labels: np.ndarray, anchor: int | None, cfg: RatingConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Ratings, interval ends and (bootstrap) Elo replicates of the fitted contenders, each group on its reference."""
    rating = _grouped_elo(scope.theta, labels, anchor, cfg)
    alpha = 1.0 - cfg.confidence
    if scope.boot is not None:
        reps = _grouped_elo(scope.boot, labels, anchor, cfg)
        lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2], axis=0)
        # Percentile intervals of a skewed bootstrap can miss the estimate; widen them to contain it.
        return rating, np.minimum(lo, rating), np.maximum(hi, rating), reps
    z = NormalDist().inv_cdf(1 - alpha / 2)
    se = ELO_PER_NAT * np.sqrt(np.maximum(_grouped_var(scope.cov, labels, anchor), 0.0))
    return rating, rating - z * se, rating + z * se, None


@dataclass
class _Rows:
    """Per-contender columns of one scope being assembled (everyone compared there, in code order)."""

    rating: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    group: np.ndarray  # component label, -1 until placed
    tier: np.ndarray  # 0 unbeaten, 1 fitted, 2 never won: the order within a group
    key: np.ndarray  # order within a tier (ascending)
    unbounded: np.ndarray
    note: np.ndarray


def _distinct_examples(p: Judged, mix: np.ndarray) -> np.ndarray:
    """(K, K) symmetric count of the distinct examples on which each pair was judged, in the scope's datasets."""
    k = len(p.names)
    sel = (mix > 0)[p.ds]
    key = np.unique((p.ex[sel] * k + p.i[sel]) * k + p.j[sel])
    c = np.bincount(key % (k * k), minlength=k * k).reshape(k, k)
    return c + c.T


def _place_peeled(p: Judged, scope: Scope, pos: dict[int, int], met: np.ndarray, rows: _Rows,
                  cfg: RatingConfig) -> None:
    """Group and bound every peeled contender, the last peeled first (the opponents it swept are placed by then).

    The bound is one-sided at (1 - confidence) / 2: the lowest rating (highest, for one that never won) at which its
    clean sweep over the distinct examples it was judged on is still that likely, the opponents at their ratings.
    """
    every = scope.everyone
    n_ex = _distinct_examples(p, scope.mix)[np.ix_(every, every)]
    log_p = math.log((1.0 - cfg.confidence) / 2)
    tau = float(scope.tau) if scope.tau is not None else 0.0
    seq = [(c, "above", k) for k, c in enumerate(scope.above)] + [(c, "below", k) for k, c in enumerate(scope.below)]
    for code, side, k in reversed(seq):
        q = pos[code]
        placed = np.flatnonzero((rows.group >= 0) & (met[q] > 0))
        rows.group[q] = rows.group[placed[np.argmax(met[q, placed])]] if len(placed) else rows.group.max() + 1
        same = placed[rows.group[placed] == rows.group[q]]
        up = side == "above"
        # Opponents with a finite stand-in: a fitted rating, or the bound of one peeled on the same side.
        other = rows.lo[same] if up else rows.hi[same]
        ok = same[np.isfinite(other) & (rows.unbounded[same] != ("below" if up else "above"))]
        stand = np.where(rows.unbounded[ok] == "", rows.rating[ok], rows.lo[ok] if up else rows.hi[ok]) / ELO_PER_NAT
        sign = 1.0 if up else -1.0
        bound = (sign * ELO_PER_NAT * sweep_bound(sign * stand, n_ex[q, ok], tau, scope.model, log_p)
                 if len(ok) else -sign * math.inf)
        rows.rating[q] = sign * math.inf
        rows.lo[q], rows.hi[q] = (bound, math.inf) if up else (-math.inf, bound)
        rows.tier[q], rows.key[q] = (0, k) if up else (2, -k)
        rows.unbounded[q] = side
        swept, total = int(met[q, placed].sum()), int(met[q].sum())
        what = ("unbeaten: won", "won", "lost", "below", "above", "lower") if up else (
            "never won: lost", "lost", "won", "above", "below", "upper")
        # Peeled after another (A beat B, B beat C: B is peeled second) it swept only those left, not every judgment.
        how = (f"{what[0]} all {total} judgments" if swept == total else
               f"{what[1]} all {swept} judgments against those {what[3]} it, {what[2]} only to those {what[4]}")
        rows.note[q] = f"{how}, so the rating is unbounded {what[4]}; {cfg.confidence:.0%} {what[5]} bound only"


def _separation(order: np.ndarray, rows: _Rows, cidx: np.ndarray, reps: np.ndarray | None, scope: Scope,
                cfg: RatingConfig) -> np.ndarray:
    """Is each contender clear of the next one in rank? Never across groups (they were never compared)."""
    alpha = 1.0 - cfg.confidence
    sep = np.zeros(len(rows.rating), dtype=bool)
    a, b = order[:-1], order[1:]
    same = rows.group[a] == rows.group[b]
    both = same & (rows.tier[a] == 1) & (rows.tier[b] == 1)
    ca, cb = cidx[a[both]], cidx[b[both]]
    if reps is not None:
        sep[a[both]] = np.quantile(reps[:, ca] - reps[:, cb], alpha / 2, axis=0) > 0
    else:
        z = NormalDist().inv_cdf(1 - alpha / 2)
        c = scope.cov
        gap_var = c[ca, ca] + c[cb, cb] - 2 * c[ca, cb]
        sep[a[both]] = scope.theta[ca] - scope.theta[cb] > z * np.sqrt(np.maximum(gap_var, 0.0))
    # A bound against an interval: separated only when they do not overlap (conservative).
    rest = same & ~both
    sep[a[rest]] = rows.lo[a[rest]] > rows.hi[b[rest]]
    return sep


def _group_numbers(rows: _Rows, met: np.ndarray) -> np.ndarray:
    """Groups numbered 1, 2, ... by size, then by judgments (the main group is 1)."""
    labels = np.unique(rows.group)
    size = np.bincount(rows.group)[labels]
    games = np.bincount(rows.group, weights=met.sum(axis=1))[labels]
    rank = np.empty(len(labels), dtype=np.int64)
    rank[np.lexsort((labels, -games, -size))] = np.arange(1, len(labels) + 1)
    lookup = np.zeros(rows.group.max() + 1, dtype=np.int64)
    lookup[labels] = rank
    return lookup[rows.group]


def _scope_table(
    p: Judged, scope: Scope, raw: np.ndarray, kinds: Mapping[str, str], cfg: RatingConfig
) -> pd.DataFrame:
    """Ratings rows of one scope: point estimate, interval, counts, win rate, rank, separation and the guards."""
    every = scope.everyone
    pos = {int(c): k for k, c in enumerate(every)}
    names = [str(x) for x in p.names[every]]
    x = np.tensordot(scope.mix > 0, raw, axes=([0], [0]))[:, every][:, :, every]
    wins = x[0] + x[1].T
    ties = x[2] + x[2].T
    met = wins + wins.T + ties  # judgments of each pair
    core = np.array([pos[int(c)] for c in scope.members], dtype=np.int64)
    core_names = [names[k] for k in core]
    anchor = core_names.index(cfg.anchor) if cfg.anchor is not None and cfg.anchor in core_names else None
    labels = _components(met[np.ix_(core, core)])
    rating_c, lo_c, hi_c, reps = _core_intervals(scope, labels, anchor, cfg)
    e = len(every)
    rows = _Rows(np.full(e, np.nan), np.full(e, np.nan), np.full(e, np.nan), np.full(e, -1, dtype=np.int64),
                 np.ones(e, dtype=np.int64), np.zeros(e), np.full(e, "", dtype=object), np.full(e, "", dtype=object))
    rows.rating[core], rows.lo[core], rows.hi[core], rows.group[core] = rating_c, lo_c, hi_c, labels
    rows.key[core] = -rating_c
    if scope.above or scope.below:
        _place_peeled(p, scope, pos, met, rows, cfg)
    group = _group_numbers(rows, met)
    rows.group = group
    order = np.lexsort((rows.key, rows.tier, group))  # stable: one group, no peeling = argsort(-rating, stable)
    cidx = np.full(e, -1, dtype=np.int64)
    cidx[core] = np.arange(len(core))
    sep = _separation(order, rows, cidx, reps, scope, cfg)
    if group.max() > 1:
        for k in np.flatnonzero(group > 1):
            alone = f"group {group[k]}: never compared, directly or through common opponents, with group 1"
            rows.note[k] = "; ".join(filter(None, [rows.note[k], alone + "; rated on its own scale"]))
    if cfg.anchor in names and cfg.anchor not in core_names:
        k = names.index(cfg.anchor)
        rows.note[k] += f"; the anchor is unbounded here, so its group's mean is pinned at {cfg.anchor_rating:g}"
    n = wins.sum(axis=1) + wins.sum(axis=0) + ties.sum(axis=1)
    rank = np.empty(e, dtype=np.int64)
    rank[order] = np.arange(1, e + 1)
    table = pd.DataFrame(
        {
            "scope": scope.name,
            "contender": names,
            "kind": [kinds.get(nm, "candidate") or "candidate" for nm in names],
            "rating": rows.rating,
            "ci_low": rows.lo,
            "ci_high": rows.hi,
            "n_comparisons": n.astype(np.int64),
            "win_rate": (wins.sum(axis=1) + 0.5 * ties.sum(axis=1)) / np.maximum(n, 1),
            "rank": rank,
            "separated_from_next": sep,
            "group": group,
            "unbounded": rows.unbounded,
            "note": rows.note,
        }
    )
    table = pd.concat([table.iloc[order], _failed_rows(p, scope, set(names), kinds, e)], ignore_index=True)
    return table.assign(ci_method=cfg.ci, ci_level=cfg.confidence)


def _failed_rows(p: Judged, scope: Scope, rated: set[str], kinds: Mapping[str, str], after: int) -> pd.DataFrame:
    """Rows for the scope's contenders with no usable judgment: no rating, ranked last, the reason in `note`."""
    f = p.failed
    if scope.name != "overall":
        f = f[f["dataset"].astype(str) == scope.name]
    if len(f) == 0:
        return pd.DataFrame()
    sides = [f[[c, "error"]].set_axis(["contender", "error"], axis=1) for c in ("contender_a", "contender_b")]
    long = pd.concat(sides, ignore_index=True).astype({"contender": str})
    long = long[~long["contender"].isin(rated)]
    out = []
    for name, errs in long.groupby("contender", sort=True)["error"]:
        out.append({"scope": scope.name, "contender": name, "kind": kinds.get(name, "candidate") or "candidate",
                    "rating": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n_comparisons": 0, "win_rate": np.nan,
                    "rank": after + len(out) + 1, "separated_from_next": False, "group": 0, "unbounded": "",
                    "note": f"not rated: all {len(errs)} judgments failed ({common_error(errs.to_frame())})"})
    return pd.DataFrame(out)


def rate(
    judgments: pd.DataFrame, kinds: Mapping[str, str] | None = None, cfg: RatingConfig = RatingConfig()
) -> pd.DataFrame:
    """Bradley-Terry ratings per dataset and pooled ('overall', datasets weighted equally), best first."""
    return rate_with_cov(judgments, kinds, cfg)[0]


def rate_with_cov(
    judgments: pd.DataFrame, kinds: Mapping[str, str] | None = None, cfg: RatingConfig = RatingConfig()
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """rate() and the pooled scope's covariance of the fitted contenders' ratings (Elo^2; empty for the bootstrap).

    Var(rating_a - rating_b) = C[a, a] + C[b, b] - 2 C[a, b]: the gap test of any two contenders (the planner's).
    """
    return rate_judged(prepare_judgments(judgments, cfg), kinds, cfg)


def rate_judged(p: Judged, kinds: Mapping[str, str] | None, cfg: RatingConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """rate_with_cov() of judgments already encoded (tasks.rating.judged.Judged: flows.rank reads Parquet into one).

    One BLAS thread: the fit's work is many small Newton systems (200 contenders: 201x201), where OpenBLAS's second
    thread only waits on the first. 1M judgments of 200 contenders, 200 bootstrap rounds, at load 3: 11.8 CPU s and
    22.6 s wall with one thread against 25.0 CPU s and 49.9 s with two (bench/rank_scale.py's file).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _rate_judged(p, kinds, cfg)


def _rate_judged(p: Judged, kinds: Mapping[str, str] | None, cfg: RatingConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """rate_judged() within its thread limit."""
    kinds = kinds or {}
    check_anchor(p, cfg)
    raw = outcome_counts(p, None)
    weighted = outcome_counts(p, p.w)
    scopes = make_scopes(p, raw, weighted, cfg)
    # length control fits its point first and its bootstrap replicates on the plain bootstrap's draws (made once)
    controlled = Controlled(p, scopes, cfg) if cfg.length_control else None
    fit_scopes(p, scopes, weighted, cfg, controlled.replicates if controlled is not None else None, _MAX_CHUNK_FLOATS)
    table = _tables(p, scopes, raw, kinds, cfg)
    table = table.merge(_arena(p, scopes, raw, weighted, cfg), on=["scope", "contender"], how="left")
    top = scopes[0] if scopes and scopes[0].cov is not None else None  # 'overall', or the only dataset
    names = [str(x) for x in p.names[top.members]] if top is not None else []
    cov = pd.DataFrame(ELO_PER_NAT**2 * top.cov if top is not None else np.empty((0, 0)), index=names, columns=names)
    if controlled is None:
        return table[RATING_COLUMNS], cov
    lc_scopes, coef = controlled.result()
    plain = table.set_index(["scope", "contender"])
    lc = _tables(p, lc_scopes, raw, kinds, cfg).drop(columns="rating_arena", errors="ignore")
    key = pd.MultiIndex.from_frame(lc[["scope", "contender"]])
    lc["rating_arena"] = plain["rating_arena"].reindex(key).to_numpy()
    for col in ("rating", "ci_low", "ci_high"):
        lc[f"{col}_raw"] = plain[col].reindex(key).to_numpy()
    if len(p.datasets) == 1:
        coef["overall"] = coef[scopes[0].name]
    for k, col in enumerate(["length_coef", "length_coef_low", "length_coef_high"]):
        lc[col] = lc["scope"].map({n: ELO_PER_NAT * c[k] for n, c in coef.items() if len(c) > k}).astype(float)
    return lc[RATING_COLUMNS + LENGTH_COLUMNS], cov


def _tables(p: Judged, scopes: list[Scope], raw: np.ndarray, kinds: Mapping[str, str], cfg: RatingConfig
            ) -> pd.DataFrame:
    """Every scope's table, the pooled one first."""
    tables = [_scope_table(p, s, raw, kinds, cfg) for s in scopes]
    if len(p.datasets) == 1:
        # One dataset: the pooled rating is that dataset's fit (its table made again for the failures of every dataset).
        tables.insert(0, _scope_table(p, dataclasses.replace(scopes[0], name="overall"), raw, kinds, cfg))
    return pd.concat(tables, ignore_index=True)


def _arena(p: Judged, scopes: list[Scope], raw: np.ndarray, weighted: np.ndarray, cfg: RatingConfig) -> pd.DataFrame:
    """Each scope's half-win-ties fit of all its judgments in one pool (FastChat's compute_bt): scope, contender,
    rating_arena; each never-compared group on its own scale, unbeaten (never winning) contenders at +inf (-inf)."""
    half = cfg.model_copy(update={"ties": "half"})
    rows = []
    for s in scopes:
        pool = scope_for(s.name, (s.mix > 0).astype(float), raw, weighted, half)
        w, t = scope_matrices(weighted[None], pool, half)
        theta = fit(w, t, "bt", cfg.ridge)[0][0]
        names = [str(x) for x in p.names[pool.members]]
        met = w[0] + w[0].T
        anchor = names.index(cfg.anchor) if cfg.anchor in names else None
        elo = _grouped_elo(theta, _components(met), anchor, cfg)
        rows += [(s.name, n, float(r)) for n, r in zip(names, elo)]
        rows += [(s.name, str(p.names[c]), sign * math.inf) for sign, side in ((1, pool.above), (-1, pool.below))
                 for c in side]
    out = pd.DataFrame(rows, columns=["scope", "contender", "rating_arena"])
    if len(p.datasets) == 1:
        out = pd.concat([out.assign(scope="overall"), out], ignore_index=True)
    return out


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
