"""FastChat's Bradley-Terry fits, re-implemented for the benchmarks (fschat on PyPI, 0.2.36, predates them).

The algorithm of lm-sys/FastChat fastchat/serve/monitor/rating_systems.py (compute_bt, compute_bootstrap_bt), step
for step: battles reduced to their distinct (model_a, model_b, outcome) rows with counts (np.unique), outcome 1 / 0.5 /
0 for a win / tie / loss of model_a (a tie is half a win), the negative log-likelihood and its gradient (np.add.at)
minimised by scipy's L-BFGS-B from zero (maxiter 100, gtol 1e-6), natural-log strengths times log(10) logits,
scale 400 and 1000 offset. The bootstrap redraws the distinct rows' counts from one multinomial per round (seed 0)
and fits the rounds in a multiprocessing pool of os.cpu_count() workers. Used by bench/rating_speed.py and
bench/rank_speed.py.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from functools import partial

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit

_SIGNS = np.array([1.0, -1.0])


def battles_from_judgments(df: pd.DataFrame) -> pd.DataFrame:
    """Our judgments as FastChat battles: model_a, model_b, winner in {model_a, model_b, tie}."""
    winner = df["winner"].map({"a": "model_a", "b": "model_b", "tie": "tie"})
    return pd.DataFrame({"model_a": df["contender_a"], "model_b": df["contender_b"], "winner": winner})


def schedule(battles: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Distinct (a, b, outcome) rows, their outcome for a (1, 0.5, 0), the model names, and how often each occurred."""
    n = len(battles)
    codes, models = pd.factorize(pd.concat([battles["model_a"], battles["model_b"]]))
    rows = np.ones((n, 3), dtype=np.int32)  # outcome code 1: tie
    rows[:, 0], rows[:, 1] = codes[:n], codes[n:]
    rows[(battles["winner"] == "model_a").to_numpy(), 2] = 2
    rows[(battles["winner"] == "model_b").to_numpy(), 2] = 0
    distinct, counts = np.unique(rows, return_counts=True, axis=0)
    return distinct[:, :2], distinct[:, 2].astype(np.float64) / 2.0, list(models), counts.astype(np.float64)


def loss_and_grad(ratings: np.ndarray, matchups: np.ndarray, outcomes: np.ndarray, weights: np.ndarray,
                  alpha: float) -> tuple[float, np.ndarray]:
    """Weighted negative log-likelihood (a tie counts half a win) and its gradient in the ratings."""
    pair = ratings[matchups]
    probs = expit(alpha * (pair[:, 0] - pair[:, 1]))
    loss = -((np.log(probs) * outcomes + np.log(1.0 - probs) * (1.0 - outcomes)) * weights).sum()
    per_row = -alpha * (outcomes - probs) * weights
    grad = np.zeros_like(ratings)
    np.add.at(grad, matchups, per_row[:, None] * _SIGNS)
    return loss, grad


def fit(matchups: np.ndarray, outcomes: np.ndarray, weights: np.ndarray, n_models: int, alpha: float,
        tol: float = 1e-6) -> np.ndarray:
    """L-BFGS-B from zero ratings, as FastChat's fit_bt."""
    res = minimize(loss_and_grad, np.zeros(n_models), args=(matchups, outcomes, weights, alpha), jac=True,
                   method="L-BFGS-B", options={"disp": False, "maxiter": 100, "gtol": tol})
    return res["x"]


def to_elo(ratings: np.ndarray, scale: float = 400.0, init: float = 1000.0) -> np.ndarray:
    """Natural strengths (base-10 logits / log 10) to the Elo scale, no anchor (none of FastChat's is present)."""
    return ratings * scale + init


def compute_bt(battles: pd.DataFrame, base: float = 10.0) -> pd.Series:
    """One fit of all battles: Elo ratings by model, best first."""
    matchups, outcomes, models, weights = schedule(battles)
    r = to_elo(fit(matchups, outcomes, weights, len(models), math.log(base)))
    return pd.Series(r, index=models).sort_values(ascending=False)


def compute_bootstrap_bt(battles: pd.DataFrame, num_round: int, base: float = 10.0,
                         num_cpu: int | None = None) -> pd.DataFrame:
    """num_round bootstrap fits (battles redrawn with replacement), in a process pool: (rounds x models) Elo."""
    matchups, outcomes, models, weights = schedule(battles)
    rng = np.random.default_rng(seed=0)
    draws = rng.multinomial(n=len(battles), pvals=weights / weights.sum(), size=num_round)
    boot_weights = draws.astype(np.float64) / len(battles)
    one = partial(fit, matchups, outcomes, n_models=len(models), alpha=math.log(base))
    with mp.Pool(num_cpu or os.cpu_count()) as pool:
        results = list(pool.imap_unordered(one, boot_weights))
    df = pd.DataFrame(to_elo(np.array(results)), columns=models)
    return df[df.median().sort_values(ascending=False).index]
