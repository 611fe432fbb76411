"""Validation: freeze the winner before the held-out dataset is read, then measure its win rate there."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from tasks.config.base import MODEL_KINDS
from tasks.store.store import Store


def pooled_models(ratings: pd.DataFrame, scope: str = "overall") -> pd.DataFrame:
    """A scope's models (candidates and merges), best first; the pooled scope unless another is named."""
    pooled = ratings[(ratings["scope"] == scope) & ratings["kind"].isin(MODEL_KINDS)]
    return pooled.sort_values("rating", ascending=False)


def intervals_overlap(a: pd.Series, b: pd.Series) -> bool:
    """True when two ratings rows' intervals overlap (neither lies wholly above the other)."""
    return not (a["ci_low"] > b["ci_high"] or b["ci_low"] > a["ci_high"])


def pick_winner(ratings: pd.DataFrame) -> pd.Series:
    """The best-rated model (candidate or merge) in the pooled scope."""
    return pooled_models(ratings).iloc[0]


def runner_up(ratings: pd.DataFrame, winner: str) -> str:
    """The best-rated model other than the winner in the pooled scope."""
    models = pooled_models(ratings)
    return models[models["contender"] != winner].iloc[0]["contender"]


def freeze_winner(store: Store, run_rel: str, ratings: pd.DataFrame) -> dict[str, Any]:
    """Write the winner into the run (frozen_winner.json) and return it; call before reading the held-out set."""
    w = pick_winner(ratings)
    frozen = {
        "winner": w["contender"], "kind": w["kind"], "rating": float(w["rating"]),
        "ci_low": float(w["ci_low"]), "ci_high": float(w["ci_high"]),
        "frozen_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    store.write_json(f"{run_rel}/frozen_winner.json", frozen)
    return frozen


def per_example_score(judgments: pd.DataFrame, player: str, other: str) -> pd.Series:
    """`player`'s mean result against `other` on each example (1 win, 0.5 tie, 0 loss, both orders averaged)."""
    j = judgments[judgments["error"].isna() | (judgments["error"] == "")]
    ab = j[(j["contender_a"] == player) & (j["contender_b"] == other)]
    ba = j[(j["contender_a"] == other) & (j["contender_b"] == player)]
    points = {"a": 1.0, "tie": 0.5, "b": 0.0}
    # astype: on an empty frame, pandas hands back text from .map(), which cannot be subtracted.
    res = pd.concat([ab["winner"].map(points).astype(float), 1.0 - ba["winner"].map(points).astype(float)])
    keys = pd.concat([ab["example_id"], ba["example_id"]])
    return res.groupby(keys.values).mean()


def win_rate_ci(scores: pd.Series, confidence: float = 0.95, rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(win rate, low, high): the percentile bootstrap over examples of the mean per-example score."""
    x = scores.to_numpy(dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(rounds, len(x)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(x.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


NO_CLAIM = "no advantage to test"  # the winner rated below this opponent in the search: it claimed nothing over it


def verdict(rate: float, low: float, claimed: bool = True) -> str:
    """Words for a win rate: held (its interval clears 50%), held but within noise, or did not hold; an advantage the
    search never claimed (the winner rated below this opponent) has nothing to hold."""
    if not claimed:
        return NO_CLAIM
    if low > 0.5:
        return "held"
    return "held, but not significantly" if rate > 0.5 else "did not hold"


def summarize(judgments: pd.DataFrame, winner: str, opponents: list[str], confidence: float,
              behind: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The winner's win rate and interval against each opponent on the held-out dataset; `behind`: the opponents
    the winner rated below in the search, against which it claimed no advantage."""
    rows = []
    for other in opponents:
        scores = per_example_score(judgments, winner, other)
        rate, low, high = win_rate_ci(scores, confidence)
        rows.append({"opponent": other, "win_rate": rate, "ci_low": low, "ci_high": high, "n_examples": int(scores.size),
                     "verdict": verdict(rate, low, claimed=other not in behind)})
    return {"winner": winner, "confidence": confidence, "against": rows}
