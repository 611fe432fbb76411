"""Length-controlled Bradley-Terry fits (rating.length_control): the scopes of tasks/rating/rate.py fitted again with a
per-judgment length term, P(i beats j) at d = theta_i - theta_j + beta * (len_i - len_j) / (len_i + len_j), as
Arena-Hard's style control adds its style features to the logistic model (there with half-win ties; here with the
configured tie model). The point fit, the Fisher covariance and the example bootstrap (same seed and draw as the plain
fit's) come out in the shape rate() turns into tables.
"""

from __future__ import annotations

import dataclasses
from statistics import NormalDist
from typing import Any

import numpy as np
import scipy.linalg

from tasks.config.schema import RatingConfig
from tasks.rating.bootstrap import resamples
from tasks.rating.bt import Rows, fit_rows, rows_cluster_cov
from tasks.rating.judged import Judged

# Bootstrap replicates are fitted (rounds x judgments) weights at a time, at most this many floats: each Newton step
# holds ~15 arrays of that size, so 2e6 floats keep it near 240 MB.
_MAX_ROW_FLOATS = 2_000_000


def _scope_rows(p: Judged, scope: Any, half: bool) -> tuple[Rows, np.ndarray, np.ndarray]:
    """The scope's judgments between its fitted members as Rows, their weights (verdict weight x the dataset's mix)
    and their example codes; with half-win ties a tie is two rows, half a win each way."""
    assert p.x is not None
    local = np.full(len(p.names), -1, dtype=np.int64)
    local[scope.members] = np.arange(len(scope.members))  # members ascend, so i < j stays i < j
    sel = (scope.mix[p.ds] > 0) & (local[p.i] >= 0) & (local[p.j] >= 0)
    i, j, out, x = local[p.i[sel]], local[p.j[sel]], p.out[sel], p.x[sel]
    w, ex = p.w[sel] * scope.mix[p.ds[sel]], p.ex[sel]
    if half:
        tie = out == 2
        i, j, x, ex = np.r_[i, i[tie]], np.r_[j, j[tie]], np.r_[x, x[tie]], np.r_[ex, ex[tie]]
        out = np.r_[np.where(tie, 0, out), np.ones(int(tie.sum()), dtype=np.int64)]
        w = np.r_[np.where(tie, 0.5, 1.0) * w, 0.5 * w[tie]]
    return Rows(i, j, out, x, len(scope.members)), w, ex


def fit_controlled(p: Judged, scopes: list[Any], cfg: RatingConfig) -> tuple[list[Any], dict[str, tuple]]:
    """Copies of the fitted scopes with the length-controlled theta, tau, covariance or bootstrap, and per scope the
    length coefficient (nats per unit of normalised length difference) with its interval."""
    alpha = 1.0 - cfg.confidence
    out, coef = [], {}
    parts: dict[str, list[np.ndarray]] = {}
    data = {s.name: _scope_rows(p, s, cfg.ties == "half") for s in scopes}
    for s in scopes:
        rows, w, ex = data[s.name]
        k = rows.k
        z, hess = fit_rows(rows, w[None], s.model, cfg.ridge, want_hess=cfg.ci != "bootstrap")
        new = dataclasses.replace(s, theta=z[0, :k], tau=z[0, k + 1], cov=None, boot=None)
        if cfg.ci != "bootstrap":
            # Fisher: the inverse information; sandwich: clustered by example, as the plain fit's (tasks.rating.bt)
            inv = (scipy.linalg.cho_solve(scipy.linalg.cho_factor(-hess[0]), np.eye(len(hess[0]))) if cfg.ci == "fisher"
                   else rows_cluster_cov(rows, w, z[0], s.model, -hess[0], ex))
            new.cov = inv[:k, :k]
            half_width = NormalDist().inv_cdf(1 - alpha / 2) * float(np.sqrt(max(inv[k, k], 0.0)))
            coef[s.name] = (float(z[0, k]), float(z[0, k]) - half_width, float(z[0, k]) + half_width)
        else:
            coef[s.name] = (float(z[0, k]),)
        parts[s.name] = []
        out.append(new)
    if cfg.ci == "bootstrap":
        rng = np.random.default_rng(cfg.seed)  # the plain fit's seed: the same redrawn examples where the draw is exact
        longest = max(len(d[1]) for d in data.values())
        chunk = max(1, _MAX_ROW_FLOATS // max(longest, 1))
        for resample in resamples(p, cfg.bootstrap_rounds, chunk, rng, _MAX_ROW_FLOATS):
            for s in out:
                rows, w, ex = data[s.name]
                z0 = np.r_[s.theta, coef[s.name][0], s.tau if s.model != "bt" else 0.0]
                z, _ = fit_rows(rows, resample[:, ex] * w, s.model, cfg.ridge, z0=z0)
                parts[s.name].append(z)
        for s in out:
            z = np.concatenate(parts[s.name])
            k = len(s.members)
            s.boot = z[:, :k]
            lo, hi = np.quantile(z[:, k], [alpha / 2, 1 - alpha / 2])
            b = coef[s.name][0]
            coef[s.name] = (b, min(float(lo), b), max(float(hi), b))
    return out, coef
