"""Comparison planning: which (dataset, example, pair) to judge next, in rounds, and when to stop.

Adaptive planning (the default) judges a small uniform warm-up of every pair, then spends each round on the
leader against every challenger it is not yet separated from (references included), and stops when the leader is
separated, the budget is spent, or nothing left could change the answer.

"Separated at 95%" is a claim a user bets on, so it is tested to keep its promise:
- the gap between the leader and each other contender is tested with the cluster-robust (sandwich) covariance of
  the ratings, clustered by (dataset, example) (rate(ci='sandwich')): judgments of one example move together (its
  difficulty, both orders, all its pairs), which the Fisher intervals ignored (66-83% coverage for a stated 95%),
  against Student's t with as many degrees of freedom as the two have examples in common (at least 10);
- the test is made only at a few looks fixed in advance, at judgment counts growing 25% apart, and each look is
  tested at alpha / L, L being the number of looks the budget allows (a union bound): see _checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import t as student

from tasks.config.schema import BudgetConfig, RatingConfig
from tasks.core.errors import UserError
from tasks.rating.rate import rate_with_cov

PLAN_COLUMNS = ["dataset", "example_id", "contender_a", "contender_b"]
# Looks at the data are made at judgment counts growing by this factor (see _checkpoints).
LOOK_GROWTH = 1.25
# Fewest degrees of freedom of a gap's t test (see standing): a pair judged on few examples still borrows
# precision from common opponents, so its own examples alone would be too harsh.
MIN_DF = 10


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


def _checkpoints(uni: _Universe, cfg: BudgetConfig, orders: int) -> np.ndarray:
    """Judgment counts at which the adaptive planner may stop on a separated leader (the looks, fixed in advance).

    The first look follows the warm-up; each next one comes at 1.25x the judgments of the last, up to the most the
    budget allows (max_comparisons, or every (pair, example) slot in `orders`). One more look comes when the budget
    or the slots run out. A false "separated" needs one look to be wrong; with L looks each tested at alpha / L the
    chance that any is wrong is at most L * alpha / L = alpha (union bound, whatever the correlation between looks).
    E.g. 16 contenders, 600 examples, warm-up 4 per pair, both orders: first look at 4 * 120 * 2 = 960 judgments, at
    most 120 * 600 * 2 = 144,000: 960 * 1.25^m < 144,000 for m = 0..22, so L = 23 + 1 = 24 looks, each tested at
    0.05 / 24 = 0.0021 two-sided (z = 3.08 instead of 1.96; standing uses Student's t, a little wider).
    Growing looks, not one per round: adjacent rounds share most of their judgments, so a bound over all ~360 rounds
    would test at z = 3.8 for nothing; growing 25% apart costs at most 25% more judgments than needed (about 12% on
    average). Looks are also at least a quarter round apart, so the rounds cut to end at a look are not tiny.
    """
    return look_grid(len(uni.pair_i), uni.n_examples, cfg, orders)


def look_grid(pairs: int, n_examples: int, cfg: BudgetConfig, orders: int) -> np.ndarray:
    """The looks of _checkpoints for `pairs` pairs over `n_examples` examples (the plan's estimate reads them too)."""
    most = pairs * n_examples * orders
    if cfg.max_comparisons is not None:
        most = min(most, cfg.max_comparisons // orders * orders)
    n = min(cfg.warmup_per_pair, n_examples) * pairs * orders or cfg.round_size * orders
    grid = []
    while n < most:
        grid.append(n)
        # 25% more, in whole comparisons, and at least a quarter round more (no rounds of a few comparisons)
        n = max(orders * -(-int(n * LOOK_GROWTH) // orders), n + orders * max(1, cfg.round_size // 4))
    return np.array(grid, dtype=np.int64)


def look_level(confidence: float, looks: int) -> float:
    """The confidence each look is tested at so that all `looks` together are wrong at most 1 - confidence."""
    return 1.0 - (1.0 - confidence) / looks


@dataclass(frozen=True)
class Standing:
    """The leader at one look: who leads whom by how much, and who is not yet separated from it."""

    leader: str
    second: str | None
    lead_elo: float  # leader's rating minus the second's (inf: the leader is unbeaten, nan: not comparable)
    challengers: list[str]  # not separated from the leader at the tested level, never-compared and unrated included
    nearest: str | None  # the other contender closest to the leader in standard errors (where to judge next)
    level: float  # the confidence each gap was tested at

    def words(self, confidence: float, looks: int) -> str:
        """The standing in words, e.g. 'a leads b by 35 Elo, not separated at 95% (...)'."""
        how = f"tested at {self.level:.2%} at each of {looks} looks" if looks > 1 else "one look"
        by = (" (unbeaten so far)" if self.lead_elo == np.inf else
              f" by {self.lead_elo:.0f} Elo" if np.isfinite(self.lead_elo) else "")
        if not self.challengers:
            ahead = f", ahead of {self.second}{by}" if self.second is not None else ""
            return f"top contender separated at {confidence:.0%} ({self.leader}{ahead}; {how})"
        return f"{self.leader} leads {self.second or 'nobody rated'}{by}, not separated at {confidence:.0%} ({how})"


def _examples_met(judgments: pd.DataFrame, leader: str) -> dict[str, int]:
    """Distinct (dataset, example) on which each contender was judged against the leader."""
    a, b = judgments["contender_a"].astype(str), judgments["contender_b"].astype(str)
    mine = judgments[(a == leader) | (b == leader)]
    other = np.where(mine["contender_a"].astype(str) == leader, mine["contender_b"].astype(str),
                     mine["contender_a"].astype(str))
    key = mine["dataset"].astype(str) + "\x1f" + mine["example_id"].astype(str)
    return pd.Series(key.to_numpy()).groupby(other).nunique().to_dict()


def standing(judgments: pd.DataFrame, contenders: Sequence[str], level: float) -> Standing | None:
    """Test the pooled leader against every other contender at `level` (sandwich gap tests); None before any data.

    One test per look: the planner passes the level corrected for its looks (look_level); a single final test
    (e.g. after judging a fixed sample) passes the confidence itself.
    """
    names = {str(c) for c in contenders}
    if judgments is None or len(judgments) == 0:
        return None
    both = judgments["contender_a"].astype(str).isin(names) & judgments["contender_b"].astype(str).isin(names)
    mine = judgments[both]
    try:
        r, cov = rate_with_cov(mine, {}, RatingConfig(ci="sandwich", confidence=level))
    except UserError:
        return None  # e.g. only failed judgments so far, or a single contender judged
    # Contenders whose judgments all failed have no rating: they count as unrated (challengers), as before.
    table = r[(r["scope"] == "overall") & r["rating"].notna()]
    if len(table) == 0:
        return None
    lead = table.iloc[0]
    met = _examples_met(mine, str(lead["contender"]))
    score: dict[str, float] = {}  # gap in standard errors (-inf: not comparable, so a challenger whatever the gap)
    for _, c in table.iloc[1:].iterrows():
        a, b = str(lead["contender"]), str(c["contender"])
        if "group" in table.columns and c["group"] != lead["group"]:
            score[b] = -np.inf  # never compared with the leader's group, directly or through others
        elif a in cov.index and b in cov.index:
            var = cov.loc[a, a] + cov.loc[b, b] - 2 * cov.loc[a, b]
            # Student's t, not the normal: the sandwich variance is itself estimated, from about as many clusters as
            # the two have examples in common (few early on: the normal's z made early looks too bold).
            crit = student.ppf(1.0 - (1.0 - level) / 2, df=max(met.get(b, 0) - 1, MIN_DF))
            score[b] = (lead["rating"] - c["rating"]) / np.sqrt(max(var, 1e-12)) / crit
        else:  # an unbounded side has a one-sided bound only: separated when the intervals do not overlap
            score[b] = 2.0 if lead["ci_low"] > c["ci_high"] else -np.inf
    challengers = [b for b, v in score.items() if v <= 1.0] + sorted(names - set(table["contender"]))
    second = table.iloc[1] if len(table) > 1 else None
    gap = np.nan  # no number across groups (never compared), nor from a contender that never won
    if second is not None and second.get("group", 0) == lead.get("group", 0):
        gap = np.inf if lead["rating"] == np.inf else float(lead["rating"] - second["rating"])
        gap = gap if not np.isnan(gap) and second["rating"] > -np.inf else np.nan
    nearest = min(score, key=score.get) if score else None
    return Standing(str(lead["contender"]), None if second is None else str(second["contender"]), gap, challengers,
                    nearest, level)


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
    An adaptive stop says whether the leader is separated, and by how much it leads when it is not.
    """
    uni = _Universe(contenders, examples)
    judged = uni.done_slots(done)
    empty = uni.frame(np.empty(0, dtype=np.int64))
    left, reason = _budget_left(done, cfg, spent_usd, orders)
    all_pairs = np.arange(len(uni.pair_i))
    if pairs_with is not None and cfg.strategy == "all-pairs":
        code = uni.pos[pairs_with]
        all_pairs = np.flatnonzero((uni.pair_i == code) | (uni.pair_j == code))
    if not reason and np.isin(judged // uni.n_examples, all_pairs).sum() >= len(all_pairs) * uni.n_examples:
        reason = "all pairs judged"
    if cfg.strategy == "all-pairs":
        if reason:
            return empty, reason
        slots, rank = uni.open_slots(all_pairs, judged, rng)
        return uni.frame(np.sort(_take(slots, rank, left, rng))), None
    return _adaptive(uni, done, judged, cfg, rng, left, reason, orders)


def _adaptive(uni: _Universe, done: pd.DataFrame, judged: np.ndarray, cfg: BudgetConfig, rng: np.random.Generator,
              left: int | None, reason: str | None, orders: int) -> tuple[pd.DataFrame, str | None]:
    """One adaptive round: the warm-up, a look at a checkpoint, or the leader against its challengers."""
    empty = uni.frame(np.empty(0, dtype=np.int64))
    grid = _checkpoints(uni, cfg, orders)
    looks = len(grid) + 1  # the checkpoints and the last look, when the budget or the slots run out
    level = look_level(cfg.confidence, looks)
    names = list(uni.names)

    def last_look(why: str) -> tuple[pd.DataFrame, str]:
        """Stop for `why`, saying whether the leader is separated (the last look) and by how much it leads."""
        st = standing(done, names, level)
        return empty, why if st is None else f"{why}; {st.words(cfg.confidence, looks)}"

    if reason:
        return last_look(reason)
    # Warm-up: every pair gets warmup_per_pair examples (fewer if the test sets are smaller).
    target = min(cfg.warmup_per_pair, uni.n_examples)
    short = np.flatnonzero(_pair_counts(uni, judged) < target)
    if len(short):
        slots, rank = uni.open_slots(short, judged, rng)
        # Ranks count unjudged examples first (judged ones sort last), so rank < missing picks the missing ones.
        missing = target - _pair_counts(uni, judged)
        keep = rank < missing[slots // uni.n_examples]
        return uni.frame(np.sort(_take(slots[keep], rank[keep], left, rng))), None

    n = 0 if done is None else len(done)
    st = standing(done, names, level)
    if st is None:
        focus, tier1 = np.arange(len(names)), np.arange(len(uni.pair_i))
    else:
        if not st.challengers and n in grid:  # a look: the stop is claimed only at a checkpoint
            return empty, st.words(cfg.confidence, looks)
        leader = uni.pos[st.leader]
        # Between looks a separated leader is judged against its nearest rival, to keep it separated at the next.
        chal = np.array([uni.pos[c] for c in (st.challengers or [st.nearest or st.leader])], dtype=np.int64)
        tier1 = uni.pair_of(np.full(len(chal), leader), chal)
        tier1 = tier1[tier1 >= 0]
        focus = np.concatenate([[leader], chal])
    size = cfg.round_size if left is None else min(cfg.round_size, left)
    ahead = grid[grid > n]
    if len(ahead):  # end the round at the next look (rounded up to whole comparisons)
        size = min(size, -(-(int(ahead[0]) - n) // orders))
    slots, rank = uni.open_slots(tier1, judged, rng)
    picked = _take(slots, rank, size, rng)
    if len(picked) < size:
        # The leader has met every challenger on (nearly) every example: judge the challengers against the rest,
        # which still narrows their intervals through common opponents.
        involved = np.isin(uni.pair_i, focus) | np.isin(uni.pair_j, focus)
        slots, rank = uni.open_slots(np.flatnonzero(involved), np.union1d(judged, picked), rng)
        picked = np.concatenate([picked, _take(slots, rank, size - len(picked), rng)])
        if len(picked) == 0:
            return last_look("every comparison that could separate the leader is judged")
    return uni.frame(np.sort(picked)), None
