"""The search's proposal rule: from the ratings on the development split, the next merges to try.

Deterministic (a restart with the same ratings proposes the same merges), and plain: every proposal is a point of a
*family* (a merge method over fixed parents, one parameter in [0, 1]: slerp's `t`, TIES' or DARE's `density`):
- refine: a leader that is a point of a family (an earlier proposal, or a config merge of that simple form) gets its
  two neighbours at +- its step, each with half the step (those tried already: at +- step/2, then step/4): a
  bisection towards the family's best parameter;
- slerp of the top two leaders at t = 0.5, 0.25, 0.75 (the points of that family not yet tried);
- ties / dare_ties of the top three leaders other than the base model, at density 0.5, 0.25, 0.75.
The lists are interleaved (first of each, then second of each...) up to `search.proposals`, skipping any point tried
before. Only mergeable parents are combined (same architecture, checked by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import pandas as pd

from tasks.config import Merge, MergeSearchConfig
from tasks.keys import content_key

GRID = (0.5, 0.25, 0.75)  # a new family's first points, best guess first
GRID_STEP = 0.125  # a grid point's step: its refinements fall halfway to its grid neighbours
CONFIG_STEP = 0.25  # a config merge's step: its refinements are the grid's other points
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


def _interval(row: pd.Series) -> list[float]:
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


def propose(ratings: pd.DataFrame, points: list[Point], cfg: MergeSearchConfig, base: str | None,
            mergeable: Callable[[tuple[str, ...]], bool], round_no: int, dtype: str | None = None) -> list[Point]:
    """Up to cfg.proposals new points for round `round_no`, from the ratings and every point tried so far."""
    order = ranked(ratings)
    rows = {r["contender"]: r for _, r in order.iterrows()}
    leaders = list(order["contender"][: cfg.leaders])
    by_name = {p.name: p for p in points}
    seen = {(p.family, round(p.param, 6)) for p in points}
    mark = lambda names: {n: _interval(rows[n]) for n in names if n in rows}  # noqa: E731
    queues: list[list[Point]] = []
    for rank, name in enumerate(leaders, 1):
        p = by_name.get(name)
        if p is None:
            continue
        why = (f"refine {name} (leader #{rank} on dev, rating {rows[name]['rating']:.0f}): "
               f"{'t' if p.method == 'slerp' else 'density'} {p.param:.4g} +- {p.step:.4g}")
        # its neighbours at +-step; where those were tried already (it stayed the leader), closer: +-step/2, +-step/4
        queues.append([replace(p, param=p.param + d, step=abs(d) / 2, round=round_no, rule="refine", reason=why,
                               parent_ratings=mark(p.parents))
                       for s in (p.step, p.step / 2, p.step / 4) for d in (-s, s) if _in_range(p.method, p.param + d)])
    pairs = [(a, b) for i, a in enumerate(leaders) for b in leaders[i + 1:] if mergeable((a, b))]
    if "slerp" in cfg.methods and pairs:
        a, b = pairs[0]
        why = f"slerp of the top two mergeable leaders on dev ({a}, {b})"
        queues.append([slerp_point("", a, b, t, step=GRID_STEP, round=round_no, rule="slerp-top2", dtype=dtype,
                                   reason=f"{why} at t={t} towards {b}", parent_ratings=mark((a, b)))
                       for t in GRID])
    others = [n for n in leaders if n != base]
    three = tuple(sorted(others[:3]))
    for method in [m for m in cfg.methods if m in TASK_METHODS]:
        if base is None or len(three) < 2 or not mergeable((*three, base)):
            continue
        why = f"{method} of the top {len(three)} leaders on dev other than the base {base} ({', '.join(three)})"
        queues.append([Point("", method, three, base, d, GRID_STEP, round_no, f"{method}-top3",
                             f"{why} at density {d}", dtype, mark(three)) for d in GRID])
    queues.append(_explore(points, rows, round_no, mark))
    out: list[Point] = []
    while len(out) < cfg.proposals and any(queues):
        for q in queues:
            while q:
                p = _named(q.pop(0), round_no)
                key = (p.family, round(p.param, 6))
                if key not in seen:
                    seen.add(key)
                    out.append(p)
                    break
            if len(out) == cfg.proposals:
                break
    return out


def _explore(points: list[Point], rows: dict[str, pd.Series], round_no: int,
             mark: Callable[[tuple[str, ...]], dict[str, list[float]]]) -> list[Point]:
    """Per family tried (best-rated first): the middle of its widest untried gap, so that a bisection stuck around
    the wrong place still samples the rest of [0, 1]."""
    families: dict[tuple[Any, ...], list[Point]] = {}
    for p in points:
        families.setdefault(p.family, []).append(p)
    best = lambda ps: max(float(rows[p.name]["rating"]) if p.name in rows else -1e18 for p in ps)  # noqa: E731
    out = []
    for fam in sorted(families.values(), key=lambda ps: (-best(ps), ps[0].name)):
        edges = sorted({0.0, 1.0, *(p.param for p in fam)})
        p = fam[0]
        # widest gap first (the next one when its middle is taken this round)
        out += [replace(p, param=(lo + hi) / 2, step=(hi - lo) / 4, round=round_no, rule="explore",
                        reason=f"explore {p.method} of {', '.join(p.parents)}: the middle of its widest untried gap "
                        f"{lo:.4g}..{hi:.4g}", parent_ratings=mark(p.parents))
                for lo, hi in sorted(zip(edges, edges[1:]), key=lambda g: (g[0] - g[1], g[0]))]
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
