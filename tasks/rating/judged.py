"""Judgments reduced to integer codes for the rating solver (tasks/rating/rate.py): checked, errors set aside, pairs
canonicalised, and binned into (dataset, outcome, i, j) counts."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tasks.config.schema import RatingConfig
from tasks.core.errors import UserError, first_line

REQUIRED_COLUMNS = ("dataset", "example_id", "contender_a", "contender_b", "winner")
WINNERS = ("a", "b", "tie")


@dataclass(frozen=True)
class Judged:
    """Judgments reduced to integer codes: one entry per usable judgment, pairs canonicalised to i < j."""

    names: np.ndarray  # contender names, sorted
    datasets: np.ndarray  # dataset names, sorted
    ds: np.ndarray  # dataset code per judgment
    ex: np.ndarray  # example code per judgment; examples are numbered dataset by dataset
    ex_ds: np.ndarray  # dataset code per example
    i: np.ndarray  # lower contender code
    j: np.ndarray  # higher contender code
    out: np.ndarray  # 0: i won, 1: j won, 2: tie
    w: np.ndarray  # weight of the verdict (strong_weight for strength 2)
    failed: pd.DataFrame  # the judgments dropped for an error (dataset, contenders, error), to report who lost all
    x: np.ndarray | None = None  # rating.length_control: (len_i - len_j) / (len_i + len_j) per judgment, else None


def _check_columns(judgments: pd.DataFrame, required: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    """Raise one line naming the missing judgment columns."""
    if not isinstance(judgments, pd.DataFrame):
        raise UserError(f"judgments must be a pandas DataFrame, got {type(judgments).__name__}")
    missing = [c for c in required if c not in judgments.columns]
    if missing:
        raise UserError(f"judgments are missing column(s): {', '.join(missing)} (need {', '.join(required)})")


def usable(judgments: pd.DataFrame) -> pd.DataFrame:
    """Drop judgments with a non-empty error; check contenders and winner values."""
    return _split(judgments)[0]


def _split(judgments: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(usable judgments, judgments with a non-empty error); checks contenders and winner values."""
    _check_columns(judgments)
    df = judgments
    dropped = df.iloc[:0]
    if "error" in df.columns:
        err = df["error"]
        failed = err.notna().to_numpy().copy()
        if failed.any():
            failed[failed] = err[failed].astype(str).str.len().to_numpy() > 0
            dropped = df.loc[failed, ["dataset", "contender_a", "contender_b", "error"]]
            df = df.loc[~failed]
    if df["contender_a"].isna().any() or df["contender_b"].isna().any():
        raise UserError("judgments have empty contender_a/contender_b values")
    winner = df["winner"]
    bad = ~winner.isin(WINNERS).to_numpy()
    if bad.any():
        shown = sorted({str(v) for v in pd.unique(winner[bad])})[:5]
        raise UserError(f"judgments have unknown winner value(s) {', '.join(map(repr, shown))} (allowed: a, b, tie)")
    return df, dropped


def common_error(failed: pd.DataFrame) -> str:
    """The most frequent error of failed judgments, its first line, e.g. 'timeout'."""
    return first_line(Exception(str(failed["error"].astype(str).value_counts().index[0])))[:120]


