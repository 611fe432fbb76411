"""The report's judge card section: the card's statistics (tasks/judge/card.py) as a table, with warnings, and the
ratings each judge gives on its own beside the pooled ones."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import pandas as pd

from tasks.core.errors import UserError
from tasks.core.tables import md_table
from tasks.judge.card import (ALPACA_EVAL_RERUN, LLM_PREFIX, MIN_AGREEMENT, agreement, agreement_by_dataset,
                              judge_name, llm_mask, longer_won_counts, metric_winners, ok_mask, output_lengths,
                              position_consistency, repeat_agreement, win_rate_moves)
from tasks.judge.repeat import NOT_SENT, eligible
from tasks.rating.rate import rate
from tasks.report.report import _interval_text, _rating_text

if TYPE_CHECKING:
    from tasks.config.schema import RatingConfig
    from tasks.data.load import Example


def card_table(judgments: pd.DataFrame, lengths: Mapping[tuple[str, str, str], int], metric_win: pd.Series,
               confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per judge: judgments used, consistency, longer-output wins, agreement with the metric (all datasets)."""
    names = judgments["judge"].map(judge_name)
    ok = ok_mask(judgments)
    rows = []
    for name in dict.fromkeys(names):
        mine = (names == name).to_numpy()
        part = judgments[mine]
        llm = name.startswith(LLM_PREFIX)
        share, pairs = position_consistency(part) if llm else (None, 0)
        wins, decisive = longer_won_counts(part, lengths) if llm else (0, 0)
        agree = agreement(part, metric_win[mine], confidence, seed=seed) if llm else None
        rows.append({"judge": name, "judgments": int((mine & ok).sum()), "failed": int((mine & ~ok).sum()),
                     "consistency": share, "consistency_n": pairs,
                     "longer_won": wins / decisive if decisive else None, "longer_won_n": decisive,
                     **{f"agreement_{k}": v for k, v in (agree or {"share": None, "n": 0}).items()}})
    return pd.DataFrame(rows)


def ratings_by_judge(judgments: pd.DataFrame, kinds: Mapping[str, str], cfg: RatingConfig) -> pd.DataFrame:
    """tasks.rating.rate.rate on each judge's own judgments, with a `judge` column (the pooled ratings fit them all at once)."""

    names = judgments["judge"].map(judge_name)
    frames = []
    for name in dict.fromkeys(names):
        try:
            frames.append(rate(judgments[(names == name).to_numpy()], kinds, cfg).assign(judge=name))
        except UserError:  # this judge rated fewer than two contenders: nothing to fit, the card says how many it judged
            continue
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _pct(x: float | None) -> str:
    """A share as a whole percentage, or a dash."""
    return "-" if x is None or pd.isna(x) else f"{x:.0%}"


def _agreement_text(share: float | None, low: float | None, high: float | None, n: int, level: float) -> str:
    """'78% (95% CI 70-85%, 120)' or 'not measured'."""
    if not n:
        return "not measured"
    return f"{share:.0%} ({level:.0%} CI {low:.0%}-{high:.0%}, {n})"


def card_section(judgments: pd.DataFrame, examples: Mapping[str, list[Example]], metrics: Mapping[str, str],
                 outputs: Mapping[str, Mapping[str, pd.DataFrame]], confidence: float = 0.95, seed: int = 0,
                 pooled: pd.DataFrame | None = None, by_judge: pd.DataFrame | None = None,
                 threshold: float = MIN_AGREEMENT, repeats: pd.DataFrame | None = None) -> tuple[list[str], list[str]]:
    """(the report's judge card in Markdown, its warning lines); nothing when no LLM judge took part. `repeats`: the
    run's repeated judgments (tasks/judge/repeat.py), shown as the card's repeatability."""
    if len(judgments) == 0 or "judge" not in judgments.columns or not llm_mask(judgments).any():
        return [], []
    win = metric_winners(judgments, examples, metrics, outputs)
    card = card_table(judgments, output_lengths(outputs), win, confidence, seed)
    total = max(int(card["judgments"].sum()), 1)
    shown = pd.DataFrame({
        "judge": card["judge"], "judgments": card["judgments"], "share": (card["judgments"] / total).map(_pct),
        "position consistency (pairs)": [f"{_pct(s)} ({n})" if n else "-" for s, n in
                                         zip(card["consistency"], card["consistency_n"])],
        "longer output won (decisive)": [f"{_pct(s)} ({n})" if n else "-" for s, n in
                                         zip(card["longer_won"], card["longer_won_n"])],
        "agrees with ground truth (judgments)": [
            "-" if not r["judge"].startswith(LLM_PREFIX) else
            _agreement_text(r.get("agreement_share"), r.get("agreement_low"), r.get("agreement_high"),
                            int(r["agreement_n"]), confidence) for _, r in card.iterrows()],
    })
    lines = ["## Judge card", "",
             "Can the judge be believed? *Position consistency*: of the comparisons shown in both orders, the share "
             "whose two verdicts name the same winner. *Longer output won*: of the decisive verdicts, the share that "
             "went to the longer output (near 50% is no length bias). *Agrees with ground truth*: on rows with "
             "`expected`, where the dataset's metric scores the two outputs differently, the share of verdicts naming "
             f"the metric's winner (a tie counts as not agreeing), with a {confidence:.0%} bootstrap interval over "
             "examples. Each judge's judgments and their share of all used are counted here.", "", md_table(shown), ""]
    per_ds = agreement_by_dataset(judgments, win, confidence, seed)
    lines += [f"- **{r.judge}** on **{r.dataset}**: names the metric's winner in {r.share:.0%} of {int(r.n)} "
              f"judgments on {r.examples} examples ({confidence:.0%} CI {r.low:.0%}-{r.high:.0%}); ties there "
              f"{_pct(r.ties)}." for r in per_ds.itertuples(index=False) if r.n]
    llm = pd.Series(llm_mask(judgments), index=judgments.index)
    if not (win.isin(["a", "b"]) & llm).any():
        why = ("no dataset's test rows have `expected`" if not win.notna().any() else
               "the metric decided every comparison its ground truth separates (combined judge), so the LLM judged "
               "only where it ties" if (~llm & win.isin(["a", "b"])).any() else
               "ground truth separates none of the outputs the LLM judged")
        lines.append(f"- Agreement with ground truth is not measured: {why}.")
    warnings = [f"judge {r.judge} agrees with ground truth on only {r.share:.0%} of {int(r.n)} judgments on "
                f"{r.dataset} (below {threshold:.0%}; {confidence:.0%} CI {r.low:.0%}-{r.high:.0%}): check its "
                "prompt, reference setting and model before trusting its ranking"
                for r in per_ds.itertuples(index=False) if r.n and r.share < threshold]
    lines += ["", *[f"**Warning:** {w}." for w in warnings]] if warnings else []
    if repeats is not None:
        lines += ["", *repeat_lines(judgments, repeats, confidence, seed)]
    if by_judge is not None and len(by_judge) and pooled is not None:
        lines += ["", *_per_judge_lines(pooled, by_judge)]
    return lines + [""], warnings


