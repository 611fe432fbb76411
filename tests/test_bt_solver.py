"""The count-matrix solver (tasks.rating.bt.fit) against reference solutions: choix on plain Bradley-Terry, scipy's
L-BFGS-B on the exact penalised log-likelihood with each tie model, and its own fast and general paths."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from tasks.rating.bt import Rows, _evaluate, _evaluate_bt, fit, fit_rows, tau_bounds
from tasks.rating.rate import ELO_PER_NAT


def counts(k: int, n: int, seed: int, tie_share: float = 0.0, complete: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Win counts W (i beat j) and symmetric tie counts T of n judgments among k contenders of spread-out strengths."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0.0, 1.0, k)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k if complete else 3, n)) % k  # incomplete: each meets only its 2 next neighbours
    u = rng.random(n)
    tie = u < tie_share
    a_wins = rng.random(n) < 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))
    win, lose = np.where(a_wins, a, b)[~tie], np.where(a_wins, b, a)[~tie]
    w = np.bincount(win * k + lose, minlength=k * k).reshape(k, k).astype(float)
    t = np.bincount(a[tie] * k + b[tie], minlength=k * k).reshape(k, k).astype(float)
    return w, t + t.T


def elo(theta: np.ndarray) -> np.ndarray:
    """Centred Elo ratings of log-strengths."""
    return ELO_PER_NAT * (theta - theta.mean())


def exact_loglik(theta: np.ndarray, tau: float, w: np.ndarray, t: np.ndarray, model: str, ridge: float) -> float:
    """The penalised log-likelihood written out from the models' definitions (no shared code with the solver)."""
    d = theta[:, None] - theta[None, :]
    if model == "bt":
        ll = (w * -np.logaddexp(0.0, -d)).sum()
        return ll - ridge / 2 * (theta**2).sum()
    if model == "davidson":  # P(i) = e^{d/2} / D, P(tie) = nu / D, D = e^{d/2} + e^{-d/2} + nu
        log_den = np.logaddexp(np.logaddexp(d / 2, -d / 2), tau)
        p_win, p_tie = d / 2 - log_den, tau - log_den
    else:  # Rao-Kupper: P(i) = sigma(d - tau), P(tie) = P(i) P(j) (e^{2 tau} - 1)
        p_win = -np.logaddexp(0.0, tau - d)
        p_tie = p_win - np.logaddexp(0.0, tau + d) + np.log(np.expm1(2 * tau))
    ll = (w * p_win).sum() + 0.5 * (t * p_tie).sum()
    return ll - ridge / 2 * ((theta**2).sum() + tau**2)


def reference(w: np.ndarray, t: np.ndarray, model: str, ridge: float) -> tuple[np.ndarray, float]:
    """scipy's L-BFGS-B on exact_loglik (the tie parameter within the solver's bounds), from zero strengths."""
    k = len(w)
    tied = model != "bt"
    x0 = np.r_[np.zeros(k), [1.0] if tied else []]
    bounds = [(None, None)] * k + ([tau_bounds(model)] if tied else [])
    res = minimize(lambda x: -exact_loglik(x[:k], x[k] if tied else 0.0, w, t, model, ridge), x0, method="L-BFGS-B",
                   bounds=bounds, options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 10_000, "maxfun": 100_000})
    return res.x[:k], float(res.x[k]) if tied else 0.0


def test_plain_bradley_terry_equals_choix_within_a_tenth_of_an_elo_point():
    choix = pytest.importorskip("choix")
    w, _ = counts(30, 60_000, seed=1)
    theta = fit(w[None], np.zeros((1, 30, 30)), "bt", 1e-4)[0][0]
    assert np.abs(elo(theta) - elo(choix.ilsr_pairwise_dense(w))).max() < 0.1


@pytest.mark.parametrize("model", ["bt", "davidson", "rao-kupper"])
@pytest.mark.parametrize("complete", [True, False])
def test_every_tie_model_equals_the_exact_likelihoods_optimum(model, complete):
    w, t = counts(12, 6_000, seed=2, tie_share=0.0 if model == "bt" else 0.25, complete=complete)
    theta, tau, _ = fit(w[None], t[None], model, 1e-4)
    ref_theta, ref_tau = reference(w, t, model, 1e-4)
    assert np.abs(elo(theta[0]) - elo(ref_theta)).max() < 0.1
    assert tau[0] == pytest.approx(ref_tau, abs=1e-3)
    assert exact_loglik(theta[0], tau[0], w, t, model, 1e-4) >= exact_loglik(ref_theta, ref_tau, w, t, model, 1e-4) - 1e-9