def _codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of a column and its distinct values (factorize: hashing, no per-row Python)."""
    codes, uniques = pd.factorize(values)
    return codes.astype(np.int64, copy=False), np.asarray(uniques, dtype=object)


def _dense_rank(key: np.ndarray, stride: int, n_datasets: int) -> tuple[np.ndarray, np.ndarray]:
    """Each key's rank among the distinct keys (dataset * stride + example code, the example code -1 where missing),
    as pd.factorize(sort=True) numbers them, and each rank's dataset. By marking the used keys in an array of all
    possible keys where that is at most 4 per judgment: factorize's hash table of 5M keys peaked ~300 MB."""
    if n_datasets * stride + 1 > 4 * max(len(key), 1):
        codes, uniq = pd.factorize(key, sort=True)
        return codes.astype(np.int64, copy=False), (np.asarray(uniq) // stride).astype(np.int64)
    used = np.zeros(n_datasets * stride + 1, dtype=bool)
    used[key + 1] = True  # + 1: a missing example's code is -1
    rank = np.cumsum(used) - 1
    uniq = np.flatnonzero(used) - 1
    return rank[key + 1], uniq // stride


def prepare_judgments(judgments: pd.DataFrame, cfg: RatingConfig) -> Judged:
    """Validate the judgments and encode them as integer arrays; self-comparisons are dropped.

    Each per-judgment temporary is let go once used (`del`): at 5M judgments each is 40 MB, and holding them all to the
    end made this the run's peak (flows.rank: 2.2 GB before, docs/judging.md).
    """
    df, failed = _split(judgments)
    ca, ua = _codes(df["contender_a"])
    cb, ub = _codes(df["contender_b"])
    names = np.array(sorted({str(v) for v in ua} | {str(v) for v in ub}), dtype=object)
    if len(names) < 2:
        found = ", ".join(map(str, names)) or "none"
        why = f"; {len(failed)} judgments with an error were dropped ({common_error(failed)})" if len(failed) else ""
        raise UserError(f"judgments compare fewer than two contenders (found: {found}){why}; need at least two to rate")
    pos = {n: k for k, n in enumerate(names)}
    a = np.array([pos[str(n)] for n in ua], dtype=np.int64)[ca]
    b = np.array([pos[str(n)] for n in ub], dtype=np.int64)[cb]
    del ca, cb
    ds_raw, ds_names = _codes(df["dataset"])
    ds_order = np.argsort([str(v) for v in ds_names], kind="stable")
    ds = np.argsort(ds_order)[ds_raw]  # datasets numbered in sorted name order
    del ds_raw
    datasets = np.array([str(ds_names[k]) for k in ds_order], dtype=object)
    # Examples are identified within their dataset; numbering by (dataset, example) keeps each dataset's
    # examples contiguous so the bootstrap can resample them dataset by dataset.
    ex_local, _ = _codes(df["example_id"])
    stride = int(ex_local.max(initial=0)) + 1
    ex, ex_ds = _dense_rank(ds * stride + ex_local, stride, len(datasets))
    del ex_local
    win_codes, win_names = _codes(df["winner"])
    out_ab = np.array([WINNERS.index(str(v)) for v in win_names], dtype=np.int64)[win_codes]
    del win_codes
    keep = a != b
    # Canonical order i < j: when a > b the verdict flips (a win for a is a win for the higher code).
    swap = a > b
    i, j = np.where(swap, b, a), np.where(swap, a, b)
    del a, b
    out = np.where(swap & (out_ab < 2), 1 - out_ab, out_ab)
    del out_ab
    w = np.ones(len(df))
    if "strength" in df.columns:
        strong = (pd.to_numeric(df["strength"], errors="coerce").to_numpy() == 2) & (out < 2)
        w[strong] = cfg.strong_weight
    x = np.where(swap, -1.0, 1.0) * length_difference(df) if cfg.length_control else None
    if not keep.all():
        ds, ex, i, j, out, w = ds[keep], ex[keep], i[keep], j[keep], out[keep], w[keep]
        x = x[keep] if x is not None else None
    return Judged(names, datasets, ds, ex.astype(np.int64), ex_ds, i, j, out, w, failed, x)


LENGTH_COLUMNS = ("len_a", "len_b")


def length_difference(df: pd.DataFrame) -> np.ndarray:
    """(len_a - len_b) / (len_a + len_b) per judgment, from the output lengths in characters (0 when both are empty).

    The normalised difference of Arena-Hard's style control: -1..1, the same for 2,000 vs 1,000 characters as for
    200 vs 100 (1/3: A twice as long).
    """
    missing = [c for c in LENGTH_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"rating.length_control needs the outputs' lengths, but the judgments have no {', '.join(missing)} "
                        "column (a run's judgments.parquet carries len_a and len_b, in characters, from this version on)")
    la, lb = (pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float) for c in LENGTH_COLUMNS)
    bad = ~(np.isfinite(la) & np.isfinite(lb)) | (la < 0) | (lb < 0)
    if bad.any():
        raise UserError(f"rating.length_control: {int(bad.sum())} judgments have no usable len_a/len_b (empty or "
                        "negative); every usable judgment needs both output lengths")
    total = la + lb
    return np.where(total > 0, (la - lb) / np.maximum(total, 1.0), 0.0)


