"""Length control (rating.length_control) and the Arena-comparable column (rating_arena) of rate()."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tasks.config.schema import RatingConfig
from tasks.core.errors import UserError
from tasks.rating.rate import ELO_PER_NAT, rate

TRUE = np.array([0.6, 0.3, 0.0, -0.2, -0.7])  # nats; m3 is verbose
LONG = np.array([1.0, 1.0, 1.0, 2.5, 1.0])  # typical output length relative to the others
BETA = 2.0  # nats per unit of (len_a - len_b) / (len_a + len_b): m3's 2.5x length is worth +0.86 nats on average


def verbose_judge(n: int, seed: int = 0, nu: float = 0.6, n_examples: int = 400) -> pd.DataFrame:
    """Judgments from a Davidson judge that adds BETA x the normalised length difference to the strength gap."""
    rng = np.random.default_rng(seed)
    k = len(TRUE)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    la = np.round(400 * LONG[a] * rng.lognormal(0.0, 0.5, n))
    lb = np.round(400 * LONG[b] * rng.lognormal(0.0, 0.5, n))
    d = TRUE[a] - TRUE[b] + BETA * (la - lb) / (la + lb)
    pa, pb = np.exp(d / 2), np.exp(-d / 2)
    u = rng.random(n) * (pa + pb + nu)
    winner = np.where(u < pa, "a", np.where(u < pa + pb, "b", "tie"))
    names = np.array([f"m{x}" for x in range(k)])
    return pd.DataFrame({"dataset": "d0", "example_id": rng.integers(0, n_examples, n), "contender_a": names[a],
                         "contender_b": names[b], "order": "ab", "winner": winner,
                         "strength": np.where(winner == "tie", 0, 1), "error": None, "len_a": la, "len_b": lb})


def _pooled(r: pd.DataFrame) -> pd.DataFrame:
    return r[r.scope == "overall"].set_index("contender").sort_index()


def test_length_control_recovers_true_strengths_where_the_raw_fit_does_not():
    df = verbose_judge(8000)
    r = _pooled(rate(df, {}, RatingConfig(length_control=True, bootstrap_rounds=100)))
    truth = pd.Series(1000 + ELO_PER_NAT * (TRUE - TRUE.mean()), index=[f"m{x}" for x in range(5)])
    controlled_err = (r["rating"] - truth).abs()
    raw_err = (r["rating_raw"] - truth).abs()
    assert controlled_err.max() < 30  # Elo; intervals are ~+-25 here
    assert ((r["ci_low"] <= truth) & (truth <= r["ci_high"])).sum() >= 4
    # The raw fit credits the verbose contender with the judge's taste for length: far above its truth, and
    # outside its own interval; the others pay for it.
    assert r.loc["m3", "rating_raw"] - truth["m3"] > 80
    assert truth["m3"] < r.loc["m3", "ci_low_raw"]
    assert raw_err.max() > 3 * controlled_err.max()
    coef = r["length_coef"].iloc[0]
    assert r["length_coef_low"].iloc[0] < ELO_PER_NAT * BETA < r["length_coef_high"].iloc[0]
    assert abs(coef - ELO_PER_NAT * BETA) < 80
    # the order: truly m2 > m3; the raw fit says m3 > m2, the controlled one (its ranks) m2 > m3
    assert r.loc["m3", "rating_raw"] > r.loc["m2", "rating_raw"] and r.loc["m3", "rank"] > r.loc["m2", "rank"]


def test_equal_lengths_leave_the_ratings_as_they_were():
    df = verbose_judge(3000, seed=1).assign(len_a=500, len_b=500)
    for kw in ({"ci": "fisher"}, {"ties": "half", "bootstrap_rounds": 50}, {"ties": "rao-kupper", "ci": "fisher"},
               {"ci": "sandwich"}, {"ties": "half", "ci": "sandwich"}):
        plain = _pooled(rate(df, {}, RatingConfig(**kw)))
        lc = _pooled(rate(df, {}, RatingConfig(length_control=True, **kw)))
        assert np.abs(lc["rating"] - plain["rating"]).max() < 1e-6
        assert np.abs(lc["rating_raw"] - plain["rating"]).max() == 0
        assert abs(lc["length_coef"].iloc[0]) < 1e-6
        if kw.get("ci") in ("fisher", "sandwich"):  # the same information about theta: the same intervals
            assert np.abs(lc["ci_low"] - plain["ci_low"]).max() < 1e-2  # Elo: the two Newton solvers stop apart


def test_fisher_length_control_agrees_with_bootstrap_and_pools_datasets():
    df = pd.concat([verbose_judge(3000, seed=2).assign(dataset="x"), verbose_judge(3000, seed=3).assign(dataset="y")])
    fish = rate(df, {}, RatingConfig(length_control=True, ci="fisher"))
    boot = rate(df, {}, RatingConfig(length_control=True, bootstrap_rounds=100))
    assert set(fish.scope) == {"overall", "x", "y"}
    assert np.allclose(fish["rating"], boot["rating"])
    width = lambda r: (r.ci_high - r.ci_low).to_numpy()  # noqa: E731
    assert 0.6 < np.median(width(fish) / width(boot)) < 1.6
    for r in (fish, boot):
        assert (r.length_coef_low < r.length_coef).all() and (r.length_coef < r.length_coef_high).all()


def test_sandwich_length_control_counts_an_example_once_however_often_it_was_judged():
    """rating.ci sandwich with length control: clustered by example like the plain sandwich. Every judgment repeated
    4 times on its own example adds no information: the Fisher intervals halve (4x the 'independent' judgments),
    the clustered ones stay, for the ratings and for the length coefficient."""
    df = verbose_judge(3000, seed=4)
    four = pd.concat([df] * 4, ignore_index=True)
    width = {}
    for ci in ("fisher", "sandwich"):
        for name, d in (("once", df), ("four", four)):
            r = _pooled(rate(d, {}, RatingConfig(length_control=True, ci=ci)))
            width[ci, name] = (r.ci_high - r.ci_low).to_numpy(), float(r.length_coef_high.iloc[0] - r.length_coef_low.iloc[0])
            assert (r.ci_low < r.rating).all() and (r.rating < r.ci_high).all()
    for k in (0, 1):
        fisher = np.median(width["fisher", "four"][k] / width["fisher", "once"][k])
        sandwich = np.median(width["sandwich", "four"][k] / width["sandwich", "once"][k])
        assert 0.45 < fisher < 0.55 and 0.95 < sandwich < 1.05, (k, fisher, sandwich)
    # independent judgments: the clustered interval is about the Fisher one
    assert 0.85 < np.median(width["sandwich", "once"][0] / width["fisher", "once"][0]) < 1.25


def test_length_control_without_lengths_is_one_line():
    df = verbose_judge(500).drop(columns=["len_a", "len_b"])
    with pytest.raises(UserError, match=r"^rating.length_control needs the outputs' lengths.*len_a, len_b") as err:
        rate(df, {}, RatingConfig(length_control=True))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="3 judgments have no usable len_a/len_b"):
        rate(verbose_judge(500).assign(len_a=lambda d: d.len_a.where(d.index >= 3)), {},
             RatingConfig(length_control=True))
    rate(df, {}, RatingConfig())  # without the option the lengths are not needed


def test_arena_column_is_fastchats_compute_bt_on_the_same_judgments():
    from bench.fastchat_bt import battles_from_judgments, compute_bt

    df = verbose_judge(6000, seed=4, nu=1.2)
    df = pd.concat([df, verbose_judge(2000, seed=5).assign(dataset="d1")], ignore_index=True)
    r = rate(df, {}, RatingConfig(ci="fisher"))
    theirs = compute_bt(battles_from_judgments(df))
    theirs = theirs - theirs.mean() + 1000  # FastChat pins nothing here; ours pins the mean at 1000
    ours = _pooled(r)
    assert np.abs(ours["rating_arena"] - theirs.loc[ours.index]).max() < 0.05
    one = r[r.scope == "d1"].set_index("contender")["rating_arena"]
    theirs_d1 = compute_bt(battles_from_judgments(df[df.dataset == "d1"]))
    assert np.abs(one - (theirs_d1 - theirs_d1.mean() + 1000).loc[one.index]).max() < 0.05
    # Davidson's ratings are stretched against half-win ties (here ~40% ties)
    spread = ours["rating"].std() / ours["rating_arena"].std()
    assert 1.3 < spread < 2.5


def test_arena_column_follows_the_anchor_and_the_guards():
    df = verbose_judge(2000, seed=6)
    sweep = pd.DataFrame({"dataset": "d0", "example_id": np.arange(30), "contender_a": "top", "contender_b": "m1",
                          "order": "ab", "winner": "a", "strength": 1, "error": None, "len_a": 1, "len_b": 1})
    r = _pooled(rate(pd.concat([df, sweep]), {}, RatingConfig(anchor="m2", anchor_rating=1200, ci="fisher")))
    assert r.loc["m2", "rating_arena"] == pytest.approx(1200)
    assert r.loc["top", "rating_arena"] == math.inf and r.loc["top", "rating"] == math.inf


def test_with_lengths_reads_each_judged_output():
    from tasks.rating.judged import with_lengths

    outputs = {"d0": {"A": pd.DataFrame({"example_id": [1, 2], "output": ["four", "sixsix"]}),
                      "B": pd.DataFrame({"example_id": [1, 2], "output": ["", None]})},
               "d1": {"A": pd.DataFrame({"example_id": [1], "output": ["x" * 10]}),
                      "B": pd.DataFrame({"example_id": [1], "output": ["yyy"]})}}
    j = pd.DataFrame({"dataset": ["d0", "d0", "d1", "d0"], "example_id": [1, 2, 1, 1],
                      "contender_a": ["A", "B", "B", "B"], "contender_b": ["B", "A", "A", "A"]})
    got = with_lengths(j, outputs)
    assert got["len_b"].tolist() == [0, 6, 10, 4]
    assert got["len_a"][[0, 2, 3]].tolist() == [4, 3, 0]
    assert np.isnan(got["len_a"][1])  # B has no output on example 2 of d0
