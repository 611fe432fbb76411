"""The answer a search is run for: is the best fine-tune as good as the teacher and the references, and at what cost
and speed? One verdict per dataset and pooled, for the top of the report and the last lines of the terminal.

- Win rate: the best fine-tune's mean result against each reference over the test examples (1 win, 1/2 tie, 0 loss,
  both orders averaged), with a bootstrap interval over examples (tasks/rating/win_rates.py win_rate_ci).
- Cost of a fine-tune: the device seconds its batches took per request x `compute.usd_per_hour` of that device;
  per 1M output tokens likewise. A reference's cost is what its requests cost (`cost_usd`, from `prices`).
- Latency: each request's own time (outputs' `latency_s`): a fine-tune's from its batch's start to its last token,
  a reference's round trip. Median and 95th percentile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tasks.config.base import MODEL_KINDS, TEACHER
from tasks.config.schema import SearchConfig
from tasks.plan.jobs import CHARS_PER_TOKEN, request_usd
from tasks.rating.win_rates import intervals_overlap, per_example_score, pooled_models, win_rate_ci


@dataclass(frozen=True)
class Serving:
    """What one contender's outputs cost and how fast they came, as measured."""

    requests: int
    usd_per_1k: float | None  # None: not priced (the teacher; a reference without `prices`)
    usd_per_1m_out: float | None
    p50_s: float | None  # None: not timed (the teacher; outputs stored before per-request timing)
    p95_s: float | None
    where: str  # e.g. "cpu at $0.10/h, 240 tokens/s, batches of 8"


def teacher_serving(outputs: pd.DataFrame, cfg: SearchConfig, prompt_chars: int) -> Serving:
    """The teacher's cost from `teacher.model`'s price (tokens estimated as characters / 4: its prompts' and its
    answers') and its latency as configured; unpriced without `teacher:`."""
    t, n = cfg.teacher, len(outputs)
    if t is None or t.model not in cfg.prices:
        return Serving(n, None, None, t.latency_s if t else None, None, "the dataset's own answers")
    price, out_tokens = cfg.prices[t.model], float(outputs["output"].str.len().sum()) / CHARS_PER_TOKEN
    usd = request_usd(price, prompt_chars, out_tokens)
    return Serving(n, usd / n * 1000, usd / out_tokens * 1e6 if out_tokens else None, t.latency_s, t.latency_s,
                   f"{t.model} at ${price.input:g}/${price.output:g} per 1M tokens, as characters / {CHARS_PER_TOKEN}")


def serving(outputs: pd.DataFrame, kind: str, name: str, cfg: SearchConfig, prompt_chars: int = 0) -> Serving:
    """Cost and latency of a contender's outputs: a fine-tune's from its batches, a reference's from its requests."""
    n = len(outputs)
    tokens = float(outputs["completion_tokens"].sum()) if n else 0.0
    if name == TEACHER and n:
        return teacher_serving(outputs, cfg, prompt_chars)
    if n == 0:
        return Serving(n, None, None, None, None, "the dataset's own answers")
    if kind in MODEL_KINDS:
        if "batch_s" not in outputs.columns:
            return Serving(n, None, None, None, None, "not timed (outputs stored before per-request timing)")
        dev = str(outputs["device"].iloc[0])
        price = cfg.compute.usd_per_hour.get(dev)
        seconds = float((outputs["batch_s"] / outputs["batch_size"]).sum())  # each batch's time once, per request
        usd = None if price is None else price * seconds / 3600
        speed = tokens / seconds if seconds > 0 else 0.0
        where = (f"{dev} at ${price:.2f}/h" if price is not None else f"{dev} (no compute.usd_per_hour for it)") + \
            f", {speed:.0f} tokens/s, batches of {int(outputs['batch_size'].max())}"
    else:
        usd = float(outputs["cost_usd"].sum()) if "cost_usd" in outputs.columns and name in cfg_priced(cfg) else None
        where = "API"
    lat = outputs["latency_s"].to_numpy(dtype=float)
    per_1k = None if usd is None else usd / n * 1000
    per_1m = None if usd is None or tokens == 0 else usd / tokens * 1e6
    return Serving(n, per_1k, per_1m, float(np.median(lat)), float(np.percentile(lat, 95)), where)