def outcome_counts(p: Judged, weights: np.ndarray | None) -> np.ndarray:
    """Dense (datasets, 3, K, K) counts: [d, 0, i, j] i beat j, [d, 1, i, j] j beat i, [d, 2, i, j] ties (i < j)."""
    k, nd = len(p.names), len(p.datasets)
    flat = ((p.ds * 3 + p.out) * k + p.i) * k + p.j
    return np.bincount(flat, weights=weights, minlength=nd * 3 * k * k).reshape(nd, 3, k, k)


def check_anchor(p: Judged, cfg: RatingConfig) -> None:
    """A named anchor must be a contender of the judgments: a misspelt one would silently pin the mean instead."""
    if cfg.anchor is None:
        return
    known = sorted({str(v) for v in p.names} | {str(v) for c in ("contender_a", "contender_b") for v in p.failed[c]})
    if cfg.anchor in known:
        return
    close = difflib.get_close_matches(cfg.anchor, known, n=1, cutoff=0.5)
    listed = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserError(f"rating.anchor {cfg.anchor!r} is not a contender in the judgments (contenders: {listed}){hint}")


def with_lengths(judgments: pd.DataFrame, outputs: dict[str, dict[str, pd.DataFrame]]) -> pd.DataFrame:
    """The judgments with len_a, len_b: characters of each judged output (NaN where it has none), from the outputs
    tables (dataset -> contender -> table), so rating.length_control and `flows.rank --length-control` can use them."""
    parts = [pd.DataFrame({"dataset": ds, "contender": c, "example_id": df["example_id"].astype(str),
                           "chars": [len(v) if isinstance(v, str) else np.nan for v in df["output"]]})
             for ds, tables in outputs.items() for c, df in tables.items()]
    if not parts or not len(judgments):
        return judgments.assign(len_a=np.nan, len_b=np.nan)
    chars = pd.concat(parts).drop_duplicates(["dataset", "contender", "example_id"])
    chars = chars.set_index(["dataset", "contender", "example_id"])["chars"]
    ids = judgments["example_id"].astype(str)
    found = {f"len_{s}": chars.reindex(pd.MultiIndex.from_arrays(
        [judgments["dataset"].astype(str), judgments[f"contender_{s}"].astype(str), ids])).to_numpy() for s in "ab"}
    return judgments.assign(**found)


def win_matrix(judgments: pd.DataFrame, scope: str | None = None) -> pd.DataFrame:
    """Row contender's win rate against the column contender (ties as half; NaN where never compared)."""
    df = usable(judgments)
    if scope not in (None, "overall"):
        df = df.loc[df["dataset"].astype(str) == scope]
    p = prepare_judgments(df, RatingConfig()) if len(df) else None
    if p is None:
        return pd.DataFrame()
    x = outcome_counts(p, None).sum(axis=0)
    wins = x[0] + x[1].T
    ties = x[2] + x[2].T
    n = wins + wins.T + ties
    with np.errstate(invalid="ignore", divide="ignore"):
        rate_ = np.where(n > 0, (wins + 0.5 * ties) / n, np.nan)
    names = [str(v) for v in p.names]
    return pd.DataFrame(rate_, index=pd.Index(names, name="contender"), columns=names)
