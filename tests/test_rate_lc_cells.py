"""Length control on cells (tasks/rating/lc_cells.py, length_control.Controlled) against the fit it replaced: the
per-judgment Newton fit of every bootstrap replicate (kept below as it was, `old_fit_controlled`), on the same
judgments and draws. The point fit is the exact per-judgment optimum; bootstrap interval ends may move by the bins'
leftover and the chord's tolerance, bounded here at 0.5 Elo (measured: at most 0.07 Elo on a rating's interval end,
0.21 Elo on the length coefficient's, with BINS = 16)."""

from __future__ import annotations

import dataclasses
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.linalg

import tasks.rating.rate as rate_mod
from tasks.config.schema import RatingConfig
from tasks.rating.bootstrap import resamples
from tasks.rating.bt import fit_rows, rows_cluster_cov
from tasks.rating.judged import Judged, outcome_counts, prepare_judgments
from tasks.rating.lc_cells import BINS, aggregate, chord, fit_cells
from tasks.rating.length_control import Controlled, _point, _scope_rows
from tasks.rating.scopes import make_scopes
from tests.test_rate_lc import verbose_judge


def old_fit_controlled(p: Judged, scopes: list[Any], cfg: RatingConfig) -> tuple[list[Any], dict[str, tuple]]:
    """length_control.fit_controlled as it was before cells: every fit on the judgments one by one (bt.fit_rows)."""
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
        rng = np.random.default_rng(cfg.seed)
        chunk = max(1, 2_000_000 // max(len(d[1]) for d in data.values()))
        for resample in resamples(p, cfg.bootstrap_rounds, chunk, rng, 2_000_000):
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


class _Old:
    """The old fit in Controlled's shape, for rate_judged: it draws its own replicates (the same seed and draws)."""

    def __init__(self, p: Judged, scopes: list[Any], cfg: RatingConfig) -> None:
        self.args = (p, scopes, cfg)

    def replicates(self, resample_t: np.ndarray) -> None:
        """Ignored: the old fit redraws."""

    def result(self) -> tuple[list[Any], dict[str, tuple]]:
        return old_fit_controlled(*self.args)


def _two_datasets() -> pd.DataFrame:
    """Two datasets of the verbose judge, a quarter of the decisive verdicts strong."""
    two = pd.concat([verbose_judge(3000, seed=2).assign(dataset="x"), verbose_judge(3000, seed=3).assign(dataset="y")])
    return two.assign(strength=np.where((two.winner != "tie") & (np.arange(len(two)) % 4 == 0), 2, two.strength))


CASES = [
    ("davidson bootstrap", lambda: verbose_judge(8000), {"bootstrap_rounds": 100}),
    ("half ties bootstrap", lambda: verbose_judge(8000), {"ties": "half", "bootstrap_rounds": 100}),
    ("rao-kupper fisher", lambda: verbose_judge(8000), {"ties": "rao-kupper", "ci": "fisher"}),
    ("sandwich", lambda: verbose_judge(8000), {"ci": "sandwich"}),
    ("two datasets, strong verdicts", _two_datasets, {"bootstrap_rounds": 100, "strong_weight": 2.0}),
]


@pytest.mark.parametrize("name,make,kw", CASES, ids=[c[0] for c in CASES])
def test_cells_fit_equals_the_per_judgment_fit(monkeypatch, name, make, kw):
    df = make()
    cfg = RatingConfig(length_control=True, **kw)
    new = rate_mod.rate(df, {}, cfg)
    monkeypatch.setattr(rate_mod, "Controlled", _Old)
    old = rate_mod.rate(df, {}, cfg)
    pd.testing.assert_frame_equal(new[["scope", "contender", "rank"]], old[["scope", "contender", "rank"]])
    gap = {c: float(np.abs(new[c] - old[c]).max()) for c in
           ("rating", "ci_low", "ci_high", "length_coef", "length_coef_low", "length_coef_high", "rating_raw")}
    assert gap["rating"] < 1e-4 and gap["length_coef"] < 1e-4 and gap["rating_raw"] == 0, gap  # the exact optimum
    assert max(gap.values()) < 0.5, gap  # Elo
    if kw.get("ci") in ("fisher", "sandwich"):  # the exact Hessian at the exact optimum: the same intervals
        assert max(gap["ci_low"], gap["ci_high"], gap["length_coef_low"]) < 0.01, gap


def _prepared(df: pd.DataFrame, cfg: RatingConfig) -> tuple[Judged, list[Any]]:
    """Judged judgments and their scopes, as rate() makes them."""
    p = prepare_judgments(df, cfg)
    return p, make_scopes(p, outcome_counts(p, None), outcome_counts(p, p.w), cfg)


def test_cells_keep_the_weights_and_the_mean_length_difference():
    cfg = RatingConfig(length_control=True)
    p, scopes = _prepared(verbose_judge(4000, seed=9), cfg)
    rows, w, ex = _scope_rows(p, scopes[0], half=False)
    cells = aggregate(rows.i, rows.j, rows.out, rows.x, w, ex, rows.k, len(p.ex_ds))
    k = rows.k
    assert len(cells.w) <= k * (k - 1) // 2 * 3 * BINS and len(cells.w) < len(w)
    assert cells.w.sum() == pytest.approx(w.sum()) and (cells.w * cells.x).sum() == pytest.approx((w * rows.x).sum())
    assert (cells.spread >= 0).all() and cells.spread.sum() < (w * (rows.x - (w * rows.x).sum() / w.sum()) ** 2).sum()
    assert (cells.sign[: cells.n_win] != 0).all() and (cells.sign[cells.n_win :] == 1).all() and (cells.i < cells.j).all()
    # a replicate's weights and mean x are the per-judgment sums of its resampled examples
    resample = np.random.default_rng(0).integers(0, 3, size=(3, len(p.ex_ds))).astype(float)
    cw, cx, _ = cells.replicate(np.ascontiguousarray(resample.T), np.zeros(len(cells.w)), np.zeros(len(p.ex_ds)))
    assert cw.sum(axis=0) == pytest.approx((resample[:, ex] * w).sum(axis=1))
    assert (cw * cx).sum(axis=0) == pytest.approx((resample[:, ex] * w * rows.x).sum(axis=1))


def test_chord_replicates_are_the_newton_optima_of_their_cells():
    """The chord (the point's Hessian, one or two passes) stops near each replicate's own damped Newton optimum on
    the same tilted cells: within 3e-4 nats (0.05 Elo) here, where its estimate of the leftover is 1e-4 (the first,
    linear step makes the estimated contraction a little optimistic); a replicate twice as far still gets there."""
    cfg = RatingConfig(length_control=True)
    p, scopes = _prepared(verbose_judge(6000, seed=10), cfg)
    s = scopes[0]
    pt, _ = _point(p, s, cfg)
    m = len(pt.z)
    resample = np.random.default_rng(1).multinomial(len(p.ex_ds), np.full(len(p.ex_ds), 1 / len(p.ex_ds)), size=6)
    resample = resample.astype(float)
    resample[5] = resample[5] ** 2  # a replicate far from the point
    w, x, spread = pt.cells.replicate(np.ascontiguousarray(resample.T), pt.first[2], pt.xx)
    z = chord(pt.cells, w, x, spread, pt.z, scipy.linalg.cho_factor(-pt.hess), s.model, cfg.ridge, pt.tilt, pt.first)
    zn, _ = fit_cells(pt.cells, np.ascontiguousarray(w.T), np.ascontiguousarray(x.T), s.model, cfg.ridge,
                      z0=np.r_[pt.z, np.zeros(pt.cells.k + 2 - m)], tilt=pt.tilt, spread=spread)
    assert np.abs(z - zn[:, :m]).max() < 5e-4  # nats: 0.09 Elo
    assert np.abs(z[5] - pt.z).max() > 1.5 * np.abs(z[:5] - pt.z).max(axis=1).mean()  # the far one was far


def test_controlled_shares_the_plain_bootstrap_draws():
    """rate() hands the plain bootstrap's chunks to Controlled: the same replicates as Controlled drawing alone."""
    df = verbose_judge(3000, seed=11)
    cfg = RatingConfig(length_control=True, bootstrap_rounds=40)
    p, scopes = _prepared(df, cfg)
    alone = Controlled(p, scopes, cfg)
    for resample_t in resamples(p, 40, 40, np.random.default_rng(cfg.seed), 20_000_000, transposed=True):
        alone.replicates(resample_t)
    boot_alone = alone.result()[0][0].boot
    r = rate_mod.rate(df, {}, cfg)
    lc = r[r.scope == "overall"].set_index("contender").sort_index()
    names = [str(v) for v in p.names[scopes[0].members]]
    elo = rate_mod._grouped_elo(boot_alone, np.zeros(len(names), dtype=np.int64), None, cfg)
    lo = pd.Series(np.minimum(np.quantile(elo, 0.025, axis=0), lc.loc[names, "rating"].to_numpy()), index=names)
    assert np.abs(lo.sort_index() - lc.loc[sorted(names), "ci_low"]).max() < 1e-9


def test_drawn_weights_are_the_draw_of_before():
    """bootstrap.drawn_weights counts a round at a time in place (less memory, 1.5x faster at 5M examples), in either
    layout: the same counts from the same seed as when it drew every round's indices at once and bincounted them."""
    from tasks.rating.bootstrap import drawn_weights

    p = prepare_judgments(pd.concat([verbose_judge(900, seed=12), verbose_judge(700, seed=13).assign(dataset="d1")]),
                          RatingConfig())
    rng = np.random.default_rng(4)
    before = np.zeros((5, len(p.ex_ds)))
    for d in np.unique(p.ex_ds):
        cols = np.flatnonzero(p.ex_ds == d)
        idx = rng.integers(0, len(cols), size=(5, len(cols)), dtype=np.uint32)
        for b in range(5):
            before[b, cols[0] : cols[0] + len(cols)] = np.bincount(idx[b], minlength=len(cols))
    assert np.array_equal(drawn_weights(p, 5, np.random.default_rng(4)), before)
    assert np.array_equal(drawn_weights(p, 5, np.random.default_rng(4), transposed=True), before.T)
