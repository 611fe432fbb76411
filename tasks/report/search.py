"""The report's section on the search's own merges: its path round by round, and how the kept proposal fared."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tasks.config.schema import Merge, SearchConfig
from tasks.core.tables import md_table
from tasks.rating.win_rates import intervals_overlap, pooled_models, win_rate_ci
from tasks.report.verdict import scores, win_words
from tasks.store.store import Store


def _interval(x: list[float] | None) -> str:
    """`1012 [990, 1030]`, or `not rated`."""
    if not x:
        return "not rated"
    return " ".join([f"{x[0]:.0f}", f"[{x[1]:.0f}, {x[2]:.0f}]"])


def kept_merges(store: Store, run_rel: str) -> list[Merge]:
    """The proposals a run kept, and those they were merged from (its search/kept.yaml), as merges of its config;
    none when the run had no search."""
    import yaml

    rel = f"{run_rel}/search/kept.yaml"
    rows = yaml.safe_load(store.read_text(rel)) or [] if store.exists(rel) else []
    return [Merge(name=m["name"], recipe=m["recipe"]) for m in rows]


def path_rows(path: dict[str, Any]) -> pd.DataFrame:
    """Every proposal of every round: its rule, parents (their dev ratings), its dev rating, and whether it was kept."""
    rows = []
    for rnd in path["rounds"]:
        for p in rnd["proposals"]:
            parents = ", ".join(f"{n} {_interval(r)}" for n, r in p["parents"].items())
            rows.append({"round": rnd["round"], "proposal": p["name"], "rule": p["rule"],
                         "parameter": f"{'t' if p['method'] == 'slerp' else 'density'} {p['param']:.4g}",
                         "parents (dev rating [CI])": parents, "dev rating [CI]": _interval(p.get("dev")),
                         "kept": "yes" if p["name"] in path["kept"] else ""})
    return pd.DataFrame(rows)


def _versus(ratings: pd.DataFrame, judgments: pd.DataFrame, ours: str, theirs: str, datasets: list[str],
            confidence: float) -> list[str]:
    """The kept proposal against the best hand-written model on the test split: ratings, and its win rate."""
    pooled = ratings[ratings["scope"] == "overall"].set_index("contender")
    a, b = pooled.loc[ours], pooled.loc[theirs]
    word = ("is not separated from" if intervals_overlap(a, b) else
            "beats" if a["ci_low"] > b["ci_high"] else "loses to")
    rate, low, high = win_rate_ci(scores(judgments, datasets, ours, theirs), confidence)
    mine, best = (_interval([x["rating"], x["ci_low"], x["ci_high"]]) for x in (a, b))
    return [f"- On the test split (pooled), the best proposed merge **{ours}** rates {mine} "
            f"and **{word}** the best hand-written model **{theirs}** {best} "
            f"({confidence:.0%} intervals).",
            f"- Head to head on the test rows: {ours} wins {rate:.0%} against {theirs} "
            f"({confidence:.0%} CI {low:.0%}..{high:.0%}, ties half)."]


def _held_out(validation: dict[str, Any] | None, kept: list[str], confidence: float) -> str:
    """What the held-out validation says about the kept proposals."""
    if not validation:
        return "- No held-out dataset is configured: the proposal is not validated."
    against = "; ".join(f"{win_words(r, r['opponent'], confidence)}: {r['verdict']}" for r in validation["against"])
    if validation["winner"] in kept:
        return (f"- Held out ({validation['dataset']}): the winner frozen before it was read is the proposal "
                f"**{validation['winner']}**; there it {against}.")
    return (f"- Held out ({validation['dataset']}): the winner frozen before it was read is "
            f"**{validation['winner']}**, not a proposal, so the held-out set does not test the proposal; there "
            f"the winner {against}.")


def search_lines(cfg: SearchConfig, store: Store, run_rel: str, ratings: pd.DataFrame, judgments: pd.DataFrame,
                 validation: dict[str, Any] | None) -> list[str]:
    """The report section: split, each round's proposals with dev ratings, the stop, and the kept proposal on test."""
    rel = f"{run_rel}/search/search.json"
    if not cfg.search.rounds or not store.exists(rel):
        return []
    path = store.read_json(rel)
    lines = ["## The search's own merges", "",
             f"Proposed from the ratings on a development split ({path['dev_share']:.0%} of each dataset's training "
             "rows, chosen by a hash of each row's content; see search/split.json): proposals and the leaders they "
             "are judged against are fine-tuned on the other training rows and judged on the development rows. "
             "The test split played no part in choosing them; only the kept proposal is rated on it with every "
             "other contender, " + ("after a fine-tune on all the training rows, as every contender's final one "
                                    "(search.refit)." if cfg.search.refit else "with the same fine-tune: every "
                                    "contender's fine-tunes, the test rating's too, train on those other rows "
                                    "(search.refit off)."), ""]
    rows = path_rows(path)
    lines += [md_table(rows) if len(rows) else "No proposal was made.", "", f"Stopped: {path['stop']}.", ""]
    kept = path["kept"]
    proposals = set(rows["proposal"]) if len(rows) else set()
    hand = pooled_models(ratings)
    hand = hand[~hand["contender"].isin(proposals)]
    best_kept = pooled_models(ratings)
    best_kept = best_kept[best_kept["contender"].isin(kept)]
    if len(best_kept) and len(hand):
        lines += _versus(ratings, judgments, str(best_kept.iloc[0]["contender"]), str(hand.iloc[0]["contender"]),
                         [d.name for d in cfg.datasets], cfg.rating.confidence)
    lines += [_held_out(validation, kept, cfg.rating.confidence), ""]
    return lines
