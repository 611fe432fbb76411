"""Re-rate existing judgments without touching any model: python -m flows.rank --judgments PATH... --out DIR."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from flows.command import Parser, one_line_errors
from tasks.config.schema import RatingConfig
from tasks.core.errors import UserError
from tasks.core.tables import text_table
from tasks.rating.rate import rate
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


def _read(files: list[Path], need: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read and concatenate the judgment files, naming the file that is not Parquet or lacks a needed column."""
    frames = []
    for f in files:
        try:
            frames.append(pd.read_parquet(f))
        except Exception as exc:  # pyarrow raises several types for a non-Parquet file
            raise UserError(f"{f}: not a readable Parquet file ({type(exc).__name__})") from exc
        missing = [c for c in need if c not in frames[-1].columns]
        if missing:
            raise UserError(f"{f}: --length-control needs the outputs' lengths, but it has no {', '.join(missing)} "
                            "column (a run's judgments.parquet carries len_a and len_b, in characters, from this "
                            "version on)")
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


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
        judgments = _read(_files(args.judgments), ("len_a", "len_b") if args.length_control else ())
        ratings = rate(judgments, _kinds(judgments), cfg)
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
