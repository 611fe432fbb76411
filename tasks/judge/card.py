"""The judge card: can the judge be believed? Position consistency, length bias and agreement with ground truth.

- Position consistency: of the comparisons an LLM judge saw in both orders, the share whose two verdicts name the
  same winner (from the verdicts as given, before disagreements were settled as ties).
- Longer output won: of the decisive verdicts (no tie), the share that went to the longer output.
- Agreement with the metric: on rows with `expected`, where the dataset's metric scores the two outputs differently
  (ground truth separates them), the share of the LLM judge's verdicts naming the metric's winner (a tie counts as
  not agreeing), with a percentile bootstrap interval over examples: the judgments of one example (its pairs and
  both orders) rise and fall together, so resampling judgments one by one would make the interval too narrow.
A leaf module (pandas, numpy, the prompt's verdict table), imported by the LLM judge; tasks.rating.rate only when the
ratings per judge are asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd

from tasks.judge.prompt import SHOWN
from tasks.judge.metrics import METRICS

if TYPE_CHECKING:
    from tasks.config.schema import RatingConfig
    from tasks.data.load import Example

LLM_PREFIX = "openai:"  # the `judge` label of every LLM judgment (tasks.judge.prompt.judge_label)
MIN_AGREEMENT = 0.70  # below this share of agreement with ground truth, the report and the log warn
PAIR = ["dataset", "example_id", "contender_a", "contender_b"]


def metric_verdict(score_a: float, score_b: float, strong_margin: float) -> tuple[str, int]:
    """(winner, strength) from two metric scores: equal scores tie; a gap >= strong_margin is a strong win."""
    if score_a == score_b:
        return "tie", 0
    winner = "a" if score_a > score_b else "b"
    return winner, 2 if abs(score_a - score_b) >= strong_margin else 1


def judge_name(label: str) -> str:
    """The judge a `judge` label belongs to: `metric` for every metric:<name> label, the LLM label as it is."""
    return "metric" if str(label).startswith("metric:") else str(label)


def _ok(df: pd.DataFrame) -> np.ndarray:
    """Rows without an error."""
    if "error" not in df.columns:
        return np.ones(len(df), dtype=bool)
    return (df["error"].isna() | (df["error"].astype(str) == "")).to_numpy()


def _llm(df: pd.DataFrame) -> np.ndarray:
    """Rows an LLM judge decided."""
    return df["judge"].astype(str).str.startswith(LLM_PREFIX).to_numpy() if "judge" in df.columns else np.zeros(len(df), bool)


def shown_winner(df: pd.DataFrame) -> pd.Series:
    """Each row's winner (a, b, tie) as its judge gave it: from `verdict` where there is one (the LLM's verdict before
    disagreeing orders were settled as ties), else `winner`."""
    winner = df["winner"].astype(object)
    if "verdict" not in df.columns:
        return winner
    verdict = df["verdict"]
    has = verdict.map(lambda v: isinstance(v, str) and v in SHOWN).to_numpy(dtype=bool)
    if not has.any():
        return winner
    who = verdict[has].map(lambda v: SHOWN[v][0]).to_numpy()
    a_first = (df.loc[has, "order"] == "ab").to_numpy()
    out = winner.copy()
    out[has] = np.where(who == "tie", "tie", np.where((who == "first") == a_first, "a", "b"))
    return out


def _judged(df: pd.DataFrame) -> np.ndarray:
    """LLM rows without an error whose two outputs differed (identical outputs tie without a call)."""
    keep = _llm(df) & _ok(df)
    if {"hash_first", "hash_second"} <= set(df.columns):
        keep &= (df["hash_first"].astype(str) != df["hash_second"].astype(str)).to_numpy()
    if "raw" in df.columns:
        keep &= (df["raw"].astype(str) != "identical outputs").to_numpy()
    return keep


def position_consistency(df: pd.DataFrame) -> tuple[float | None, int]:
    """(share of comparisons seen in both orders whose two verdicts agree, how many such comparisons)."""
    rows = df[_judged(df)].assign(shown=lambda d: shown_winner(d))
    if len(rows) == 0:
        return None, 0
    g = rows.groupby(["judge", *PAIR], sort=False).agg(orders=("order", "nunique"), n=("order", "size"),
                                                       winners=("shown", "nunique"))
    both = g[(g["orders"] == 2) & (g["n"] == 2)]
    if len(both) == 0:
        return None, 0
    return float((both["winners"] == 1).mean()), len(both)


def consistency_stats(df: pd.DataFrame) -> dict[str, Any]:
    """{'consistency': position consistency rounded to 3 places, or None} for a judge stage's row."""
    if len(df) == 0 or "judge" not in df.columns:
        return {}
    share, _ = position_consistency(df)
    return {"consistency": None if share is None else round(share, 3)}


