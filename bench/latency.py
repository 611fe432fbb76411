"""The demo's per-request latency distribution, as generation records it (outputs' ttft_s, latency_s, tokens_per_s).

    python bench/latency.py [--store DIR]      # a store a search has run in; default: run the demo in a fresh one

Per dataset, over every fine-tune's test outputs: time to first token, each request's own time to its last token
(median, 95th percentile, max), the batches' tokens/s, and how many answers ended at an end-of-turn token.
Measured, not derived: latency_s is each row's own clock reading, tokens/s its batch's tokens over its batch's time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._machine import header  # noqa: E402
from tasks.core.tables import md_table


def distribution(store: Path) -> pd.DataFrame:
    """Per dataset: requests, time to first token, latency quantiles, batch tokens/s, share stopped."""
    frames = [pd.read_parquet(p) for p in (store / "outputs").glob("*.parquet")]
    df = pd.concat([f for f in frames if "batch_s" in f.columns], ignore_index=True)
    g = df.groupby("dataset")
    return pd.DataFrame({
        "requests": g.size(), "batch size": g["batch_size"].max(), "ttft p50 s": g["ttft_s"].median(),
        "latency p50 s": g["latency_s"].median(), "latency p95 s": g["latency_s"].quantile(0.95),
        "latency max s": g["latency_s"].max(), "tokens/s p50 (batch)": g["tokens_per_s"].median(),
        "tokens p50": g["completion_tokens"].median(), "stopped": g["finish_reason"].apply(lambda s: f"{(s == 'stop').mean():.0%}"),
    }).round(3).reset_index()


def main() -> None:
    """Run the demo unless a store is given, then print the distribution."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None, help="a store a search has run in")
    args = ap.parse_args()
    store = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="latency-")) / "store"
    if not args.store:
        subprocess.run([sys.executable, "-m", "flows.search", "--store", str(store)], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    print(header())
    print(md_table(distribution(store)))


if __name__ == "__main__":
    main()
