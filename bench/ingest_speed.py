"""The ingest's speed and memory on a synthetic traffic log: rows per second and peak RSS for N logged requests.

    python bench/ingest_speed.py [--rows 100000] [--group-by metadata.thread_id]

The log is tests/ingest_traffic.py's (25% exact and 10% near duplicates, threads of 2-5 turns, 3% errors and cut
answers, e-mails, phones and card numbers, one static system prompt). Each run is a fresh process, so its peak RSS
(ru_maxrss of the child) is its own. Baseline in the same conditions: the floor any ingest pays, reading the file and
parsing every line's JSON. Prints the machine, the table, and the counts the ingest found against the log's truth.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._machine import header, table  # noqa: E402
from tests.ingest_traffic import write_traffic  # noqa: E402

FLOOR = """
import json, sys
n = 0
with open(sys.argv[1], "rb") as fh:
    for line in fh:
        try:
            json.loads(line)
        except ValueError:
            pass
        n += 1
"""
INGEST = """
import sys
from tasks.ingest.config import IngestConfig
from tasks.ingest.ingest import run_ingest
run_ingest(IngestConfig(source=sys.argv[1], out=sys.argv[2], group_by=sys.argv[3] or None))
"""


def child(code: str, *args: str) -> tuple[float, float]:
    """(wall s, peak RSS MB) of a fresh Python process running `code` with `args`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; the largest child so far
    if peak <= before:
        print("note: this child's peak RSS was under an earlier child's; the figure shown is that earlier peak")
    return wall, peak / 1024


def main() -> None:
    """Write the log, time the floor and the ingest, print the table and the counts."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000, help="logged requests (default 100,000; try 1000000)")
    ap.add_argument("--group-by", default="metadata.thread_id", help="'' for near-duplicate clusters")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        log = Path(tmp) / "traffic.jsonl"
        start = time.perf_counter()
        truth = write_traffic(log, args.rows)
        made = time.perf_counter() - start
        mb = log.stat().st_size / 1e6
        floor = child(FLOOR, str(log))  # first: the smaller process, so ru_maxrss then rises to the ingest's
        ingest = child(INGEST, str(log), str(Path(tmp) / "out"), args.group_by)
        counts = json.loads((Path(tmp) / "out" / "ingest.json").read_text())["counts"]
    print(header())
    print(f"log: {args.rows:,} requests, {mb:.0f} MB, written in {made:.1f} s; grouped by {args.group_by or 'cluster'}")
    rows = [{"run": name, "wall s": f"{wall:.1f}", "rows/s": f"{args.rows / wall:,.0f}", "MB/s": f"{mb / wall:.1f}",
             "peak RSS MB": f"{rss:.0f}"}
            for name, (wall, rss) in (("read + parse JSON (floor)", floor), ("ingest (every step)", ingest))]
    print(table(rows, ["run", "wall s", "rows/s", "MB/s", "peak RSS MB"]))
    print(f"ratio (ingest / floor wall): {ingest[0] / floor[0]:.1f}x")
    found = (counts["exact_duplicates"], counts["near_duplicates"], counts["rows"])
    ok = found == (truth.exact, truth.near, truth.rows)
    print(f"found {counts['exact_duplicates']:,} exact and {counts['near_duplicates']:,} near duplicates, "
          f"{counts['rows']:,} rows written, {sum(counts['pii_found'].values()):,} finds of personal data: "
          f"{'equal to' if ok else 'NOT equal to'} the log's truth")


if __name__ == "__main__":
    main()