def output_lengths(outputs: Mapping[str, Mapping[str, pd.DataFrame]]) -> dict[tuple[str, str, str], int]:
    """(dataset, example, contender) -> output length in characters; outputs indexed by example_id or with the column."""
    out = {}
    for ds, by_contender in outputs.items():
        for c, df in by_contender.items():
            ids = df["example_id"] if "example_id" in df.columns else df.index.to_series()
            for ex, text in zip(ids, df["output"]):
                out[ds, str(ex), c] = len("" if text is None else str(text))
    return out


def longer_won_counts(df: pd.DataFrame, lengths: Mapping[tuple[str, str, str], int]) -> tuple[int, int]:
    """(decisive LLM verdicts won by the longer output, decisive LLM verdicts between outputs of different lengths)."""
    rows = df[_llm(df) & _ok(df)]
    wins = n = 0
    cols = [*PAIR]
    for (ds, ex, ca, cb), w in zip(rows[cols].itertuples(index=False), shown_winner(rows)):
        la, lb = lengths.get((ds, str(ex), ca)), lengths.get((ds, str(ex), cb))
        if w == "tie" or la is None or lb is None or la == lb:
            continue
        n += 1
        wins += (la > lb) == (w == "a")
    return wins, n


def longer_won(df: pd.DataFrame, lengths: Mapping[tuple[str, str, str], int]) -> float | None:
    """Share of decisive LLM verdicts won by the longer output, rounded to 3 places (None: no such verdict)."""
    wins, n = longer_won_counts(df, lengths)
    return round(wins / n, 3) if n else None


def metric_winners(df: pd.DataFrame, examples: Mapping[str, list[Example]], metrics: Mapping[str, str],
                   outputs: Mapping[str, Mapping[str, pd.DataFrame]]) -> pd.Series:
    """Per judgment row, the metric judge's winner (a, b, tie) against the row's `expected`; None where the example
    has none, or an output is missing. Free: computed from the outputs, no call."""
    truth = {(ds, e.id): e.expected for ds, exs in examples.items() for e in exs if e.expected is not None}
    text: dict[tuple[str, str, str], tuple[str, bool]] = {}
    for ds, by_contender in outputs.items():
        for c, o in by_contender.items():
            ids = o["example_id"] if "example_id" in o.columns else o.index.to_series()
            errs = o["error"] if "error" in o.columns else [None] * len(o)
            for ex, t, err in zip(ids, o["output"], errs):
                text[ds, str(ex), c] = ("" if t is None else str(t), isinstance(err, str) and bool(err))
    scores: dict[tuple[str, str, str], float] = {}

    def score(ds: str, ex: str, c: str) -> float | None:
        if (ds, ex, c) not in scores:
            if (ds, ex, c) not in text:
                return None
            t, failed = text[ds, ex, c]
            scores[ds, ex, c] = 0.0 if failed else METRICS[metrics[ds]](t, truth[ds, ex])
        return scores[ds, ex, c]

    out = []
    for ds, ex, ca, cb in df[PAIR].itertuples(index=False):
        ex = str(ex)
        if (ds, ex) not in truth or ds not in metrics:
            out.append(None)
            continue
        sa, sb = score(ds, ex, ca), score(ds, ex, cb)
        out.append(None if sa is None or sb is None else metric_verdict(sa, sb, 1.0)[0])
    return pd.Series(out, index=df.index, dtype=object)


