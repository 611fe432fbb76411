"""The search's proposal rule: from the ratings on the development split, the next merges to try.

Every proposal is a point of a *family*: a merge method over fixed parents with one parameter in [0, 1] (slerp's `t`,
TIES' or DARE's `density`), on a lattice of 0.01. The families the rule models each round: every family tried so far
(earlier proposals, and config merges of that simple form), slerp of the top two mergeable leaders, and ties /
dare_ties of the top three leaders other than the base model. Only mergeable parents are combined (the caller checks).

Each family's rating as a function of its parameter is a Gaussian process (squared-exponential kernel, length 0.1 of
the range: a merge's quality may change that fast; amplitude: the sd of the models' ratings, at least the noise;
prior mean: the parents' mean rating), fitted to the family's rated points with each one's noise sd read off its
95% interval (a slerp family also knows its parents at t 0 and 1). A round's proposals are picked one at a time:
the untried lattice point with the highest upper bound (posterior mean + 2 sd; 0.5 sd in the last round, which only
exploits) over every family, then that point is believed to rate its mean (kriging believer) so the next one goes
elsewhere. A family never tried gets its first point before any family gets another in that round (equal bounds:
the point nearest 0.5). Deterministic: a pure function of the ratings and the points tried (no random draw), so a
restarted search proposes the same merges; a point tried before is never proposed again. Measured against grids
by bench/merge_search.py (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import pandas as pd

from tasks.config.merge_search import MergeSearchConfig
from tasks.config.schema import Merge
from tasks.store.keys import content_key

CONFIG_STEP = 0.25  # a config merge's step (recorded only)
LATTICE = 0.01  # proposals' parameters are multiples of this
LATTICE_POINTS = [round(i * LATTICE, 6) for i in range(1, 101)]
LENGTH = 0.1  # kernel length, parameter units: correlation exp(-d^2 / 0.02) is 0.61 at d 0.1, 0.14 at 0.2, so
# points 0.2 apart say little of each other and a round spreads over [0, 1] before it refines
BETA = 2.0  # a point's upper bound: posterior mean + BETA sd while rounds are left (exploration)
BETA_LAST = 0.5  # ... in the last round (its best rated proposal is the one kept: exploit)
TASK_METHODS = ("ties", "dare_ties")  # methods that take differences from a base model


@dataclass(frozen=True)
class Point:
    """One merge of a family: `method` over `parents` (slerp: base first, t towards the second) at `param`."""

    name: str
    method: str
    parents: tuple[str, ...]
    base: str | None
    param: float
    step: float
    round: int = 0  # 0: a merge of the config
    rule: str = "config"
    reason: str = ""
    dtype: str | None = None
    parent_ratings: dict[str, list[float]] = field(default_factory=dict, compare=False)

    @property
    def family(self) -> tuple[Any, ...]:
        """What the point shares with its family: method, parents, base."""
        return self.method, self.parents, self.base

    def recipe(self) -> dict[str, Any]:
        """The plain mergekit recipe (the form of the config's `merges:`)."""
        if self.method == "slerp":
            recipe: dict[str, Any] = {"merge_method": "slerp", "base_model": self.parents[0],
                                      "models": [{"model": p} for p in self.parents],
                                      "parameters": {"t": round(self.param, 6)}}
        else:
            recipe = {"merge_method": self.method, "base_model": self.base,
                      "models": [{"model": p, "parameters": {"weight": 1.0, "density": round(self.param, 6)}}
                                 for p in self.parents],
                      "parameters": {"normalize": True}}
        return recipe | ({"dtype": self.dtype} if self.dtype else {})

    def merge(self) -> Merge:
        """The point as a merge of the config."""
        return Merge(name=self.name, recipe=self.recipe())

    def record(self) -> dict[str, Any]:
        """What the run folder keeps of a proposal: its recipe and why it was proposed."""
        return {"name": self.name, "round": self.round, "rule": self.rule, "reason": self.reason,
                "parents": {p: self.parent_ratings.get(p) for p in self.parents},
                "base": self.base, "method": self.method, "param": self.param, "step": self.step,
                "recipe": self.recipe()}


def slerp_point(name: str, a: str, b: str, t: float, **kw: Any) -> Point:
    """A slerp point with its parents in a fixed order (slerp(a, b, t) is slerp(b, a, 1 - t))."""
    if a > b:
        a, b, t = b, a, 1.0 - t
    return Point(name, "slerp", (a, b), a, t, **kw)


def config_point(merge: Merge) -> Point | None:
    """A config merge as a point of a family, when it has that simple form (else None: it is never refined)."""
    r, params = merge.recipe, merge.recipe.get("parameters") or {}
    models = [m.get("model") for m in r.get("models") or [] if isinstance(m, dict)]
    kw = {"step": CONFIG_STEP, "dtype": r.get("dtype")}
    if r.get("slices") or r.get("tokenizer_source") or not all(isinstance(m, str) for m in models):
        return None
    if r.get("merge_method") == "slerp" and len(models) == 2 and r.get("base_model") in models:
        t = params.get("t")
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            other = models[1] if models[0] == r["base_model"] else models[0]
            return slerp_point(merge.name, r["base_model"], other, float(t), **kw)
    if r.get("merge_method") in TASK_METHODS and r.get("base_model") and params.get("normalize", True) is True:
        each = [(m.get("parameters") or {}) for m in r["models"]]
        densities = {e.get("density", params.get("density")) for e in each}
        weights = {e.get("weight", params.get("weight", 1.0)) for e in each}
        if len(densities) == 1 and weights <= {1, 1.0} and isinstance(next(iter(densities)), (int, float)):
            return Point(merge.name, r["merge_method"], tuple(sorted(models)), r["base_model"],
                         float(next(iter(densities))), **kw)
    return None


def task_base(cfg: MergeSearchConfig, merges: list[Merge]) -> str | None:
    """What ties/dare proposals take differences from: search.base_model, else that of the first ties/dare merge."""
    if cfg.base_model:
        return cfg.base_model
    return next((m.recipe.get("base_model") for m in merges if m.recipe.get("merge_method") in TASK_METHODS
                 and isinstance(m.recipe.get("base_model"), str)), None)


def ranked(ratings: pd.DataFrame) -> pd.DataFrame:
    """Pooled ratings of the models, best first (ties broken by name, so the order is fixed)."""
    r = ratings[(ratings["scope"] == "overall") & ratings["kind"].isin(("candidate", "merge"))]
    r = r.assign(_key=r["rating"].fillna(-1e18))
    return r.sort_values(["_key", "contender"], ascending=[False, True]).drop(columns="_key")


def interval_of(row: pd.Series) -> list[float]:
    """[rating, low, high] of a ratings row, rounded for the record."""
    return [round(float(row[k]), 1) for k in ("rating", "ci_low", "ci_high")]


def _in_range(method: str, p: float) -> bool:
    """slerp's t strictly inside (0, 1) (the ends are the parents); a density in (0, 1]."""
    return 0.0 < p < 1.0 if method == "slerp" else 0.0 < p <= 1.0


def _named(p: Point, round_no: int) -> Point:
    """The point named by its round, method, parameter and recipe: r2-slerp-0.375-3fa2."""
    probe = replace(p, name="x")
    return replace(p, name=f"r{round_no}-{p.method.replace('_', '-')}-{p.param:.4g}-"
                           f"{content_key(probe.recipe())[:4]}")


def _best_mergeable(ranking: list[str], k: int, extra: tuple[str, ...],
                    mergeable: Callable[[tuple[str, ...]], bool]) -> tuple[str, ...]:
    """The best-rated `k` models (sorted by name) that merge together with `extra`, walking down the ranking; () if
    fewer than 2 do (ties of two is still a merge, slerp needs two)."""
    chosen: list[str] = []
    for n in ranking:
        if len(chosen) < k and mergeable((*chosen, n, *extra)):
            chosen.append(n)
    return tuple(sorted(chosen)) if len(chosen) >= 2 else ()


def _families(ratings_rows: dict[str, pd.Series], ranking: list[str], points: list[Point], cfg: MergeSearchConfig,
              base: str | None, mergeable: Callable[[tuple[str, ...]], bool], round_no: int,
              dtype: str | None) -> list[Point]:
    """One template point per family the rule models: every family tried so far, then slerp of the top two mergeable
    leaders and ties / dare_ties of the top three other than the base (new families, once each)."""
    mark = lambda names: {n: interval_of(ratings_rows[n]) for n in names if n in ratings_rows}  # noqa: E731
    out: dict[tuple[Any, ...], Point] = {}
    for p in points:
        what = f"{p.method} of {', '.join(p.parents)}" + (f" from {p.base}" if p.method in TASK_METHODS else "")
        out.setdefault(p.family, replace(p, round=round_no, rule="ucb", reason=f"{what} (tried before)",
                                         parent_ratings=mark(p.parents)))
    pair = _best_mergeable(ranking[: cfg.leaders], 2, (), mergeable)
    if "slerp" in cfg.methods and pair:
        p = slerp_point("", *pair, 0.5, step=LATTICE, round=round_no, rule="slerp-top2", dtype=dtype,
                        reason="slerp of the top two mergeable models on dev (new)", parent_ratings=mark(pair))
        out.setdefault(p.family, p)
    three = _best_mergeable([n for n in ranking[: cfg.leaders] if n != base], 3, (base,), mergeable) if base else ()
    for method in [m for m in cfg.methods if m in TASK_METHODS]:
        if three:
            why = f"{method} of the top {len(three)} mergeable models on dev other than the base {base} (new)"
            p = Point("", method, three, base, 0.5, LATTICE, round_no, f"{method}-top3", why, dtype, mark(three))
            out.setdefault(p.family, p)
    return list(out.values())


@dataclass
class Model:
    """A Gaussian process over one family's parameter: its observations (parameter, rating, noise sd) and prior."""

    mean: float  # prior mean: the parents' mean rating
    xs: list[float]
    ys: list[float]
    sds: list[float]

    def posterior(self, grid: np.ndarray, amp: float, length: float) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and sd of the rating at `grid` (squared-exponential kernel, amplitude `amp`)."""
        k = lambda a, b: amp ** 2 * np.exp(-0.5 * ((a[:, None] - b[None, :]) / length) ** 2)  # noqa: E731
        if not self.xs:
            return np.full(len(grid), self.mean), np.full(len(grid), amp)
        x, y = np.array(self.xs), np.array(self.ys) - self.mean
        gram = k(x, x) + np.diag(np.array(self.sds) ** 2 + 1e-9 * amp ** 2)
        cross = k(grid, x)
        chol = np.linalg.cholesky(gram)
        alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, y))
        v = np.linalg.solve(chol, cross.T)
        var = np.maximum(amp ** 2 - (v ** 2).sum(0), 1e-12 * amp ** 2)
        return self.mean + cross @ alpha, np.sqrt(var)


def _sd(row: pd.Series) -> float:
    """A rating's noise sd from its 95% interval."""
    return max(float(row["ci_high"] - row["ci_low"]) / (2 * 1.96), 1e-6)


def propose(ratings: pd.DataFrame, points: list[Point], cfg: MergeSearchConfig, base: str | None,
            mergeable: Callable[[tuple[str, ...]], bool], round_no: int, dtype: str | None = None) -> list[Point]:
    """Up to cfg.proposals new points for round `round_no`, from the ratings and every point tried so far."""
    order = ranked(ratings)
    # only finite ratings and intervals inform the model (a contender without judgments has none)
    rows = {r["contender"]: r for _, r in order.iterrows()
            if np.isfinite([float(r[k]) for k in ("rating", "ci_low", "ci_high")]).all()}
    rated = pd.Series([float(r["rating"]) for r in rows.values()], dtype=float)
    # a rating's noise: the median interval's sd; how far a merge may stray from its parents' mean rating (the
    # kernel's amplitude): as far as the models stray from one another (their sd), at least the noise
    noise = float(np.median([_sd(r) for r in rows.values()])) if rows else 1.0
    amp = max(float(rated.std()) if len(rated) > 1 else 0.0, noise, 1.0)
    left = max(cfg.rounds - round_no, 0)
    beta = BETA_LAST if left == 0 else BETA
    seen = {(p.family, round(p.param, 6)) for p in points}
    models, templates = [], _families(rows, list(order["contender"]), points, cfg, base, mergeable, round_no, dtype)
    for t in templates:
        parents = [float(rows[n]["rating"]) for n in t.parents if n in rows]
        m = Model(float(np.mean(parents)) if parents else float(rated.mean()) if len(rated) else 0.0, [], [], [])
        if t.method == "slerp":  # slerp at t 0 and 1 is its parents
            for x, n in ((0.0, t.parents[0]), (1.0, t.parents[1])):
                if n in rows:
                    m.xs.append(x), m.ys.append(float(rows[n]["rating"])), m.sds.append(_sd(rows[n]))
        for p in points:
            if p.family == t.family and p.name in rows:
                m.xs.append(p.param), m.ys.append(float(rows[p.name]["rating"])), m.sds.append(_sd(rows[p.name]))
        models.append(m)
    # a family never tried gets its first point before any family gets another in this round: the demo's two rounds
    # try every family at least once, even when one family's prior mean is a few points higher than another's
    fresh = {i for i, t in enumerate(templates) if not any(p.family == t.family for p in points)}
    out: list[Point] = []
    while len(out) < cfg.proposals:
        best: tuple[float, int, float, float, float] | None = None
        for i, (t, m) in enumerate(zip(templates, models)):
            if fresh and i not in fresh:
                continue
            grid = np.array([x for x in LATTICE_POINTS if _in_range(t.method, x) and (t.family, x) not in seen])
            if not len(grid):
                continue
            mu, sd = m.posterior(grid, amp, LENGTH)
            score = np.round(mu + beta * sd, 6)
            # equal bounds (a family with no observation yet): the point nearest the middle of the range
            j = max(range(len(grid)), key=lambda k: (score[k], -abs(grid[k] - 0.5), -grid[k]))
            if best is None or score[j] > best[0]:
                best = (float(score[j]), i, float(grid[j]), float(mu[j]), float(sd[j]))
        if best is None:
            if not fresh:
                break
            fresh = set()
            continue
        score, i, x, mu, sd = best
        fresh.discard(i)
        t = templates[i]
        seen.add((t.family, x))
        # the batch's next point must go elsewhere: believe this one measures its mean (kriging believer)
        models[i].xs.append(x), models[i].ys.append(mu), models[i].sds.append(noise)
        what = "t" if t.method == "slerp" else "density"
        tail = "; last round" if not left else f"; {left} round{'s' if left > 1 else ''} left"
        why = (f"{t.reason}: {what} {x:.4g}, predicted rating {mu:.0f} (sd {sd:.0f}), the highest upper bound "
               f"{score:.0f} (mean + {beta:g} sd) of every family's untried points"
               f"{tail}")
        out.append(_named(replace(t, param=x, step=LATTICE, reason=why), round_no))
    return out


def improved(ratings: pd.DataFrame, new: list[str]) -> tuple[bool, str]:
    """Whether a proposal of this round beats the leader's interval: its rating above the best other model's upper
    bound. Returns (beat?, the sentence for the report)."""
    order = ranked(ratings)
    mine, rest = order[order["contender"].isin(new)], order[~order["contender"].isin(new)]
    if mine.empty or rest.empty:
        return False, "nothing to compare"
    best, lead = mine.iloc[0], rest.iloc[0]
    beat = bool(best["rating"] > lead["ci_high"])
    return beat, (f"best proposal {best['contender']} {best['rating']:.0f} "
                  f"{'above' if beat else 'not above'} the leader {lead['contender']}'s interval "
                  f"[{lead['ci_low']:.0f}, {lead['ci_high']:.0f}]")


def kept(ratings: pd.DataFrame, proposals: list[str], keep: int) -> list[str]:
    """The best `keep` proposals by their development rating: the final set rated on the test split."""
    order = ranked(ratings)
    return list(order[order["contender"].isin(proposals)]["contender"][:keep])
