"""Guards of the ratings: never-compared groups, unbeaten and winless contenders, a misspelt anchor,
contenders whose judgments all failed, and interval labels that follow the config."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from flows.rank import main as rank_main
from tasks.config.schema import RatingConfig
from tasks.core.errors import UserError
from tasks.rating.rate import ELO_PER_NAT, rate
from tasks.report.report import interval_words, plot_ratings, ranking_rows, separation_rows, winner_line
from tests.test_rate import simulate

CONFIGS = [RatingConfig(bootstrap_rounds=100), RatingConfig(ci="fisher")]


def games(a: str, b: str, a_wins: int, b_wins: int, ties: int = 0, dataset: str = "d", offset: int = 0,
          error: str | None = None) -> pd.DataFrame:
    """Deterministic judgments of a against b, one example each (as tests/test_rate.py's _fixed)."""
    n = a_wins + b_wins + ties
    return pd.DataFrame({
        "dataset": dataset, "example_id": np.arange(n) + offset, "contender_a": a, "contender_b": b, "order": "ab",
        "winner": ["a"] * a_wins + ["b"] * b_wins + ["tie"] * ties,
        "strength": [1] * (a_wins + b_wins) + [0] * ties, "error": error,
    })


def pooled(r: pd.DataFrame) -> pd.DataFrame:
    """The pooled block, best first."""
    return r[r["scope"] == "overall"].sort_values("rank").reset_index(drop=True)


def four_plus(extra: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Simulated judgments among m0..m3 (ties included), alone and with `extra` added."""
    base = simulate(2000, k=4, seed=3, nu=0.5)
    return base, pd.concat([base, extra], ignore_index=True)


def sweep(winner: str, loser_side: str = "b", n: int = 40, offset: int = 10_000) -> pd.DataFrame:
    """`winner` judged against m0..m3 on n fresh examples; it wins them all (loser_side='b') or loses them all."""
    opp = np.random.default_rng(0).choice(["m0", "m1", "m2", "m3"], n)
    return pd.DataFrame({"dataset": "d0", "example_id": np.arange(n) + offset, "contender_a": winner,
                         "contender_b": opp, "order": "ab", "winner": "a" if loser_side == "b" else "b",
                         "strength": 1, "error": None})


# ------------------------------------------------------------------------------------------- groups


@pytest.mark.parametrize("cfg", CONFIGS, ids=["bootstrap", "fisher"])
def test_groups_never_compared_are_not_comparable(cfg):
    df = pd.concat([games("A", "B", 27, 3), games("C", "D", 15, 15, offset=100)], ignore_index=True)
    r = pooled(rate(df, {}, cfg))
    assert list(r.contender) == ["A", "B", "C", "D"]
    assert list(r.group) == [1, 1, 2, 2]
    assert bool(r.separated_from_next[0])  # A won 90% of 30 against B: separated within its group
    assert not bool(r.separated_from_next[1])  # B -> C crosses the groups: never a `>`
    # Each group on its own scale: its mean at anchor_rating (the ridge alone would have set the offsets).
    assert r.groupby("group")["rating"].mean().to_numpy() == pytest.approx([1000.0, 1000.0])
    assert "never compared" in r.note[2] and r.note[0] == ""
    table = ranking_rows(rate(df, {}, cfg))
    assert list(table["vs next"]) == [">", "not comparable", "~", ""] and list(table["group"]) == [1, 1, 2, 2]
    assert "- B not comparable C" in separation_rows(rate(df, {}, cfg))
    assert "never compared with its group: C, D" in winner_line(rate(df, {}, cfg))


def test_winner_line_and_cli_say_not_comparable(tmp_path, capsys):
    df = pd.concat([games("A", "B", 20, 10), games("C", "D", 25, 5, offset=100), games("C", "E", 5, 5, offset=200)])
    r = pooled(rate(df, {}, RatingConfig(ci="fisher")))
    assert list(r.group) == [1, 1, 1, 2, 2] and set(r.contender[:3]) == {"C", "D", "E"}  # the bigger group first
    line = winner_line(pd.DataFrame({
        "scope": "overall", "contender": ["x", "y"], "kind": "candidate", "rating": [1100.0, 1050.0],
        "ci_low": [1050.0, 1000.0], "ci_high": [1150.0, 1100.0], "n_comparisons": 10, "win_rate": 0.5,
        "rank": [1, 2], "separated_from_next": [False, False], "group": [1, 2]}))
    assert "**x** leads its group" in line and "**not comparable** with y" in line
    (tmp_path / "j").mkdir()
    pd.concat([games("A", "B", 20, 10), games("C", "D", 12, 18, offset=100)]).to_parquet(tmp_path / "j" / "x.parquet")
    assert rank_main(["--judgments", str(tmp_path / "j"), "--out", str(tmp_path / "o"), "--ci", "fisher"]) == 0
    out = capsys.readouterr().out
    assert "not comparable" in out and "group" in out.splitlines()[0]
    # A leader whose group is itself alone (A beat B and C, which never met) is not comparable with the second.
    pd.concat([games("A", "B", 8, 0), games("A", "C", 8, 0, offset=10)]).to_parquet(tmp_path / "j" / "x.parquet")
    assert rank_main(["--judgments", str(tmp_path / "j"), "--out", str(tmp_path / "o"), "--ci", "fisher"]) == 0
    out = capsys.readouterr().out
    assert "unbeaten" in out and "note: the top contender is not comparable" not in out  # A and B are one group


# ------------------------------------------------------------------------------------- unbounded


@pytest.mark.parametrize("cfg", CONFIGS, ids=["bootstrap", "fisher"])
def test_unbeaten_contender_is_unbounded_and_shifts_nobody(cfg):
    base, with_top = four_plus(sweep("top"))
    alone = pooled(rate(base, {}, cfg)).set_index("contender")
    r = pooled(rate(with_top, {}, cfg))
    top = r.iloc[0]
    assert top.contender == "top" and top["rank"] == 1 and top.unbounded == "above"
    assert top.rating == math.inf and top.ci_high == math.inf and np.isfinite(top.ci_low)
    assert top.n_comparisons == 40 and top.win_rate == 1.0 and "unbeaten: won all 40 judgments" in top.note
    # A clean sweep of 40 examples puts the lower bound above every contender it beat.
    others = r.iloc[1:].set_index("contender")
    assert top.ci_low > others.rating.max()
    # The others' ratings are the fit without it: no shift (the ridge used to move them all by hundreds of Elo).
    assert np.allclose(others.rating, alone.rating.loc[others.index], atol=1e-6)
    assert (others.unbounded == "").all() and np.isfinite(others[["ci_low", "ci_high"]].to_numpy()).all()
    assert bool(top.separated_from_next)  # its bound clears the runner-up's interval
    rows = ranking_rows(rate(with_top, {}, cfg))
    assert rows["rating"].iloc[0] == "unbeaten" and rows.iloc[0, 4].startswith(">= ")
    assert "unbeaten" in winner_line(rate(with_top, {}, cfg))


def test_unbeaten_bound_is_the_sweep_probability():
    # Plain Bradley-Terry (ties as half wins): P(10 straight wins) = sigmoid(d)^10 = 2.5% at the 95% lower bound.
    r = pooled(rate(games("A", "B", 10, 0), {}, RatingConfig(ties="half")))
    p = 0.025 ** (1 / 10)
    assert r.ci_low[0] == pytest.approx(1000 + ELO_PER_NAT * math.log(p / (1 - p)), abs=1e-6)
    assert r.rating[1] == 1000.0  # the only finite rating is the reference
    more = pooled(rate(games("A", "B", 40, 0), {}, RatingConfig(ties="half")))
    assert more.ci_low[0] > r.ci_low[0] + 100  # more wins, a higher bound
    narrow = pooled(rate(games("A", "B", 10, 0), {}, RatingConfig(ties="half", confidence=0.5)))
    assert narrow.ci_low[0] > r.ci_low[0]  # a lower confidence, a tighter bound


@pytest.mark.parametrize("cfg", CONFIGS, ids=["bootstrap", "fisher"])
def test_never_winning_contender_is_unbounded_below(cfg):
    base, with_bottom = four_plus(sweep("bottom", loser_side="a"))
    alone = pooled(rate(base, {}, cfg)).set_index("contender")
    r = pooled(rate(with_bottom, {}, cfg))
    last = r.iloc[-1]
    assert last.contender == "bottom" and last.unbounded == "below" and last.rating == -math.inf
    assert last.ci_low == -math.inf and last.ci_high < r.rating.iloc[:-1].min()
    others = r.iloc[:-1].set_index("contender")
    assert np.allclose(others.rating, alone.rating.loc[others.index], atol=1e-6)
    assert ranking_rows(rate(with_bottom, {}, cfg))["rating"].iloc[-1] == "never won"


def test_chain_of_sweeps_is_ordered_and_bounded():
    df = pd.concat([games("A", "B", 6, 0), games("B", "C", 6, 0, offset=10), games("C", "D", 3, 3, offset=20)])
    r = pooled(rate(df, {}, RatingConfig(ci="fisher")))
    assert list(r.contender[:2]) == ["A", "B"] and list(r.unbounded[:2]) == ["above", "above"]
    assert "lost only to those above" in r.note[1]  # B lost to A: it swept only C
    assert np.isfinite(r.ci_low[:2]).all() and (r.rating[2:] < 1100).all()


# ----------------------------------------------------------------------------------- anchor, failures


def test_misspelt_anchor_is_one_line_naming_the_contenders(tmp_path, capsys):
    df = pd.concat([games("gpt-4", "m1", 6, 4), games("m1", "m2", 5, 5, offset=20)])
    with pytest.raises(UserError) as err:
        rate(df, {}, RatingConfig(anchor="gtp-4"))
    msg = str(err.value)
    assert "\n" not in msg and "'gtp-4'" in msg and "gpt-4, m1, m2" in msg and "did you mean 'gpt-4'" in msg
    # The anchor is a contender even when all its judgments failed: no error, the mean is pinned.
    failed = pd.concat([df, games("ref", "m1", 3, 0, offset=50, error="timeout")])
    r = pooled(rate(failed, {}, RatingConfig(ci="fisher", anchor="ref")))
    assert r.loc[r.rating.notna(), "rating"].mean() == pytest.approx(1000)
    df.to_parquet(tmp_path / "j.parquet")
    assert rank_main(["--judgments", str(tmp_path / "j.parquet"), "--out", str(tmp_path / "o"),
                      "--anchor", "gtp-4"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "gtp-4" in lines[0] and "m2" in lines[0]


def test_contender_whose_judgments_all_failed_is_listed_with_the_reason():
    ok = simulate(1000, k=3, seed=5)
    broken = pd.concat([games("broken", "m0", 6, 0, error="HTTP 500: upstream failed", offset=5000, dataset="d0"),
                        games("m1", "broken", 4, 2, error="timeout", offset=6000, dataset="d0"),
                        games("ghost", "m2", 2, 0, error="no output", dataset="gone")])  # a dataset with no rating
    cfg = RatingConfig(ci="fisher")
    r = rate(pd.concat([ok, broken], ignore_index=True), {"broken": "reference"}, cfg)
    p = pooled(r)
    row = p[p.contender == "broken"].iloc[0]
    assert np.isnan(row.rating) and np.isnan(row.ci_low) and row.n_comparisons == 0
    assert row["rank"] == 4 and row.kind == "reference" and not row.separated_from_next
    assert row.note == "not rated: all 12 judgments failed (HTTP 500: upstream failed)"
    assert p.contender.iloc[-1] == "ghost" and "all 2 judgments failed (no output)" in p.note.iloc[-1]
    assert np.allclose(p.rating[:3], pooled(rate(ok, {}, cfg)).rating)  # the others are as without it
    assert list(r[r.scope == "d0"].contender) == ["m0", "m1", "m2", "broken"]  # listed in its dataset's scope too
    rows = ranking_rows(r)
    assert rows["rating"].iloc[-2] == "not rated" and "all 12 judgments failed" in rows["note"].iloc[-2]
    assert winner_line(r).startswith("**m0** leads")
    assert plot_ratings(r)[:4] == b"\x89PNG"


def test_only_failures_left_is_one_line_saying_so():
    df = pd.concat([games("a", "b", 3, 3, error="rate limited"), games("a", "a", 1, 0, offset=10)])
    with pytest.raises(UserError, match="fewer than two contenders.*6 judgments with an error.*rate limited"):
        rate(df, {})


# ----------------------------------------------------------------------------------------- labels


def test_interval_labels_follow_the_config(tmp_path, capsys):
    df = simulate(600, k=3, seed=6)
    fisher = rate(df, {}, RatingConfig(ci="fisher", confidence=0.9))
    assert "fisher 90% CI" in ranking_rows(fisher).columns and interval_words(fisher) == "fisher 90% intervals"
    boot = rate(df, {}, RatingConfig(bootstrap_rounds=20))
    assert "bootstrap 95% CI" in ranking_rows(boot).columns
    assert interval_words(boot) == "bootstrap 95% intervals over examples"
    assert "95% CI" in ranking_rows(boot.drop(columns=["ci_method", "ci_level"])).columns  # an older table
    df.to_parquet(tmp_path / "j.parquet")
    assert rank_main(["--judgments", str(tmp_path / "j.parquet"), "--out", str(tmp_path / "o"), "--ci", "fisher"]) == 0
    assert "fisher 95% CI" in capsys.readouterr().out.splitlines()[0]


def test_plot_draws_unbounded_and_grouped_ratings():
    df = pd.concat([games("A", "B", 10, 0), games("C", "D", 4, 6, offset=20), games("D", "E", 0, 5, offset=40)])
    assert plot_ratings(rate(df, {}, RatingConfig(bootstrap_rounds=20)))[:4] == b"\x89PNG"