def agreement(df: pd.DataFrame, metric_win: pd.Series, confidence: float = 0.95, rounds: int = 2000,
              seed: int = 0) -> dict[str, Any]:
    """The LLM rows' agreement with the metric's winner where the metric separates the outputs: share, interval
    (percentile bootstrap over examples), judgments, examples and the LLM's tie share there."""
    keep = _llm(df) & _ok(df) & metric_win.isin(["a", "b"]).to_numpy()
    rows = df[keep]
    if len(rows) == 0:
        return {"share": None, "low": None, "high": None, "n": 0, "examples": 0, "ties": None}
    shown = shown_winner(rows).to_numpy()
    agree = (shown == metric_win[keep].to_numpy()).astype(float)
    cluster, _ = pd.factorize(pd.MultiIndex.from_frame(rows[["dataset", "example_id"]].astype(str)))
    hits, sizes = np.bincount(cluster, agree), np.bincount(cluster).astype(float)
    low, high = _cluster_interval(hits, sizes, confidence, rounds, seed)
    return {"share": float(agree.mean()), "low": low, "high": high, "n": int(len(rows)), "examples": int(len(sizes)),
            "ties": float((shown == "tie").mean())}


def _cluster_interval(hits: np.ndarray, sizes: np.ndarray, confidence: float, rounds: int,
                      seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(hits) / sum(sizes), resampling clusters (examples) with replacement."""
    rng = np.random.default_rng(seed)
    k = len(sizes)
    shares = []
    for start in range(0, rounds, 200):  # 200 replicates at a time: 200 x examples counts in memory
        n = min(200, rounds - start)
        counts = np.stack([np.bincount(rng.integers(0, k, k), minlength=k) for _ in range(n)]).astype(float)
        shares.append(counts @ hits / (counts @ sizes))
    s = np.concatenate(shares)
    tail = (1 - confidence) / 2
    return float(np.quantile(s, tail)), float(np.quantile(s, 1 - tail))


def card_table(judgments: pd.DataFrame, lengths: Mapping[tuple[str, str, str], int], metric_win: pd.Series,
               confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per judge: judgments used, consistency, longer-output wins, agreement with the metric (all datasets)."""
    names = judgments["judge"].map(judge_name)
    ok = _ok(judgments)
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


def agreement_by_dataset(judgments: pd.DataFrame, metric_win: pd.Series, confidence: float = 0.95,
                         seed: int = 0) -> pd.DataFrame:
    """Agreement with the metric per (LLM judge, dataset with `expected`): the card's per-dataset lines."""
    rows = []
    names = judgments["judge"].map(judge_name)
    measured = metric_win.notna().to_numpy()
    for (name, ds), idx in judgments[_llm(judgments) & measured].groupby([names, "dataset"], sort=True).groups.items():
        a = agreement(judgments.loc[idx], metric_win.loc[idx], confidence, seed=seed)
        rows.append({"judge": name, "dataset": ds, **a})
    return pd.DataFrame(rows, columns=["judge", "dataset", "share", "low", "high", "n", "examples", "ties"])


# ------------------------------------------------------------------------------------------ ratings per judge


def ratings_by_judge(judgments: pd.DataFrame, kinds: Mapping[str, str], cfg: RatingConfig) -> pd.DataFrame:
    """tasks.rating.rate.rate on each judge's own judgments, with a `judge` column (the pooled ratings fit them all at once)."""
    from tasks.core.errors import UserError
    from tasks.rating.rate import rate

    names = judgments["judge"].map(judge_name)
    frames = []
    for name in dict.fromkeys(names):
        try:
            frames.append(rate(judgments[(names == name).to_numpy()], kinds, cfg).assign(judge=name))
        except UserError:  # this judge rated fewer than two contenders: nothing to fit, the card says how many it judged
            continue
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ------------------------------------------------------------------------------------------ the report's words


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
                 threshold: float = MIN_AGREEMENT) -> tuple[list[str], list[str]]:
    """(the report's judge card in Markdown, its warning lines); nothing when no LLM judge took part."""
    from tasks.report.report import md_table

    if len(judgments) == 0 or "judge" not in judgments.columns or not _llm(judgments).any():
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
    llm = pd.Series(_llm(judgments), index=judgments.index)
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
    if by_judge is not None and len(by_judge) and pooled is not None:
        lines += ["", *_per_judge_lines(pooled, by_judge)]
    return lines + [""], warnings


def _per_judge_lines(pooled: pd.DataFrame, by_judge: pd.DataFrame) -> list[str]:
    """Pooled ratings (one fit over every judge's judgments) beside each judge's own, all datasets pooled."""
    from tasks.report.report import _interval_text, _rating_text, md_table

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
