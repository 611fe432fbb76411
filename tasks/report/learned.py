"""Did fine-tuning work? Each fine-tune against its two floors (tasks/generate/floors.py) on the same test rows.

Per example, the dataset's metric scores the fine-tune's answer and the floor's: 1 when the fine-tune's is better,
1/2 when equal, 0 when worse; the mean is its win rate over the floor, with a bootstrap interval over examples
(tasks/rating/win_rates.py). A fine-tune learned its dataset when that interval is clear above 50% against both its
untuned base and the trivial answer. Where no fine-tune of a dataset learned, the search recommends nothing for it:
a ranking of fine-tunes at chance names a winner that is no better than no model at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from tasks.config.base import TRIVIAL, untuned_name
from tasks.core.tables import md_table
from tasks.judge.judgments import metric_scores
from tasks.plan.prepare import Prepared
from tasks.rating.win_rates import win_rate_ci


@dataclass(frozen=True)
class Lift:
    """One fine-tune against its floors on one dataset: mean metric scores and win rates with their intervals."""

    model: str
    dataset: str
    score: float
    untuned: float
    trivial: float
    vs_untuned: tuple[float, float, float]  # win rate, low, high
    vs_trivial: tuple[float, float, float]
    learned: bool
    loss: tuple[float, float] | None = None  # training loss, first and last steps


def paired(ours: pd.Series, theirs: pd.Series) -> pd.Series:
    """Per example: 1 when our score is higher, 1/2 when equal, 0 when lower."""
    return pd.Series(np.where(ours > theirs, 1.0, np.where(ours == theirs, 0.5, 0.0)), index=ours.index)


def lifts(prep: Prepared, frames: dict[str, dict[str, pd.DataFrame]], confidence: float, seed: int,
          losses: dict[tuple[str, str], tuple[float, float]]) -> list[Lift]:
    """Every fine-tune that has outputs and floors on a dataset, against them. `frames`: dataset -> contender ->
    outputs (its floors included); `losses`: (model, dataset) -> training loss first and last."""
    out = []
    for ds, data in prep.datasets.items():
        have = frames.get(ds, {})
        if TRIVIAL not in have:
            continue
        trivial = metric_scores(data.test, data.metric, have[TRIVIAL])
        for m, info in prep.models.items():
            if not info.finetuned or m not in have or untuned_name(m) not in have:
                continue
            ours = metric_scores(data.test, data.metric, have[m])
            base = metric_scores(data.test, data.metric, have[untuned_name(m)])
            vs_u = win_rate_ci(paired(ours, base), confidence, seed=seed)
            vs_t = win_rate_ci(paired(ours, trivial), confidence, seed=seed)
            out.append(Lift(m, ds, float(ours.mean()), float(base.mean()), float(trivial.mean()), vs_u, vs_t,
                            vs_u[1] > 0.5 and vs_t[1] > 0.5, losses.get((m, ds))))
    return out


def _why_not(lift: Lift) -> str:
    """Which floor a fine-tune did not clearly beat, and how its training loss moved."""
    failed = [name for name, (_, low, _) in (("its untuned base", lift.vs_untuned), ("the trivial answer",
                                                                                    lift.vs_trivial)) if low <= 0.5]
    loss = ""
    if lift.loss and lift.loss[0] > 0:
        first, last = lift.loss
        loss = f"; its training loss went {first:g} -> {last:g} ({(first - last) / first:.0%} lower)"
    return f"{lift.model} ({lift.score:.2f}), was not clearly better than {' or '.join(failed)}{loss}"


def learned_lines(found: list[Lift]) -> list[str]:
    """One line per dataset where no fine-tune learned: no recommendation for it, the closest fine-tune and why."""
    lines = []
    for ds in dict.fromkeys(lift.dataset for lift in found):
        mine = [lift for lift in found if lift.dataset == ds]
        if any(lift.learned for lift in mine):
            continue
        best = max(mine, key=lambda lift: lift.score)
        lines.append(f"no recommendation for {ds}: no fine-tune beat both its untuned base ({best.untuned:.2f}) and "
                     f"the trivial answer ({best.trivial:.2f}) on the metric; the best, {_why_not(best)}: try more "
                     "epochs or other learning rates (finetune.epochs, finetune.search; the report's Fine-tunes "
                     "table shows what was tried), a larger base, or check the dataset")
    return lines


def nothing_learned(found: list[Lift]) -> bool:
    """Whether floors were measured and no fine-tune learned any dataset."""
    return bool(found) and not any(lift.learned for lift in found)


def lift_section(found: list[Lift], confidence: float) -> list[str]:
    """The report's section: every fine-tune's score beside its floors', its win rates over them, and the answer."""
    if not found:
        return []
    pct = lambda w: f"{w[0]:.0%} ({w[1]:.0%}-{w[2]:.0%})"  # noqa: E731
    table = pd.DataFrame([{"dataset": f.dataset, "model": f.model, "score": round(f.score, 3),
                           "untuned": round(f.untuned, 3), "trivial": round(f.trivial, 3),
                           "vs untuned": pct(f.vs_untuned), "vs trivial": pct(f.vs_trivial),
                           "learned": "yes" if f.learned else "did not learn"} for f in found])
    return ["## Did fine-tuning work?", "",
            f"Each fine-tune's mean metric score beside its untuned base answering zero-shot and the trivial answer "
            f"(the most common training answer, or the prompt's first sentence for summaries), and how often it "
            f"beat each per example, with {confidence:.0%} intervals. It learned when both intervals are clear above "
            "50%.", "", md_table(table), ""]


def records(found: list[Lift]) -> list[dict[str, Any]]:
    """The lifts as JSON-able records (runs/<id>/learned.json, which flows.export reads)."""
    return [asdict(f) for f in found]
