"""Re-rate existing judgments without touching any model: python -m flows.rank --judgments PATH... --out DIR."""

from __future__ import annotations

import argparse
import ctypes
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows.command import Parser, one_line_errors
from tasks.config.schema import RatingConfig
from tasks.core.errors import UserError
from tasks.core.tables import text_table
from tasks.rating.judged import prepare_judgments
from tasks.rating.rate import rate_judged
from tasks.report.report import ranking_rows, scale_lines
from tasks.store.store import Store


def _parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = Parser(prog="python -m flows.rank", description=__doc__)
    p.add_argument("--judgments", nargs="+", required=True, metavar="PATH", help="Parquet files or folders of them")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for ratings.parquet")
    p.add_argument("--anchor", default=None, help="contender pinned at --anchor-rating (default: the mean is pinned)")
    p.add_argument("--anchor-rating", type=float, default=1000.0, help="rating of the anchor (default 1000)")
    p.add_argument("--ties", choices=["davidson", "rao-kupper", "half"], default="davidson", help="tie model")
    p.add_argument("--ci", choices=["bootstrap", "fisher", "sandwich"], default="bootstrap",
                   help="interval method: bootstrap over examples, fisher, or sandwich (clustered by example)")
    p.add_argument("--rounds", type=int, default=200, help="bootstrap rounds (default 200)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--length-control", action="store_true",
                   help="control for output length (needs the len_a, len_b columns a run's judgments.parquet carries)")
    return p


def _files(paths: list[str]) -> list[Path]:
    """Expand folders to their *.parquet files (recursively); every path must exist."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            inside = sorted(path.rglob("*.parquet"))
            if not inside:
                raise UserError(f"{raw}: folder holds no *.parquet files")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{raw}: no such file or folder")
    return found


# The columns rating reads (rate() and the kinds), read alone: a run's file also carries order, judge, cost_usd and
# more. Their strings of few distinct values (contenders, dataset, winner, kinds, error) stay Arrow dictionaries,
# pandas categoricals, and example ids become integer codes in Arrow: 5M judgments of 200 contenders never become 25M
# Python strings, and a column costs 1-8 bytes a judgment (see docs/judging.md for the measured memory).
COLUMNS = ("dataset", "example_id", "contender_a", "contender_b", "winner", "strength", "error", "kind_a", "kind_b")
LENGTHS = ("len_a", "len_b")


def _read(files: list[Path], need: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read and concatenate the judgment files' rating columns (and `need`), naming the file that is not Parquet or
    lacks a needed column."""
    tables = []
    for f in files:
        try:
            schema = pq.read_schema(f)
            cols = [c for c in COLUMNS + need if c in schema.names]
            strings = [c for c in cols if c != "example_id" and _text(schema.field(c).type)]
            if not [c for c in need if c not in schema.names]:
                tables.append(pq.ParquetFile(f, read_dictionary=strings).read(columns=cols))
        except Exception as exc:  # pyarrow raises several types for a non-Parquet file
            raise UserError(f"{f}: not a readable Parquet file ({type(exc).__name__})") from exc
        missing = [c for c in need if c not in schema.names]
        if missing:
            raise UserError(f"{f}: --length-control needs the outputs' lengths, but it has no {', '.join(missing)} "
                            "column (a run's judgments.parquet carries len_a and len_b, in characters, from this "
                            "version on)")
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        # files whose columns disagree in type (an int example_id in one, text in another): pandas' concat, as before
        return pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    return _frame(table)


def _text(kind: pa.DataType) -> bool:
    """Is a column of this Arrow type text (pandas writes large_string)?"""
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _frame(table: pa.Table) -> pd.DataFrame:
    """The table as pandas, text example ids as integer codes in order of first appearance: the same example numbering
    (tasks.rating.judged factorizes them in that order) without a Python string per row; a missing id stays missing."""
    if "example_id" not in table.column_names:
        return table.to_pandas()
    ids = table["example_id"]
    if pa.types.is_dictionary(ids.type):
        ids = ids.cast(ids.type.value_type)
    if not (_text(ids.type) or pa.types.is_binary(ids.type)):
        return table.to_pandas()
    codes = _first_seen(ids.combine_chunks())
    frame = table.drop_columns(["example_id"]).to_pandas()
    frame["example_id"] = codes
    return frame