def cfg_priced(cfg: SearchConfig) -> set[str]:
    """Names of the references whose model has a price in `prices`."""
    return {r.name for r in cfg.references if r.model in cfg.prices}


def best_finetune(ratings: pd.DataFrame, scope: str) -> str | None:
    """The best-rated fine-tuned model (candidate or merge) in a scope: in the pooled one, validation's winner."""
    r = pooled_models(ratings, scope)
    return None if r.empty else str(r.iloc[0]["contender"])


def scores(judgments: pd.DataFrame, datasets: list[str], player: str, other: str) -> pd.Series:
    """`player`'s per-example results against `other` over these datasets (examples keyed by dataset and id)."""
    parts = []
    for ds in datasets:
        s = per_example_score(judgments[judgments["dataset"] == ds], player, other)
        parts.append(s.set_axis([f"{ds}/{i}" for i in s.index]))
    return pd.concat(parts) if parts else pd.Series(dtype=float)


def verdicts(cfg: SearchConfig, ratings: pd.DataFrame, judgments: pd.DataFrame,
             outputs: dict[str, dict[str, pd.DataFrame]], prompt_chars: dict[str, int] | None = None,
             ) -> list[dict[str, Any]]:
    """Per scope (pooled first, then each dataset; a lone dataset once): the best fine-tune, its serving figures, and per reference its
    win rate with interval and the reference's serving figures. `outputs`: dataset -> contender -> outputs table;
    `prompt_chars`: dataset -> characters of its test prompts (what a priced teacher was paid to read)."""
    kinds = cfg.model_kinds()
    refs = [TEACHER, *[r.name for r in cfg.references]]
    rows = []
    # one dataset: the pooled scope says nothing its own does not, so it is said once, under the dataset's name
    for scope in ["overall", *outputs] if len(outputs) > 1 else list(outputs):
        best = best_finetune(ratings, scope)
        if best is None:
            continue
        names = list(outputs) if scope == "overall" else [scope]
        frame = lambda c: pd.concat([outputs[d][c] for d in names if c in outputs[d]] or  # noqa: E731
                                    [pd.DataFrame(columns=["completion_tokens", "latency_s"])])
        against = []
        for ref in refs:
            s = scores(judgments, names, best, ref)
            rate, low, high = win_rate_ci(s, cfg.rating.confidence, seed=cfg.rating.seed)
            against.append({"reference": ref, "win_rate": rate, "ci_low": low, "ci_high": high, "n": int(s.size),
                            "serving": serving(frame(ref), kinds.get(ref, "reference"), ref, cfg,
                                               sum((prompt_chars or {}).get(d, 0) for d in names))})
        rows.append({"scope": scope, "model": best, "serving": serving(frame(best), kinds[best], best, cfg),
                     "against": against})
    return rows


def _money(x: float | None) -> str:
    """Dollars with enough digits to tell small costs apart."""
    if x is None:
        return "not priced"
    if 0 < x < 0.01:  # two significant digits, not 0.0000: a fine-tune's cost per request is often this small
        return f"${x:.{1 - math.floor(math.log10(x))}f}"
    return f"${x:.4f}" if x < 1 else f"${x:,.2f}"


def _times(x: float) -> str:
    """A ratio in words: '1/40' below 1, '3.0x' above."""
    return f"1/{1 / x:.0f}" if x < 0.5 else f"{x:.1f}x"


def _compare(ours: Serving, theirs: Serving) -> list[str]:
    """'1/40 of its cost per 1,000 requests', '3.0x its speed': only what both sides measured."""
    words = []
    if ours.usd_per_1k and theirs.usd_per_1k:
        words.append(f"{_times(ours.usd_per_1k / theirs.usd_per_1k)} of its cost per 1,000 requests")
    if ours.p50_s and theirs.p50_s:
        words.append(f"{_times(theirs.p50_s / ours.p50_s)} its speed (median latency)")
    return words


def _outcome(low: float, high: float, ref: str, margin: float) -> str:
    """Words for a win rate's interval: better (clear of 50%), as good within the non-inferiority margin (its low end
    above 50% minus the margin), worse (clear below 50%), or not shown either way."""
    if low > 0.5:
        return "better"
    if low >= 0.5 - margin:
        return f"as good as {ref} within {margin * 100:.0f} points"
    return "worse" if high < 0.5 else "no clear difference"


