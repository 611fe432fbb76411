"""Rating scopes (tasks/rating/rate.py): each dataset, and all datasets pooled with equal weight ('overall'); their
members (contenders with infinite strength peeled off: tasks.rating.bt.peel), their point fits, Fisher or sandwich
covariances and the example bootstrap, whose draws a length-controlled fit may share (fit_scopes' `also`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from tasks.config.schema import RatingConfig
from tasks.core import progress
from tasks.rating.bootstrap import per_example_counts, replicate_counts, resamples
from tasks.rating.bt import cluster_cov, fit, peel
from tasks.rating.judged import Judged

# Bootstrap replicates are materialised as dense (rounds, datasets, 3, K, K) counts in chunks of at most
# this many floats (2e7 floats = 160 MB), so 1,000 contenders bootstrap in small batches instead of 2.4 GB.
MAX_CHUNK_FLOATS = 20_000_000


@dataclass
class Scope:
    """One rating scope: a dataset, or all datasets pooled with equal weight."""

    name: str
    mix: np.ndarray  # weight of each dataset's counts in this scope
    members: np.ndarray  # contender codes fitted in this scope: those compared there, less the peeled ones
    model: str  # 'bt', 'davidson' or 'rao-kupper' (no ties in a scope -> plain Bradley-Terry)
    theta: np.ndarray | None = None
    tau: np.ndarray | None = None
    cov: np.ndarray | None = None
    boot: np.ndarray | None = None  # (B, members) bootstrap log-strengths
    everyone: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # all codes compared here
    above: list[int] = field(default_factory=list)  # codes peeled as unbeaten (rating +inf), in peel order
    below: list[int] = field(default_factory=list)  # codes peeled as never winning (rating -inf), in peel order


def scope_matrices(counts: np.ndarray, scope: Scope, cfg: RatingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Win matrix W[i,j] (i beat j) and symmetric tie matrix T of a scope, batched: counts is (B, D, 3, K, K)."""
    x = np.tensordot(counts, scope.mix, axes=([1], [0]))
    m = scope.members
    x = x[:, :, m][:, :, :, m]
    w = x[:, 0] + x[:, 1].transpose(0, 2, 1)
    t = x[:, 2] + x[:, 2].transpose(0, 2, 1)
    if cfg.ties == "half":
        w, t = w + 0.5 * t, np.zeros_like(t)
    return w, t


def make_scopes(p: Judged, raw: np.ndarray, weighted: np.ndarray, cfg: RatingConfig) -> list[Scope]:
    """The per-dataset scopes and the pooled 'overall' scope (datasets weighted equally)."""
    nd = len(p.datasets)
    totals = weighted.sum(axis=(1, 2, 3))
    scopes = []
    for d in range(nd):
        mix = np.zeros(nd)
        mix[d] = 1.0
        scopes.append(scope_for(str(p.datasets[d]), mix, raw, weighted, cfg))
    if nd > 1:
        # Equal weight per dataset: scale each so its total weight is the mean total (sum stays the same),
        # e.g. 10,000 and 1,000 judgments become 5,500 each, so neither dataset dominates the pooled fit.
        mix = np.where(totals > 0, totals.mean() / np.maximum(totals, 1e-12), 0.0)
        scopes.insert(0, scope_for("overall", mix, raw, weighted, cfg))
    return [s for s in scopes if len(s.everyone) > 1]  # a dataset of self-comparisons only has nobody to rate


def scope_for(name: str, mix: np.ndarray, raw: np.ndarray, weighted: np.ndarray, cfg: RatingConfig) -> Scope:
    """Build one scope: its members are the contenders with at least one judgment there."""
    n = np.tensordot(mix > 0, raw, axes=([0], [0])).sum(axis=0)
    per = n.sum(axis=1) + n.sum(axis=0)
    members = np.flatnonzero(per > 0)
    ties = np.tensordot(mix, weighted, axes=([0], [0]))[2].sum()
    model = "bt" if cfg.ties == "half" or ties <= 0 else cfg.ties
    scope = Scope(name, mix, members, model, everyone=members)
    w, t = scope_matrices(weighted[None], scope, cfg)
    core, above, below = peel(w[0], t[0])
    scope.members, scope.above, scope.below = members[core], [int(members[k]) for k in above], [
        int(members[k]) for k in below]
    return scope


def fit_scopes(p: Judged, scopes: list[Scope], weighted: np.ndarray, cfg: RatingConfig,
               also: Callable[[np.ndarray], None] | None = None, max_floats: int = MAX_CHUNK_FLOATS) -> None:
    """Point fits (and Fisher covariances) of every scope, then the bootstrap replicates if asked for; `also` is
    given each chunk of resampling weights too, as (examples, rounds), so a second fit bootstraps on the same draws.
    Replicates' counts are made max_floats at a time."""
    for s in scopes:
        w, t = scope_matrices(weighted[None], s, cfg)
        theta, tau, hess = fit(w, t, s.model, cfg.ridge, want_hess=cfg.ci != "bootstrap")
        s.theta, s.tau = theta[0], tau[0]
        k = len(s.members)
        if cfg.ci == "fisher":
            # Covariance of theta: the theta block of the inverse of the negative Hessian (tau profiled out).
            s.cov = scipy.linalg.cho_solve(scipy.linalg.cho_factor(-hess[0]), np.eye(len(hess[0])))[:k, :k]
        elif cfg.ci == "sandwich":
            # The same fit, its gradient summed per (dataset, example): see tasks.rating.bt.cluster_cov.
            local = np.full(len(p.names), -1)
            local[s.members] = np.arange(k)
            a, b = local[p.i], local[p.j]
            on = (a >= 0) & (b >= 0) & (s.mix[p.ds] > 0)
            s.cov = cluster_cov(a[on], b[on], p.out[on], (p.w * s.mix[p.ds])[on], p.ex[on], s.theta, float(s.tau),
                                s.model, -hess[0])[:k, :k]
    if cfg.ci != "bootstrap":
        return
    rng = np.random.default_rng(cfg.seed)
    per_round = len(p.datasets) * 3 * len(p.names) ** 2
    chunk = max(1, max_floats // per_round)
    per_example = per_example_counts(p)
    parts: dict[str, list[np.ndarray]] = {s.name: [] for s in scopes}
    # A bar only when it takes a while: the demo's 200 rounds of 7 contenders take ~0.2 s.
    with progress.bar("rate: bootstrap", cfg.bootstrap_rounds if per_round * cfg.bootstrap_rounds > 1e7 else 0,
                      "rounds") as bar:
        for resample_t in resamples(p, cfg.bootstrap_rounds, chunk, rng, max_floats, transposed=True):
            counts = replicate_counts(p, resample_t, per_example)
            for s in scopes:
                w, t = scope_matrices(counts, s, cfg)
                theta, _, _ = fit(w, t, s.model, cfg.ridge, theta0=s.theta, tau0=s.tau)
                parts[s.name].append(theta)
            if also is not None:
                also(resample_t)
            bar.advance(len(counts))
            del resample_t, counts  # before the next chunk is drawn: two at once were 320 MB at 5M examples
    for s in scopes:
        s.boot = np.concatenate(parts[s.name])
