"""Length-controlled Bradley-Terry fits (rating.length_control): the scopes of tasks/rating/rate.py fitted again with a
per-judgment length term, P(i beats j) at d = theta_i - theta_j + beta * (len_i - len_j) / (len_i + len_j), as
Arena-Hard's style control adds its style features to the logistic model (there with half-win ties; here with the
configured tie model). The point fit, the Fisher covariance and the example bootstrap (same seed and draw as the plain
fit's) come out in the shape rate() turns into tables.

Fits run on cells (tasks/rating/lc_cells.py): judgments summed per (pair, outcome, bin of the length difference), so a
pass costs what the cells cost, not the judgments. The point fit is Newton on the cells, finished by Newton on the
judgments one by one (two passes from that start), so it is the exact per-judgment fit; its Hessian there gives the
Fisher and sandwich covariances and the bootstrap's steps. Bootstrap replicates are weights on the same cells, each
fitted from the point by steps with the point's Hessian (lc_cells.chord: two passes each at 1M judgments), tilted by
the point's exact-minus-cells gradient so that the bins' leftover cancels to second order.
"""

from __future__ import annotations

import dataclasses
from statistics import NormalDist
from typing import Any

import numpy as np
import scipy.linalg

from tasks.config.schema import RatingConfig
from tasks.rating.bootstrap import resamples
from tasks.rating.bt import Rows, rows_cluster_cov
from tasks.rating.judged import Judged
from tasks.rating.lc_cells import Cells, aggregate, chord, fit_cells, gradient, linear_step
from tasks.rating.scopes import MAX_CHUNK_FLOATS


def _scope_rows(p: Judged, scope: Any, half: bool) -> tuple[Rows, np.ndarray, np.ndarray]:
    """The scope's judgments between its fitted members as Rows, their weights (verdict weight x the dataset's mix)
    and their example codes; with half-win ties a tie is two rows, half a win each way."""
    assert p.x is not None
    local = np.full(len(p.names), -1, dtype=np.int64)
    local[scope.members] = np.arange(len(scope.members))  # members ascend, so i < j stays i < j
    sel = (scope.mix[p.ds] > 0) & (local[p.i] >= 0) & (local[p.j] >= 0)
    if sel.all() and len(scope.members) == len(p.names):  # every judgment, codes as they are: no 5 copies of 40 MB
        i, j, out, x, w, ex = p.i, p.j, p.out, p.x, p.w * scope.mix[p.ds], p.ex
        return (_half(i, j, out, x, w, ex, len(scope.members)) if half
                else (Rows(i, j, out, x, len(scope.members)), w, ex))
    i, j, out, x = local[p.i[sel]], local[p.j[sel]], p.out[sel], p.x[sel]
    w, ex = p.w[sel] * scope.mix[p.ds[sel]], p.ex[sel]
    return _half(i, j, out, x, w, ex, len(scope.members)) if half else (Rows(i, j, out, x, len(scope.members)), w, ex)


def _half(i: np.ndarray, j: np.ndarray, out: np.ndarray, x: np.ndarray, w: np.ndarray, ex: np.ndarray, k: int
          ) -> tuple[Rows, np.ndarray, np.ndarray]:
    """Rows with half-win ties: a tie is two rows, half a win each way."""
    tie = out == 2
    i, j, x, ex = np.r_[i, i[tie]], np.r_[j, j[tie]], np.r_[x, x[tie]], np.r_[ex, ex[tie]]
    out = np.r_[np.where(tie, 0, out), np.ones(int(tie.sum()), dtype=np.int64)]
    w = np.r_[np.where(tie, 0.5, 1.0) * w, 0.5 * w[tie]]
    return Rows(i, j, out, x, k), w, ex


@dataclasses.dataclass
class _Point:
    """One scope's length-controlled point fit: its cells, the exact optimum and what the bootstrap steps with."""

    cells: Cells
    z: np.ndarray  # (m,): theta, beta[, tau] at the exact optimum
    hess: np.ndarray  # (m, m): the exact Hessian there
    tilt: np.ndarray  # (m,): exact minus cells gradient at z, added to every replicate's cells gradient
    first: tuple  # lc_cells.linear_step at z: the replicates' first step from products
    xx: np.ndarray  # (examples,): xx_by_example' l'' for the replicates' spread term (Cells.replicate)