def test_a_tie_parameter_held_on_its_bound_still_reaches_the_optimum():
    # 7 wins, 46 ties, each contender meeting ~1 in 10: Rao-Kupper's log(eta) wants past its bound 20. Newton steps
    # clipped back onto the bound used to stall 0.18 short of the optimum's log-likelihood.
    rng = np.random.default_rng(34)
    w = rng.poisson(0.5, (15, 15)) * (rng.random((15, 15)) < 0.1)
    t = rng.poisson(2, (15, 15)) * (rng.random((15, 15)) < 0.1)
    w, t = w * (1 - np.eye(15)), (t + t.T) * (1 - np.eye(15))
    theta, tau, _ = fit(w[None], t[None], "rao-kupper", 1e-6)
    ref_theta, ref_tau = reference(w, t, "rao-kupper", 1e-6)
    assert tau[0] == ref_tau == tau_bounds("rao-kupper")[1]
    gap = exact_loglik(theta[0], tau[0], w, t, "rao-kupper", 1e-6) - exact_loglik(ref_theta, ref_tau, w, t, "rao-kupper", 1e-6)
    assert gap > -1e-6


def test_a_batch_fits_each_replicate_as_alone():
    rng = np.random.default_rng(4)
    w, t = counts(10, 4_000, seed=4, tie_share=0.2)
    ws = rng.poisson(np.broadcast_to(w, (5, 10, 10))).astype(float)
    ts = rng.poisson(np.broadcast_to(t, (5, 10, 10))).astype(float)
    ts = ts + ts.transpose(0, 2, 1)
    for model in ("bt", "davidson"):
        theta, tau, hess = fit(ws, ts, model, 1e-4, want_hess=True)
        for b in range(5):
            one, one_tau, one_hess = fit(ws[b : b + 1], ts[b : b + 1], model, 1e-4, want_hess=True)
            assert np.allclose(theta[b], one[0], atol=1e-8) and tau[b] == pytest.approx(one_tau[0], abs=1e-8)
            assert np.allclose(hess[b], one_hess[0], rtol=1e-6)


def test_the_plain_fast_path_equals_the_general_terms():
    w, _ = counts(15, 5_000, seed=5)
    theta = np.random.default_rng(5).normal(0.0, 2.0, (1, 15))
    fast = _evaluate_bt(theta, w[None], (w + w.T)[None], w.sum(axis=1)[None], 1e-3)
    general = _evaluate(theta, np.zeros(1), w[None], np.zeros((1, 15, 15)), "bt", 1e-3)
    for a, b in zip(fast, general):
        assert np.allclose(a, b, rtol=1e-12, atol=1e-9)


def test_strengths_60_nats_apart_take_the_clipped_path_and_stay_finite():
    w = np.zeros((1, 3, 3))
    w[0, 0, 1] = w[0, 1, 2] = 1e6  # 0 always beats 1, 1 always beats 2: only the ridge bounds them
    theta, _, hess = fit(w, np.zeros_like(w), "bt", 1e-12, want_hess=True)
    assert np.isfinite(theta).all() and np.isfinite(hess).all() and theta[0, 0] > theta[0, 1] > theta[0, 2]


@pytest.mark.parametrize("model", ["bt", "davidson", "rao-kupper"])
def test_the_per_judgment_fit_with_no_covariate_equals_the_count_fit(model):
    w, t = counts(8, 3_000, seed=6, tie_share=0.0 if model == "bt" else 0.2)
    i, j = np.nonzero(w)
    ti, tj = np.nonzero(np.triu(t))
    rows = Rows(np.r_[i, ti], np.r_[j, tj], np.r_[np.zeros(len(i)), np.full(len(ti), 2)].astype(int),
                np.zeros(len(i) + len(ti)), 8)
    z, _ = fit_rows(rows, np.r_[w[i, j], t[ti, tj]][None], model, 1e-4)
    theta, tau, _ = fit(w[None], t[None], model, 1e-4)
    assert np.abs(elo(z[0, :8]) - elo(theta[0])).max() < 1e-6 and abs(z[0, 8]) < 1e-9
    assert model == "bt" or z[0, 9] == pytest.approx(tau[0], abs=1e-8)
