"""Plain tables from DataFrames: aligned text for the terminal, Markdown for reports and model cards."""

from __future__ import annotations

import pandas as pd


def text_table(df: pd.DataFrame) -> str:
    """A DataFrame as a plain aligned text table for the terminal."""
    return df.to_string(index=False)


def md_table(df: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
