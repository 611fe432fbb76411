"""The judge card: can the judge be believed? Position consistency, length bias, agreement with ground truth, and
repeatability.

- Position consistency: of the comparisons an LLM judge saw in both orders, the share whose two verdicts name the
  same winner (from the verdicts as given, before disagreements were settled as ties).
- Longer output won: of the decisive verdicts (no tie), the share that went to the longer output.
- Agreement with the metric: on rows with `expected`, where the dataset's metric scores the two outputs differently
  (ground truth separates them), the share of the LLM judge's verdicts naming the metric's winner (a tie counts as
  not agreeing), with a percentile bootstrap interval over examples: the judgments of one example (its pairs and
  both orders) rise and fall together, so resampling judgments one by one would make the interval too narrow.
- Repeatability: of a fixed sample of judgments asked a second time (tasks/judge/repeat.py), the share whose two
  verdicts agree, and how far each contender's win rate on the sample moved, in points and standard errors.
A leaf module (pandas, numpy, the prompt's verdict table), imported by the LLM judge; tasks.rating.rate only when the
ratings per judge are asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd

from tasks.judge.metrics import METRICS, metric_verdict
from tasks.judge.prompt import SHOWN

if TYPE_CHECKING:
    from tasks.data.load import Example

LLM_PREFIX = "openai:"  # the `judge` label of every LLM judgment (tasks.judge.prompt.judge_label)
MIN_AGREEMENT = 0.70  # below this share of agreement with ground truth, the report and the log warn
PAIR = ["dataset", "example_id", "contender_a", "contender_b"]


def judge_name(label: str) -> str:
    """The judge a `judge` label belongs to: `metric` for every metric:<name> label, the LLM label as it is."""
    return "metric" if str(label).startswith("metric:") else str(label)


def ok_mask(df: pd.DataFrame) -> np.ndarray:
    """Rows without an error."""
    if "error" not in df.columns:
        return np.ones(len(df), dtype=bool)
    return (df["error"].isna() | (df["error"].astype(str) == "")).to_numpy()


def llm_mask(df: pd.DataFrame) -> np.ndarray:
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


def judged_mask(df: pd.DataFrame) -> np.ndarray:
    """LLM rows without an error whose two outputs differed (identical outputs tie without a call)."""
    return asked_mask(df) & ok_mask(df)


def asked_mask(df: pd.DataFrame) -> np.ndarray:
    """LLM rows whose two outputs differed, so the judge was asked (an error included)."""
    keep = np.array(llm_mask(df), dtype=bool)  # a copy: the mask may be a read-only view
    if {"hash_first", "hash_second"} <= set(df.columns):
        keep &= (df["hash_first"].astype(str) != df["hash_second"].astype(str)).to_numpy()
    if "raw" in df.columns:
        keep &= (df["raw"].astype(str) != "identical outputs").to_numpy()
    return keep


def position_consistency(df: pd.DataFrame) -> tuple[float | None, int]:
    """(share of comparisons seen in both orders whose two verdicts agree, how many such comparisons)."""
    rows = df[judged_mask(df)].assign(shown=lambda d: shown_winner(d))
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
    rows = df[llm_mask(df) & ok_mask(df)]
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
    keep = llm_mask(df) & ok_mask(df) & metric_win.isin(["a", "b"]).to_numpy()
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


def agreement_by_dataset(judgments: pd.DataFrame, metric_win: pd.Series, confidence: float = 0.95,
                         seed: int = 0) -> pd.DataFrame:
    """Agreement with the metric per (LLM judge, dataset with `expected`): the card's per-dataset lines."""
    rows = []
    names = judgments["judge"].map(judge_name)
    measured = metric_win.notna().to_numpy()
    for (name, ds), idx in judgments[llm_mask(judgments) & measured].groupby([names, "dataset"], sort=True).groups.items():
        a = agreement(judgments.loc[idx], metric_win.loc[idx], confidence, seed=seed)
        rows.append({"judge": name, "dataset": ds, **a})
    return pd.DataFrame(rows, columns=["judge", "dataset", "share", "low", "high", "n", "examples", "ties"])


# ------------------------------------------------------------------------------------------ repeatability

ALPACA_EVAL_RERUN = ("For scale: the same judge re-run on AlpacaEval 2 moved a win rate 3.4 points, about 3 standard "
                     "errors.")


def _repeated(repeats: pd.DataFrame) -> pd.DataFrame:
    """Repeat rows with both verdicts (a repeat not sent, or failed, says nothing about the judge)."""
    ok = ok_mask(repeats) & repeats["winner_second"].isin(["a", "b", "tie"]).to_numpy()
    return repeats[ok & repeats["winner_first"].isin(["a", "b", "tie"]).to_numpy()]


def repeat_agreement(repeats: pd.DataFrame, confidence: float = 0.95, rounds: int = 2000,
                     seed: int = 0) -> dict[str, Any]:
    """Share of repeated judgments whose two verdicts name the same winner (a tie is a winner of its own), with a
    percentile bootstrap interval over examples (one example's judgments rise and fall together)."""
    rows = _repeated(repeats)
    if len(rows) == 0:
        return {"share": None, "low": None, "high": None, "n": 0}
    agree = (rows["winner_first"] == rows["winner_second"]).to_numpy(dtype=float)
    cluster, _ = pd.factorize(pd.MultiIndex.from_frame(rows[["dataset", "example_id"]].astype(str)))
    low, high = _cluster_interval(np.bincount(cluster, agree), np.bincount(cluster).astype(float), confidence,
                                  rounds, seed)
    return {"share": float(agree.mean()), "low": low, "high": high, "n": len(rows)}


def win_rate_moves(repeats: pd.DataFrame) -> pd.DataFrame:
    """Per contender, its win rate on the repeated judgments (a tie half a win) by the first and by the second
    verdicts, the move (second - first), and |move| in standard errors of a win rate over its n judgments,
    sqrt(p(1-p)/n) at the two rates' mean p (both rates 0, or both 1: no move, 0 SE)."""
    rows = _repeated(repeats)
    score = {"a": 1.0, "tie": 0.5, "b": 0.0}  # contender a's
    first, second = rows["winner_first"].map(score).astype(float), rows["winner_second"].map(score).astype(float)
    sides = [pd.DataFrame({"contender": rows["contender_a"], "first": first, "second": second}),
             pd.DataFrame({"contender": rows["contender_b"], "first": 1 - first, "second": 1 - second})]
    g = pd.concat(sides, ignore_index=True).groupby("contender", sort=True)
    out = g.agg(n=("first", "size"), first=("first", "mean"), second=("second", "mean")).reset_index()
    out["move"] = out["second"] - out["first"]
    p = (out["first"] + out["second"]) / 2
    out["se"] = np.sqrt(p * (1 - p) / out["n"])
    out["move_se"] = np.where(out["se"] > 0, out["move"].abs() / out["se"].where(out["se"] > 0, 1.0), 0.0)
    return out.sort_values(["move_se", "contender"], ascending=[False, True], ignore_index=True)


# ------------------------------------------------------------------------------------------ ratings per judge


# ------------------------------------------------------------------------------------------ the report's words


