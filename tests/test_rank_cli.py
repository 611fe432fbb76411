"""python -m flows.rank: end to end on Parquet written here, and one-line errors with exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from flows.rank import main

ROOT = Path(__file__).resolve().parents[1]


def judgments(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """Judgments among four contenders, 'teacher' a reference, A clearly best."""
    rng = np.random.default_rng(seed)
    names = np.array(["A", "B", "C", "teacher"])
    theta = np.array([1.5, 0.0, -0.2, 0.3])
    a = rng.integers(0, 4, n)
    b = (a + rng.integers(1, 4, n)) % 4
    win = rng.random(n) < 1 / (1 + np.exp(-(theta[a] - theta[b])))
    kind = {"A": "candidate", "B": "merge", "C": "candidate", "teacher": "reference"}
    return pd.DataFrame(
        {
            "dataset": np.where(rng.random(n) < 0.5, "extraction", "summaries"),
            "example_id": rng.integers(0, 100, n).astype(str),
            "contender_a": names[a],
            "contender_b": names[b],
            "order": "ab",
            "winner": np.where(win, "a", "b"),
            "strength": 1,
            "judge": "metric",
            "error": None,
            "kind_a": [kind[x] for x in names[a]],
            "kind_b": [kind[x] for x in names[b]],
        }
    )


def test_rank_end_to_end_in_process(tmp_path, capsys):
    df = judgments()
    (tmp_path / "j" / "batch").mkdir(parents=True)
    df.iloc[:300].to_parquet(tmp_path / "j" / "one.parquet")
    df.iloc[300:].to_parquet(tmp_path / "j" / "batch" / "two.parquet")  # folders are read recursively
    out = tmp_path / "out"
    code = main(["--judgments", str(tmp_path / "j"), "--out", str(out), "--anchor", "teacher", "--rounds", "50"])
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out / "ratings.parquet")
    assert "contender" in printed[0] and "95% CI" in printed[0]
    assert printed[1].split()[1] == "A"  # best first
    ratings = pd.read_parquet(out / "ratings.parquet")
    assert set(ratings.scope) == {"overall", "extraction", "summaries"}
    pooled = ratings[ratings.scope == "overall"].set_index("contender")
    assert pooled.loc["teacher", "rating"] == 1000.0
    assert pooled.loc["teacher", "kind"] == "reference" and pooled.loc["B", "kind"] == "merge"
    assert pooled["n_comparisons"].sum() == 2 * len(df)
    assert [p.name for p in out.iterdir()] == ["ratings.parquet"]  # no temp file left behind


def test_rank_reports_bad_judgments_in_one_line(tmp_path, capsys):
    bad = judgments(50).assign(winner="A>B")
    bad.to_parquet(tmp_path / "bad.parquet")
    assert main(["--judgments", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "A>B" in err and len(err.splitlines()) == 1
    (tmp_path / "notes.parquet").write_text("not parquet")
    assert main(["--judgments", str(tmp_path / "notes.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "notes.parquet" in capsys.readouterr().err
    judgments(50).drop(columns="winner").to_parquet(tmp_path / "nowinner.parquet")
    assert main(["--judgments", str(tmp_path / "nowinner.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "winner" in capsys.readouterr().err
    assert not (tmp_path / "o" / "ratings.parquet").exists()


def test_rank_missing_file_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = tmp_path / "nowhere.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.rank", "--judgments", str(missing), "--out", str(tmp_path / "o")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [f"error: {missing}: no such file or folder"]


def test_rank_writes_what_rate_computes_and_the_arena_column(tmp_path, capsys):
    """The command's ratings are rate()'s on the same judgments, bit for bit (the speed work changed no number)."""
    from tasks.config.schema import RatingConfig
    from tasks.rating.rate import rate

    df = judgments(800, seed=3)
    df.to_parquet(tmp_path / "j.parquet")
    assert main(["--judgments", str(tmp_path / "j.parquet"), "--out", str(tmp_path / "o"), "--rounds", "60"]) == 0
    printed = capsys.readouterr().out
    assert "Arena scale" in printed.splitlines()[0] and "note: `Arena scale` rates the same judgments" in printed
    got = pd.read_parquet(tmp_path / "o" / "ratings.parquet")
    want = rate(df, {"A": "candidate", "B": "merge", "C": "candidate", "teacher": "reference"},
                RatingConfig(bootstrap_rounds=60))
    pd.testing.assert_frame_equal(got, want, check_exact=True)


def test_rank_length_control(tmp_path, capsys):
    from tests.test_rate_lc import verbose_judge

    df = verbose_judge(3000, seed=7)
    df.to_parquet(tmp_path / "j.parquet")
    out = tmp_path / "o"
    assert main(["--judgments", str(tmp_path / "j.parquet"), "--out", str(out), "--rounds", "40",
                 "--length-control"]) == 0
    printed = capsys.readouterr().out
    assert "without length control" in printed.splitlines()[0] and "Elo per unit of (len_a - len_b)" in printed
    r = pd.read_parquet(out / "ratings.parquet")
    assert {"rating_raw", "ci_low_raw", "ci_high_raw", "length_coef", "rating_arena"} <= set(r.columns)
    assert (r["length_coef"] > 150).all()  # the simulated judge's taste: 347 Elo per unit
    df.drop(columns=["len_b"]).to_parquet(tmp_path / "old.parquet")
    assert main(["--judgments", str(tmp_path / "old.parquet"), "--out", str(tmp_path / "o2"), "--length-control"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'old.parquet'}: --length-control needs") and \
        "len_b" in err[0]


def test_rank_speed_bench_small():
    """bench/rank_speed.py's table: flows.rank and FastChat's compute_bootstrap_bt run side by side."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "bench/rank_speed.py", "--n", "3000", "--rounds", "4", "--repeats", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| python -m flows.rank " in proc.stdout and "| FastChat compute_bootstrap_bt " in proc.stdout
    assert "3,000 examples" in proc.stdout  # one prompt per judgment, as Arena's battles


def test_rank_sandwich_intervals_are_rates(tmp_path, capsys):
    """--ci sandwich: the clustered intervals the adaptive planner stops on, as rate() computes them."""
    from tasks.config.schema import RatingConfig
    from tasks.rating.rate import rate

    df = judgments(800, seed=3)
    df.to_parquet(tmp_path / "j.parquet")
    assert main(["--judgments", str(tmp_path / "j.parquet"), "--out", str(tmp_path / "o"), "--ci", "sandwich"]) == 0
    got = pd.read_parquet(tmp_path / "o" / "ratings.parquet")
    want = rate(df, {"A": "candidate", "B": "merge", "C": "candidate", "teacher": "reference"},
                RatingConfig(ci="sandwich"))
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    boot = rate(df, {"A": "candidate", "B": "merge", "C": "candidate", "teacher": "reference"}, RatingConfig())
    assert not got["ci_low"].equals(boot["ci_low"])  # a different method, not the default under another name