def _first_seen(ids: pa.Array) -> np.ndarray:
    """Codes 0, 1, ... of the values in order of first appearance (as pandas.factorize numbers them), NaN where
    missing, by a stable sort: Arrow's dictionary_encode, a hash table, peaked 700 MB over the table for 5M distinct
    ids, this 300 MB (and 1 s)."""
    order = pc.array_sort_indices(ids).to_numpy()  # stable; missing ids last
    order = order[: len(ids) - ids.null_count]
    ordered = ids.take(pa.array(order))
    new = np.ones(len(order), dtype=bool)  # a sorted position where a new value starts
    new[1:] = pc.not_equal(ordered[1:], ordered[:-1]).to_numpy(zero_copy_only=False)
    del ordered
    first = order[new]  # each value's first position: the stable sort puts it first among its equals
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    codes = np.full(len(ids), np.nan)
    codes[order] = rank[np.cumsum(new) - 1]
    return codes


def _kinds(judgments: pd.DataFrame) -> dict[str, str]:
    """Contender -> kind from kind_a/kind_b columns when present (otherwise every contender is a candidate)."""
    kinds: dict[str, str] = {}
    for side in ("a", "b"):
        col = f"kind_{side}"
        if col in judgments.columns:
            pairs = judgments[[f"contender_{side}", col]].dropna().drop_duplicates()
            for c, k in zip(pairs.iloc[:, 0].astype(str), pairs.iloc[:, 1].astype(str)):
                # A specific kind (reference, merge, baseline) wins over the default 'candidate'.
                if kinds.get(c, "candidate") == "candidate":
                    kinds[c] = k
    return kinds


def main(argv: list[str] | None = None) -> int:
    """Rate the judgments, write DIR/ratings.parquet, print the overall ranking and the output path."""
    def rank() -> int:
        """Parse, rate, write, print."""
        args = _parser().parse_args(argv)
        cfg = RatingConfig(
            anchor=args.anchor, anchor_rating=args.anchor_rating, ties=args.ties, ci=args.ci,
            bootstrap_rounds=max(2, args.rounds), seed=args.seed, length_control=args.length_control,
        )
        # The system allocator gives freed memory back: Arrow's default pool (mimalloc) kept 600 MB of reading 5M
        # judgments to the end of the run. This is a process of its own.
        pa.set_memory_pool(pa.system_memory_pool())
        judgments = _read(_files(args.judgments), ("len_a", "len_b") if args.length_control else ())
        _trim()
        kinds = _kinds(judgments)
        # encoded, the frame goes before the fit (rate() would hold it to the end): 5M judgments are then 56 bytes
        # each (tasks.rating.judged.Judged) and what the fit adds
        judged = prepare_judgments(judgments, cfg)
        del judgments
        _trim()
        ratings = rate_judged(judged, kinds, cfg)[0]
        target = Store(args.out).write_parquet("ratings.parquet", ratings)
        print(text_table(ranking_rows(ratings, confidence=cfg.confidence)))
        note = _top_note(ratings, cfg.confidence)
        if note:
            print(note)
        for line in scale_lines(ratings, cfg.ties):
            if line:
                print(f"note: {line}")
        print(target)
        return 0

    return one_line_errors(rank, os_error_code=2)


def _trim() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim; elsewhere nothing): reading and encoding
    5M judgments leave 200-500 MB of freed buffers in the heap, which would count in the peaks that follow."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _top_note(ratings: pd.DataFrame, confidence: float) -> str:
    """A line when the pooled top contender is not clear of the second: not separated, or never compared with it."""
    pooled = ratings[(ratings["scope"] == "overall") & ratings["rating"].notna()].sort_values("rank")
    if len(pooled) < 2:
        return ""
    top, second = pooled.iloc[0], pooled.iloc[1]
    if "group" in pooled.columns and top["group"] != second["group"]:
        return (f"note: the top contender is not comparable with the second ({second['contender']}): they were never "
                "judged against each other, directly or through common opponents")
    if not bool(top["separated_from_next"]):
        return f"note: the top contender is not separated from the second at {confidence:.0%}"
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