def _point(p: Judged, scope: Any, cfg: RatingConfig) -> tuple[_Point, tuple[Rows, np.ndarray, np.ndarray] | None]:
    """The scope's point fit: Newton on its cells, then on its judgments one by one from there; and those judgments
    where the sandwich covariance needs them."""
    rows, w, ex = _scope_rows(p, scope, cfg.ties == "half")
    cells = aggregate(rows.i, rows.j, rows.out, rows.x, w, ex, rows.k, len(p.ex_ds))
    z0, _ = fit_cells(cells, cells.w[None], cells.x, scope.model, cfg.ridge)
    exact = aggregate(rows.i, rows.j, rows.out, rows.x, w, None, rows.k, bins=None)
    kept = (rows, w, ex) if cfg.ci == "sandwich" else None
    del rows, w, ex
    z, hess = fit_cells(exact, exact.w[None], exact.x, scope.model, cfg.ridge, z0=z0)
    m = hess.shape[1]
    del exact
    first = linear_step(cells, z[0, :m], scope.model)
    g_cells = gradient(z[:, :m], cells, cells.w, cells.x, scope.model, cfg.ridge,
                       spread=np.array([cells.spread @ first[2]]))
    xx = np.asarray(cells.xx_by_example.T @ first[2]).ravel()
    cells = dataclasses.replace(cells, xx_by_example=None)  # used once: 40 MB at 5M judgments
    # the tilt: exact minus cells gradient at z, where the exact one is 0 (its optimum, to ~1e-9 nats)
    return _Point(cells, z[0, :m], hess[0], -g_cells[0], first, xx), kept


class Controlled:
    """The length-controlled fits of the scopes: point fits when made, bootstrap replicates chunk by chunk of
    resampling weights (the plain bootstrap's own draws, tasks.rating.scopes.fit_scopes' `also`), then result()."""

    def __init__(self, p: Judged, scopes: list[Any], cfg: RatingConfig) -> None:
        """Fit every scope's point, and its Fisher or sandwich covariance."""
        self.cfg, self.scopes, self.coef = cfg, [], {}
        self.points: dict[str, _Point] = {}
        self.parts: dict[str, list[np.ndarray]] = {}
        alpha = 1.0 - cfg.confidence
        for s in scopes:
            pt, kept = _point(p, s, cfg)
            self.points[s.name], self.parts[s.name] = pt, []
            k, z = pt.cells.k, pt.z
            new = dataclasses.replace(s, theta=z[:k], tau=z[k + 1] if len(z) > k + 1 else 0.0, cov=None, boot=None)
            if cfg.ci != "bootstrap":
                # Fisher: the inverse information; sandwich: clustered by example, as the plain fit's (tasks.rating.bt)
                inv = (scipy.linalg.cho_solve(scipy.linalg.cho_factor(-pt.hess), np.eye(len(pt.hess)))
                       if kept is None else rows_cluster_cov(kept[0], kept[1], np.r_[z, 0.0][: k + 2], s.model, -pt.hess,
                                                             kept[2]))
                new.cov = inv[:k, :k]
                half_width = NormalDist().inv_cdf(1 - alpha / 2) * float(np.sqrt(max(inv[k, k], 0.0)))
                self.coef[s.name] = (float(z[k]), float(z[k]) - half_width, float(z[k]) + half_width)
            else:
                self.coef[s.name] = (float(z[k]),)
            self.scopes.append(new)
        self.factors = {name: scipy.linalg.cho_factor(-pt.hess) for name, pt in self.points.items()}

    def replicates(self, resample_t: np.ndarray) -> None:
        """Fit the bootstrap replicates of a chunk of (examples, rounds) resampling weights (the chord's passes then
        go lc_cells.EVAL_FLOATS at a time)."""
        for s in self.scopes:
            pt = self.points[s.name]
            w, x, spread = pt.cells.replicate(resample_t, pt.first[2], pt.xx)
            self.parts[s.name].append(chord(pt.cells, w, x, spread, pt.z, self.factors[s.name], s.model,
                                            self.cfg.ridge, pt.tilt, pt.first))

    def result(self) -> tuple[list[Any], dict[str, tuple]]:
        """Copies of the scopes with the length-controlled theta, tau, covariance or bootstrap, and per scope the
        length coefficient (nats per unit of normalised length difference) with its interval."""
        alpha = 1.0 - self.cfg.confidence
        if self.cfg.ci == "bootstrap":
            for s in self.scopes:
                z = np.concatenate(self.parts[s.name])
                k = len(s.members)
                s.boot = z[:, :k]
                lo, hi = np.quantile(z[:, k], [alpha / 2, 1 - alpha / 2])
                b = self.coef[s.name][0]
                self.coef[s.name] = (b, min(float(lo), b), max(float(hi), b))
        return self.scopes, self.coef


def fit_controlled(p: Judged, scopes: list[Any], cfg: RatingConfig) -> tuple[list[Any], dict[str, tuple]]:
    """Controlled's result on its own draws (the plain bootstrap's seed: the same draws as rate() shares)."""
    fits = Controlled(p, scopes, cfg)
    if cfg.ci == "bootstrap":
        per_round = len(p.datasets) * 3 * len(p.names) ** 2
        rng = np.random.default_rng(cfg.seed)
        for resample_t in resamples(p, cfg.bootstrap_rounds, max(1, MAX_CHUNK_FLOATS // per_round), rng,
                                    MAX_CHUNK_FLOATS, transposed=True):
            fits.replicates(resample_t)
            del resample_t  # before the next chunk is drawn
    return fits.result()
