"""`python -m flows.rank` end to end against FastChat's compute_bootstrap_bt, same judgments, same bootstrap rounds.

Both run as fresh Python processes timed from outside (start-up, imports, Parquet read and, for flows.rank, the
ratings Parquet written and the table printed, all included), one after the other, `--repeats` times, best taken.
FastChat gets its preferred input, a Parquet of battles (model_a, model_b, winner) of the same judgments, and its
own bootstrap (battles redrawn, a tie half a win, fits in a pool of os.cpu_count() processes; bench/fastchat_bt.py);
flows.rank its defaults (Davidson ties, bootstrap over examples).

python bench/rank_speed.py [--n 1000000] [--rounds 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def judgments(n: int, k: int, n_examples: int, seed: int = 0) -> pd.DataFrame:
    """n judgments among k contenders on n_examples examples of one dataset, ~30% ties, with the run's columns."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0.0, 1.0, k)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    d = theta[a] - theta[b]
    # Davidson with nu = 0.9: P(a) : P(b) : P(tie) = e^{d/2} : e^{-d/2} : 0.9, about 30% ties among close pairs.
    pa, pb, pt = np.exp(d / 2), np.exp(-d / 2), np.full(n, 0.9)
    u = rng.random(n) * (pa + pb + pt)
    winner = np.where(u < pa, "a", np.where(u < pa + pb, "b", "tie"))
    names = np.array([f"model-{x:03d}" for x in range(k)])
    return pd.DataFrame({
        # n_examples >= n: every judgment on its own prompt, as in Arena's battles (the bootstrap's largest case)
        "dataset": "chat", "example_id": (np.arange(n) if n_examples >= n else rng.integers(0, n_examples, n)).astype(str),
        "contender_a": names[a], "contender_b": names[b], "order": np.where(rng.random(n) < 0.5, "ab", "ba"),
        "winner": winner, "strength": np.where(winner == "tie", 0, 1), "judge": "gpt-4o-mini",
        "cost_usd": 0.0, "error": None, "kind_a": "candidate", "kind_b": "candidate",
    })


FASTCHAT = """
import sys, time
t0 = time.perf_counter()
import pandas as pd
sys.path.insert(0, {root!r})
from bench.fastchat_bt import compute_bootstrap_bt
battles = pd.read_parquet({path!r})
t1 = time.perf_counter()
boot = compute_bootstrap_bt(battles, {rounds})
t2 = time.perf_counter()
print(boot.median().sort_values(ascending=False).head(3).round(1).to_dict())
print(f"start+read {{t1 - t0:.2f}} s, bootstrap {{t2 - t1:.2f}} s", file=sys.stderr)
"""


def timed(cmd: list[str], root: Path = ROOT) -> tuple[float, str]:
    """Wall seconds of a child process run in `root` (must exit 0) and its stderr's last line."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed: {done.stderr[-2000:]}")
    return wall, (done.stderr.strip().splitlines() or [""])[-1]


def main() -> int:
    """Write the judgments, run both side by side, print one table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="judgments (default 1M)")
    ap.add_argument("--contenders", type=int, default=100, help="contenders (default 100)")
    ap.add_argument("--examples", type=int, default=0,
                    help="distinct examples (default 0: one per judgment, as Arena's battles each have their own prompt)")
    ap.add_argument("--rounds", type=int, default=100, help="bootstrap rounds of both (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved; the best is reported")
    ap.add_argument("--before", metavar="DIR", default=None,
                    help="another checkout (e.g. `git archive 4723ccf | tar -x -C DIR`) whose flows.rank runs too")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        df = judgments(a.n, a.contenders, a.examples or a.n)
        ours_in, theirs_in = Path(tmp) / "judgments.parquet", Path(tmp) / "battles.parquet"
        df.to_parquet(ours_in, index=False)
        from bench.fastchat_bt import battles_from_judgments

        battles_from_judgments(df).to_parquet(theirs_in, index=False)
        ties = float((df["winner"] == "tie").mean())
        df_examples = df["example_id"].nunique()
        runs: dict[str, list[float]] = {"python -m flows.rank": [], "FastChat compute_bootstrap_bt": []}
        rank = [sys.executable, "-m", "flows.rank", "--judgments", str(ours_in), "--rounds", str(a.rounds), "--out"]
        if a.before:
            runs[f"flows.rank of {Path(a.before).name}"] = []
        for _ in range(a.repeats):
            if a.before:
                wall, _ = timed(rank + [str(Path(tmp) / "before")], Path(a.before).resolve())
                runs[f"flows.rank of {Path(a.before).name}"].append(wall)
            wall, _ = timed(rank + [str(Path(tmp) / "out")])
            runs["python -m flows.rank"].append(wall)
            script = FASTCHAT.format(root=str(ROOT), path=str(theirs_in), rounds=a.rounds)
            wall, inner = timed([sys.executable, "-c", script])
            runs["FastChat compute_bootstrap_bt"].append(wall)
        same = ""
        if a.before:  # the same ratings? (the bootstrap's draw changed above 2M examples x rounds: intervals differ)
            old, new = (pd.read_parquet(Path(tmp) / d / "ratings.parquet") for d in ("before", "out"))
            same = (f"# ratings identical to {Path(a.before).name}'s: {old['rating'].equals(new['rating'])}; largest "
                    f"interval-end difference {np.abs(old['ci_low'] - new['ci_low']).max():.2f} Elo")
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    base = min(runs["FastChat compute_bootstrap_bt"])
    print(f"# {a.n:,} judgments, {a.contenders} contenders, {df_examples:,} examples, {ties:.0%} ties, "
          f"{a.rounds} bootstrap rounds each; wall seconds of a fresh process, best of {a.repeats} (each run listed)")
    print(f"# machine: {os.cpu_count()} CPUs; load average at the end {load}; last FastChat run: {inner}")
    print(f"# command: python bench/rank_speed.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"| {'run':<31} | best s | runs (s)             | vs FastChat |")
    print(f"|{'-' * 33}|--------|----------------------|-------------|")
    for name, walls in runs.items():
        each = " ".join(f"{w:.2f}" for w in walls)
        print(f"| {name:<31} | {min(walls):6.2f} | {each:<20} | {base / min(walls):10.2f}x |")
    if same:
        print(same)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
