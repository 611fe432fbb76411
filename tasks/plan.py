"""Comparison planning: which (dataset, example, pair) to judge next, in rounds, and when to stop.

Adaptive planning (the default) judges a small uniform warm-up of every pair, then spends each round on the
leader against every challenger whose confidence interval still overlaps the leader's (references included),
and stops when the leader is separated, the budget is spent, or nothing left could change the answer.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from tasks.config import BudgetConfig  # defined with the rest of the config; importable from here too
from tasks.errors import UserError
from tasks.rate import RatingConfig, rate

PLAN_COLUMNS = ["dataset", "example_id", "contender_a", "contender_b"]


class _Universe:
    """Every (pair, example) slot as integers: slot = pair * n_examples + example."""

    def __init__(self, contenders: Sequence[str], examples: Mapping[str, Sequence[str]]):
        names = sorted({str(c) for c in contenders})
        if len(names) < 2:
            raise UserError(f"planning needs at least two contenders, got {len(names)}: {', '.join(names) or 'none'}")
        self.names = np.array(names, dtype=object)
        self.pos = {n: k for k, n in enumerate(names)}
        iu, ju = np.triu_indices(len(names), k=1)
        self.pair_i, self.pair_j = iu.astype(np.int64), ju.astype(np.int64)
        ds, ex = [], []
        for name, ids in examples.items():
            ds.extend([str(name)] * len(ids))
            ex.extend(list(ids))
        if not ex:
            raise UserError("planning needs at least one test example")
        self.ex_dataset = np.array(ds, dtype=object)
        self.ex_id = np.array(ex, dtype=object)
        self.index = pd.MultiIndex.from_arrays([self.ex_dataset, np.array([str(e) for e in ex], dtype=object)])
        sizes = pd.Series(self.ex_dataset).map(pd.Series(self.ex_dataset).value_counts()).to_numpy()
        self.ex_size = sizes.astype(float)  # examples in each example's dataset

    @property
    def n_examples(self) -> int:
        """Number of (dataset, example) cells."""
        return len(self.ex_id)

    def pair_of(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Pair index of contender codes (either order); -1 where a == b or a code is -1."""
        k = len(self.names)
        i, j = np.minimum(a, b), np.maximum(a, b)
        # Row-major index of (i, j), i < j, in the upper triangle: i*k - i(i+1)/2 + (j - i - 1).
        idx = i * k - i * (i + 1) // 2 + (j - i - 1)
        return np.where((i >= 0) & (i != j), idx, -1)

    def done_slots(self, done: pd.DataFrame) -> np.ndarray:
        """Sorted unique slots of the judgments already made (errors included: they are never re-planned)."""
        if done is None or len(done) == 0:
            return np.empty(0, dtype=np.int64)
        a = done["contender_a"].astype(str).map(self.pos).fillna(-1).to_numpy(dtype=np.int64)
        b = done["contender_b"].astype(str).map(self.pos).fillna(-1).to_numpy(dtype=np.int64)
        keys = pd.MultiIndex.from_arrays([done["dataset"].astype(str), done["example_id"].astype(str)])
        e = self.index.get_indexer(keys)
        p = self.pair_of(a, b)
        ok = (p >= 0) & (e >= 0)
        return np.unique(p[ok] * self.n_examples + e[ok])

    def frame(self, slots: np.ndarray) -> pd.DataFrame:
        """The planned comparisons as a DataFrame with PLAN_COLUMNS."""
        p, e = np.divmod(slots, self.n_examples)
        return pd.DataFrame(
            {
                "dataset": self.ex_dataset[e],
                "example_id": self.ex_id[e],
                "contender_a": self.names[self.pair_i[p]],
                "contender_b": self.names[self.pair_j[p]],
            },
            columns=PLAN_COLUMNS,
        )

    def open_slots(self, pairs: np.ndarray, done: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Unjudged slots of the given pairs with each slot's rank within its pair (0 = to judge first).

        The order within a pair is random but balanced across datasets: key = U(0,1) * dataset size, so
        about as many examples of each dataset come first whatever the dataset sizes.
        """
        ne = self.n_examples
        slots = (pairs[:, None] * ne + np.arange(ne)[None, :]).ravel()
        keys = (rng.random((len(pairs), ne)) * self.ex_size[None, :]).ravel()
        keys[np.isin(slots, done)] = np.inf
        order = np.argsort(keys.reshape(len(pairs), ne), axis=1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(ne)[None, :].repeat(len(pairs), 0), axis=1)
        rank = rank.ravel()
        open_ = np.isfinite(keys)
        return slots[open_], rank[open_]


def _budget_left(
    done: pd.DataFrame, cfg: BudgetConfig, spent_usd: float, orders: int = 1
) -> tuple[int | None, str | None]:
    """Comparisons still affordable (None: unlimited) and the stop reason when none are.

    Both caps count judgments (rows); each comparison planned makes `orders` of them (2 with both orders), so
    planning never exceeds max_comparisons. `spent_usd` is this run's new spending only.
    """
    n_done = 0 if done is None else len(done)
    left: int | None = None  # judgments (rows)
    if cfg.max_comparisons is not None:
        left = cfg.max_comparisons - n_done
        if left < orders:
            return 0, f"comparison budget spent ({n_done} of {cfg.max_comparisons} judgments)"
    if cfg.max_usd is not None:
        if spent_usd >= cfg.max_usd:
            return 0, f"dollar budget spent (${spent_usd:.2f} of ${cfg.max_usd:.2f})"
        if done is not None and "cost_usd" in done.columns and n_done:
            per = float(pd.to_numeric(done["cost_usd"], errors="coerce").fillna(0).mean())
            if per > 0:
                # Dollars left / mean dollars per judgment so far, e.g. ($10 - $4) / $0.003 = 2,000 judgments.
                afford = int((cfg.max_usd - spent_usd) / per)
                if afford < orders:
                    return 0, f"dollar budget spent (${spent_usd:.2f} of ${cfg.max_usd:.2f})"
                left = afford if left is None else min(left, afford)
    return (None if left is None else left // orders), None


def _take(slots: np.ndarray, rank: np.ndarray, size: int | None, rng: np.random.Generator) -> np.ndarray:
    """The `size` slots of lowest rank, round-robin across pairs (random among equal ranks)."""
    order = np.lexsort((rng.random(len(slots)), rank))
    return slots[order[:size]] if size is not None else slots[order]


def _pair_counts(uni: _Universe, done: np.ndarray) -> np.ndarray:
    """Distinct examples judged so far for every pair."""
    return np.bincount(done // uni.n_examples, minlength=len(uni.pair_i))


def _standings(uni: _Universe, done: pd.DataFrame, cfg: BudgetConfig) -> pd.DataFrame | None:
    """Pooled ratings of the planned contenders so far (fast Fisher intervals), or None before any data."""
    if done is None or len(done) == 0:
        return None
    mine = done[done["contender_a"].astype(str).isin(uni.pos) & done["contender_b"].astype(str).isin(uni.pos)]
    try:
        r = rate(mine, {}, RatingConfig(ci="fisher", confidence=cfg.confidence))
    except UserError:
        return None  # e.g. only failed judgments so far, or a single contender judged
    # Contenders whose judgments all failed have no rating: they count as unrated (challengers), as before.
    return r[(r["scope"] == "overall") & r["rating"].notna()]


def plan_round(
    contenders: Sequence[str],
    examples: Mapping[str, Sequence[str]],
    done: pd.DataFrame,
    cfg: BudgetConfig,
    rng: np.random.Generator,
    spent_usd: float = 0.0,
    orders: int = 1,
    pairs_with: str | None = None,
) -> tuple[pd.DataFrame, str | None]:
    """The next comparisons to judge and why to stop (None: go on); never repeats a judged (dataset, example, pair).

    `orders`: judgments each comparison makes (2 when both orders are shown), for the caps on judgments.
    `pairs_with`: with the all-pairs strategy, only the pairs of this contender (validation reports only those).
    """
    uni = _Universe(contenders, examples)
    judged = uni.done_slots(done)
    empty = uni.frame(np.empty(0, dtype=np.int64))
    left, reason = _budget_left(done, cfg, spent_usd, orders)
    if reason:
        return empty, reason
    all_pairs = np.arange(len(uni.pair_i))
    if pairs_with is not None and cfg.strategy == "all-pairs":
        code = uni.pos[pairs_with]
        all_pairs = np.flatnonzero((uni.pair_i == code) | (uni.pair_j == code))
    if np.isin(judged // uni.n_examples, all_pairs).sum() >= len(all_pairs) * uni.n_examples:
        return empty, "all pairs judged"
    if cfg.strategy == "all-pairs":
        slots, rank = uni.open_slots(all_pairs, judged, rng)
        return uni.frame(np.sort(_take(slots, rank, left, rng))), None

    # Warm-up: every pair gets warmup_per_pair examples (fewer if the test sets are smaller).
    target = min(cfg.warmup_per_pair, uni.n_examples)
    short = np.flatnonzero(_pair_counts(uni, judged) < target)
    if len(short):
        slots, rank = uni.open_slots(short, judged, rng)
        # Ranks count unjudged examples first (judged ones sort last), so rank < missing picks the missing ones.
        missing = target - _pair_counts(uni, judged)
        keep = rank < missing[slots // uni.n_examples]
        return uni.frame(np.sort(_take(slots[keep], rank[keep], left, rng))), None

    table = _standings(uni, done, cfg)
    names = list(uni.names)
    if table is None or len(table) == 0:
        focus = np.arange(len(names))
        tier1 = all_pairs
    else:
        lead = table.iloc[0]
        rated = set(table["contender"])
        # A contender never compared with the leader's group (directly or through others) is a challenger too.
        apart = table["group"] != lead["group"] if "group" in table.columns else False
        overlap = table[(table["contender"] != lead["contender"]) & ((table["ci_high"] >= lead["ci_low"]) | apart)]
        challengers = [uni.pos[c] for c in overlap["contender"]] + [uni.pos[c] for c in names if c not in rated]
        if not challengers:
            return empty, f"top contender separated at {cfg.confidence:.0%} ({lead['contender']})"
        leader = uni.pos[lead["contender"]]
        chal = np.array(challengers, dtype=np.int64)
        tier1 = uni.pair_of(np.full(len(chal), leader), chal)
        focus = np.concatenate([[leader], chal])
    size = cfg.round_size if left is None else min(cfg.round_size, left)
    slots, rank = uni.open_slots(tier1, judged, rng)
    if len(slots) == 0:
        # The leader has met every challenger on every example: judge the challengers against the rest,
        # which still narrows their intervals through common opponents.
        involved = np.isin(uni.pair_i, focus) | np.isin(uni.pair_j, focus)
        slots, rank = uni.open_slots(np.flatnonzero(involved), judged, rng)
        if len(slots) == 0:
            return empty, "every comparison that could separate the leader is judged"
    return uni.frame(np.sort(_take(slots, rank, size, rng))), None
