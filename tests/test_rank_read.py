"""flows.rank's reader: only the rating columns, low-cardinality text as categoricals and text example ids as integer
codes, and still exactly the judgments pandas' full read gives rate(): the same codes, examples, weights, lengths
and failures (so the same ratings and the same bootstrap draws)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.rank import _read
from tasks.config.schema import RatingConfig
from tasks.core.errors import UserError
from tasks.rating.judged import Judged, prepare_judgments
from tests.test_rate_lc import verbose_judge


def _messy(seed: int = 0) -> pd.DataFrame:
    """Judgments with text example ids, two datasets, strong verdicts, failures, self-comparisons, a missing id."""
    df = verbose_judge(1500, seed=seed)
    rng = np.random.default_rng(seed)
    df = df.assign(dataset=np.where(rng.random(len(df)) < 0.4, "b-set", "a-set"),
                   example_id=[f"ex-{v}" for v in df.example_id], judge="gpt", cost_usd=0.01,
                   kind_a="candidate", kind_b=np.where(df.contender_b == "m0", "reference", "candidate"))
    df.loc[df.index % 50 == 3, "error"] = "timeout"
    df.loc[df.index % 97 == 5, "error"] = ""  # an empty error is no error
    df.loc[7, "contender_b"] = df.loc[7, "contender_a"]
    df.loc[11, "example_id"] = None
    df.loc[df.index % 5 == 0, "strength"] = 2
    return df


def _same(a: Judged, b: Judged) -> None:
    """Every array of two encodings equal, and the failures' values (an empty one keeps its frame's columns)."""
    for field in ("names", "datasets", "ds", "ex", "ex_ds", "i", "j", "out", "w", "x"):
        va, vb = getattr(a, field), getattr(b, field)
        assert (va is None) == (vb is None), field
        if va is not None:
            assert np.array_equal(np.asarray(va), np.asarray(vb)), field
    cols = ["dataset", "contender_a", "contender_b", "error"]  # what rating reads of them
    pd.testing.assert_frame_equal(a.failed[cols].astype(object).reset_index(drop=True),
                                  b.failed[cols].astype(object).reset_index(drop=True), check_dtype=False)


@pytest.mark.parametrize("lengths", [False, True])
def test_read_gives_prepare_judgments_the_same_judgments(tmp_path: Path, lengths: bool):
    df = _messy()
    df.to_parquet(tmp_path / "j.parquet", index=False)
    cfg = RatingConfig(length_control=lengths, strong_weight=2.0)
    frame = _read([tmp_path / "j.parquet"], ("len_a", "len_b") if lengths else ())
    assert not {"order", "judge", "cost_usd"} & set(frame.columns)  # only what rating reads
    assert str(frame["contender_a"].dtype) == "category" and frame["example_id"].dtype.kind == "f"
    _same(prepare_judgments(frame, cfg), prepare_judgments(pd.read_parquet(tmp_path / "j.parquet"), cfg))


def test_read_numbers_examples_across_files_as_their_concatenation(tmp_path: Path):
    one, two = _messy(1), _messy(2).assign(dataset="c-set")
    one.to_parquet(tmp_path / "1.parquet", index=False)
    two.to_parquet(tmp_path / "2.parquet", index=False)
    files = [tmp_path / "1.parquet", tmp_path / "2.parquet"]
    cfg = RatingConfig()
    both = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    _same(prepare_judgments(_read(files), cfg), prepare_judgments(both, cfg))


def test_read_keeps_numeric_ids_and_falls_back_on_mixed_types(tmp_path: Path):
    df = verbose_judge(800, seed=3)  # integer example ids: kept as they are
    df.to_parquet(tmp_path / "int.parquet", index=False)
    cfg = RatingConfig()
    _same(prepare_judgments(_read([tmp_path / "int.parquet"]), cfg),
          prepare_judgments(pd.read_parquet(tmp_path / "int.parquet"), cfg))
    df.assign(example_id=df.example_id.astype(str)).to_parquet(tmp_path / "str.parquet", index=False)
    files = [tmp_path / "int.parquet", tmp_path / "str.parquet"]  # 1 and "1" are different examples, as pandas has it
    mixed = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    _same(prepare_judgments(_read(files), cfg), prepare_judgments(mixed, cfg))


def test_read_names_a_file_without_lengths(tmp_path: Path):
    verbose_judge(100).drop(columns=["len_a"]).to_parquet(tmp_path / "old.parquet", index=False)
    with pytest.raises(UserError, match=r"old.parquet: --length-control needs the outputs' lengths, but it has no len_a"):
        _read([tmp_path / "old.parquet"], ("len_a", "len_b"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match=r"bad.parquet: not a readable Parquet file"):
        _read([tmp_path / "bad.parquet"])


def test_rank_scale_bench_small(tmp_path: Path):
    """bench/rank_scale.py: flows.rank with and without --length-control on a file it writes, wall, CPU and RSS."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "bench/rank_scale.py", "--n", "3000", "--contenders", "6", "--rounds", "4",
                           "--keep", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|     3,000")]
    assert [r.split("|")[2].strip() for r in rows] == ["plain", "length control"], proc.stdout
    assert all(float(r.split("|")[5]) > 50 for r in rows)  # peak RSS in MB: a Python with numpy and pandas
    assert (tmp_path / "judgments-3000-6-0.parquet").exists()