def _move_text(moves: pd.DataFrame) -> str:
    """The largest win-rate move: 'hermes 61% -> 65%, +3.8 points = 1.1 SE (18 judgments)', or a dash."""
    if len(moves) == 0:
        return "-"
    m = moves.iloc[0]
    return (f"{m['contender']} {m['first']:.0%} -> {m['second']:.0%}, {100 * m['move']:+.1f} points = "
            f"{m['move_se']:.1f} SE ({int(m['n'])} judgments)")


def repeat_lines(judgments: pd.DataFrame, repeats: pd.DataFrame, confidence: float = 0.95, seed: int = 0) -> list[str]:
    """The card's repeatability: per judge, how many judgments were asked again, how often the two verdicts agree, and
    the largest move of a contender's win rate on them; the metric judge is deterministic and is not repeated."""
    rows, notes = [], []
    for name in dict.fromkeys(judgments["judge"].map(judge_name)):
        if not name.startswith(LLM_PREFIX):
            rows.append({"judge": name, "repeated": "-", "verdicts agree": "deterministic: the same two outputs always "
                         "get the same verdict, so nothing is repeated", "largest win-rate move": "0 (none possible)"})
            continue
        mine = repeats[repeats["judge"] == name] if len(repeats) else repeats
        made = len(eligible(judgments, name))
        a = repeat_agreement(mine, confidence, seed=seed)
        rows.append({"judge": name, "repeated": f"{a['n']} of {made} ({a['n'] / made:.0%})" if made else "0",
                     "verdicts agree": _agreement_text(a["share"], a["low"], a["high"], a["n"], confidence),
                     "largest win-rate move": _move_text(win_rate_moves(mine))})
        unsent = int((mine["error"] == NOT_SENT).sum()) if len(mine) else 0
        failed = int((~ok_mask(mine)).sum()) - unsent if len(mine) else 0
        if unsent or failed:
            notes.append(f"- **{name}**: of {len(mine)} repeats planned, {unsent} not sent (budget.max_usd) and "
                         f"{failed} failed; they are asked on the next run.")
        elif not len(mine) and made:
            notes.append(f"- **{name}**: not repeated (judge.repeat_share and judge.repeat_min are 0).")
    return ["### Repeatability", "",
            "A fixed sample of each LLM judge's judgments (`judge.repeat_share` of those it made by a call, at least "
            "`judge.repeat_min`; chosen by a hash of each judgment's key, so every run re-asks the same ones) was "
            "asked a second time; the second verdicts are not rated (`judge_repeats.parquet`). *Verdicts agree*: the "
            f"share naming the same winner both times (a tie as a winner of its own), with a {confidence:.0%} "
            "bootstrap interval over examples. *Largest win-rate move*: how far a contender's win "
            "rate on the sample moved from the first verdicts to the second (a tie half a win), in points and in "
            f"standard errors of that win rate, sqrt(p(1-p)/n). {ALPACA_EVAL_RERUN}", "",
            md_table(pd.DataFrame(rows)), *([""] + notes if notes else [])]


def _per_judge_lines(pooled: pd.DataFrame, by_judge: pd.DataFrame) -> list[str]:
    """Pooled ratings (one fit over every judge's judgments) beside each judge's own, all datasets pooled."""
    def cell(r: pd.Series) -> str:
        ci = _interval_text(r["ci_low"], r["ci_high"])
        return _rating_text(r["rating"]) + (f" ({ci})" if ci else "")

    top = pooled[pooled["scope"] == "overall"].sort_values("rank")
    table = pd.DataFrame({"contender": top["contender"], "pooled": [cell(r) for _, r in top.iterrows()]})
    for name, part in by_judge[by_judge["scope"] == "overall"].groupby("judge", sort=False):
        own = {r["contender"]: cell(r) for _, r in part.iterrows()}
        table[name] = table["contender"].map(lambda c: own.get(c, "-"))
    return ["### Ratings per judge", "",
            "Pooled: one Bradley-Terry fit over all judges' judgments (the ranking above); each judge: its own "
            "judgments alone (`ratings_by_judge.parquet`, column `judge`).", "", md_table(table)]