def win_words(a: dict[str, Any], ref: str, confidence: float, n: int | None = None) -> str:
    """"wins 48% (95% CI 44%-52%, 40 examples) against REF"; "wins none of the 40 examples against REF" where the
    interval is 0%-0% (and "wins every one ... against" at 100%-100%), which says the same in words."""
    n = n or a.get("n_examples")
    if a["ci_high"] <= 0.0 and n:
        return f"wins none of the {n} examples against {ref}"
    if a["ci_low"] >= 1.0 and n:
        return f"wins every one of the {n} examples against {ref}"
    return (f"wins {a['win_rate']:.0%} ({confidence:.0%} CI {a['ci_low']:.0%}-{a['ci_high']:.0%}"
            + (f", {n} examples" if n else "") + f") against {ref}")


def verdict_lines(rows: list[dict[str, Any]], confidence: float, margin: float = 0.05) -> list[str]:
    """The verdicts in words: one line per scope and reference, then one line of the fine-tune's own figures;
    `margin` is the non-inferiority margin in win rate (verdict.margin)."""
    lines = []
    for row in rows:
        label = "pooled" if row["scope"] == "overall" else row["scope"]
        sv: Serving = row["serving"]
        for a in row["against"]:
            if not a["n"]:
                continue
            ref = "the teacher" if a["reference"] == TEACHER else a["reference"]
            theirs: Serving = a["serving"]
            extra = _compare(sv, theirs)
            lines.append(f"{label}: {row['model']} {win_words(a, ref, confidence, a['n'])} "
                         f"({_outcome(a['ci_low'], a['ci_high'], ref, margin)})"
                         + (", at " + " and ".join(extra) if extra else ""))
        if sv.p50_s is not None:
            lines.append(f"{label}: {row['model']} serves at {_money(sv.usd_per_1k)} per 1,000 requests, "
                         f"{_money(sv.usd_per_1m_out)} per 1M output tokens ({sv.where}); latency median "
                         f"{sv.p50_s:.2f} s, p95 {sv.p95_s:.2f} s per request")
        for a in row["against"]:
            theirs = a["serving"]
            if a["reference"] == TEACHER and theirs.usd_per_1k is not None:
                lines.append(f"{label}: the teacher ({theirs.where}) costs {_money(theirs.usd_per_1k)} per 1,000 "
                             f"requests, {_money(theirs.usd_per_1m_out)} per 1M output tokens"
                             + (f"; latency median {theirs.p50_s:.2f} s as configured" if theirs.p50_s else ""))
            if a["reference"] != TEACHER and theirs.p50_s is not None:
                lines.append(f"{label}: {a['reference']} costs {_money(theirs.usd_per_1k)} per 1,000 requests, "
                             f"{_money(theirs.usd_per_1m_out)} per 1M output tokens; latency median "
                             f"{theirs.p50_s:.2f} s, p95 {theirs.p95_s:.2f} s")
    return lines


def recommendation(ratings: pd.DataFrame, validation: dict[str, Any] | None, confidence: float) -> list[str]:
    """The recommended base model (the best pooled fine-tune, and whether it is clear of the next), then its
    validation on the held-out dataset in a second line."""
    ranked = pooled_models(ratings)  # the order validation picks its winner in
    if ranked.empty:
        return ["no fine-tuned model was rated"]
    best = ranked.iloc[0]
    line = f"recommended base model: {best['contender']} ({best['kind']}, best pooled rating"
    if len(ranked) > 1:
        second = ranked.iloc[1]
        clear = not intervals_overlap(best, second)  # conservative: the two intervals do not even overlap
        line += (f", its {confidence:.0%} interval clear of {second['contender']}'s)" if clear else
                 f", its {confidence:.0%} interval overlaps {second['contender']}'s: a tie until more judgments)")
    else:
        line += ")"
    if not validation:
        return [line]
    held = [f"{win_words(r, 'the teacher' if r['opponent'] == TEACHER else r['opponent'], confidence)}: {r['verdict']}"
            for r in validation["against"]]
    return [line, f"validation on the held-out {validation['dataset']}: {validation['winner']} " + "; ".join(held)]
