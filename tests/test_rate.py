"""Bradley-Terry ratings: agreement with an independent MLE, ties, bootstrap, pooling, anchor, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from scipy.optimize import minimize

from tasks.config.schema import RatingConfig
from tasks.core.errors import UserError
from tasks.rating.bt import bradley_terry
from tasks.rating.judged import win_matrix
from tasks.rating.rate import ELO_PER_NAT, rate, separated


def simulate(n: int, k: int = 8, seed: int = 0, nu: float = 0.0, n_examples: int = 200, datasets=("d0",)):
    """Judgments drawn from a Davidson model (nu = 0: plain Bradley-Terry) and the true strengths."""
    rng = np.random.default_rng(seed)
    theta = np.linspace(1.0, -1.0, k)
    a = rng.integers(0, k, n)
    b = (a + rng.integers(1, k, n)) % k
    d = theta[a] - theta[b]
    denom = np.exp(d / 2) + np.exp(-d / 2) + nu
    p_a, p_tie = np.exp(d / 2) / denom, nu / denom
    u = rng.random(n)
    winner = np.where(u < p_a, "a", np.where(u < p_a + p_tie, "tie", "b"))
    names = np.array([f"m{x}" for x in range(k)])
    return pd.DataFrame(
        {
            "dataset": np.array(datasets)[rng.integers(0, len(datasets), n)],
            "example_id": rng.integers(0, n_examples, n),
            "contender_a": names[a],
            "contender_b": names[b],
            "order": np.where(rng.random(n) < 0.5, "ab", "ba"),
            "winner": winner,
            "strength": np.where(winner == "tie", 0, 1),
            "error": None,
        }
    )


def overall(r: pd.DataFrame) -> pd.DataFrame:
    """The pooled block, indexed by contender."""
    return r[r["scope"] == "overall"].set_index("contender").sort_index()


def scipy_mle(df: pd.DataFrame, davidson: bool) -> pd.Series:
    """Independent maximum likelihood (BFGS on the raw per-judgment likelihood), centred Elo ratings."""
    names = sorted(set(df.contender_a) | set(df.contender_b))
    pos = {n: i for i, n in enumerate(names)}
    a, b = df.contender_a.map(pos).to_numpy(), df.contender_b.map(pos).to_numpy()
    win_a, tie = (df.winner == "a").to_numpy(), (df.winner == "tie").to_numpy()
    k = len(names)

    def nll(x):
        theta = np.concatenate([[0.0], x[: k - 1]])
        d = theta[a] - theta[b]
        if not davidson:
            return np.logaddexp(0, np.where(win_a, -d, d)).sum()
        lam = x[k - 1]
        log_den = np.logaddexp(np.logaddexp(d / 2, -d / 2), lam)
        num = np.where(tie, lam, np.where(win_a, d / 2, -d / 2))
        return -(num - log_den).sum()

    x0 = np.zeros(k if davidson else k - 1)
    res = minimize(nll, x0, method="BFGS", options={"gtol": 1e-8, "maxiter": 10_000})
    theta = np.concatenate([[0.0], res.x[: k - 1]])
    return pd.Series(1000 + ELO_PER_NAT * (theta - theta.mean()), index=names)


def test_agrees_with_scipy_mle_without_ties():
    df = simulate(4000, seed=1)
    ours = overall(rate(df, {}, RatingConfig(ci="fisher")))["rating"]
    ref = scipy_mle(df, davidson=False)
    assert np.abs(ours - ref.loc[ours.index]).max() < 1.0
    assert ours.max() - ours.min() > 100  # the data really separate the contenders


def test_davidson_agrees_with_scipy_mle_with_ties():
    df = simulate(4000, seed=2, nu=0.8)
    assert (df.winner == "tie").mean() > 0.2
    ours = overall(rate(df, {}, RatingConfig(ci="fisher", ties="davidson")))["rating"]
    ref = scipy_mle(df, davidson=True)
    assert np.abs(ours - ref.loc[ours.index]).max() < 1.0


def test_bradley_terry_on_integer_pairs_matches_rate():
    df = simulate(3000, k=5, seed=3)
    names = sorted(set(df.contender_a) | set(df.contender_b))
    pos = {n: i for i, n in enumerate(names)}
    a, b = df.contender_a.map(pos).to_numpy(), df.contender_b.map(pos).to_numpy()
    win = df.winner.eq("a").to_numpy()
    theta = bradley_terry(np.where(win, a, b), np.where(win, b, a), len(names))
    ours = overall(rate(df, {}, RatingConfig(ci="fisher")))["rating"]
    assert np.abs(1000 + ELO_PER_NAT * theta - ours.loc[names].to_numpy()).max() < 1e-3


@pytest.mark.parametrize("ties", ["davidson", "rao-kupper", "half"])
def test_all_ties_give_equal_ratings(ties):
    df = simulate(600, k=4, seed=4).assign(winner="tie", strength=0)
    r = overall(rate(df, {}, RatingConfig(ties=ties, bootstrap_rounds=50)))
    assert np.abs(r["rating"] - 1000).max() < 1e-6
    assert (r["win_rate"] == 0.5).all()


def test_ties_pull_ratings_together_compared_with_ignoring_them():
    wins = simulate(2000, k=4, seed=5)
    ties = simulate(2000, k=4, seed=6).assign(winner="tie", strength=0, example_id=lambda d: d.example_id + 1000)
    cfg = RatingConfig(ci="fisher")
    spread_wins = overall(rate(wins, {}, cfg))["rating"].std()
    spread_both = overall(rate(pd.concat([wins, ties]), {}, cfg))["rating"].std()
    assert spread_both < spread_wins


def test_bootstrap_interval_contains_estimate_and_shrinks_with_more_data():
    cfg = RatingConfig(bootstrap_rounds=200)
    small = overall(rate(simulate(1000, k=5, seed=7, n_examples=100), {}, cfg))
    big = overall(rate(simulate(16000, k=5, seed=7, n_examples=1600), {}, cfg))
    for r in (small, big):
        assert ((r.ci_low <= r.rating) & (r.rating <= r.ci_high)).all()
    # 16x the data should roughly quarter the width (1/sqrt(16)); allow slack for bootstrap noise.
    ratio = (big.ci_high - big.ci_low).mean() / (small.ci_high - small.ci_low).mean()
    assert 0.15 < ratio < 0.4


def test_bootstrap_moves_judgments_of_one_example_together():
    base = simulate(1500, k=5, seed=8, n_examples=150)
    copies = pd.concat([base] * 6, ignore_index=True)  # same verdicts repeated on the same examples
    fresh = pd.concat(
        [base.assign(example_id=base.example_id + 1000 * c) for c in range(6)], ignore_index=True
    )  # the same verdicts, pretended independent examples
    cfg = RatingConfig(bootstrap_rounds=200)
    width = {
        name: (lambda r: (r.ci_high - r.ci_low).mean())(overall(rate(df, {}, cfg)))
        for name, df in [("base", base), ("copies", copies), ("fresh", fresh)]
    }
    assert width["copies"] > 0.8 * width["base"]  # repeating an example adds no information
    assert width["fresh"] < 0.6 * width["base"]  # new examples do (about 1/sqrt(6) = 0.41)


def test_fisher_interval_close_to_bootstrap_on_independent_data():
    df = simulate(6000, k=6, seed=9, n_examples=6000)
    boot = overall(rate(df, {}, RatingConfig(bootstrap_rounds=300)))
    fish = overall(rate(df, {}, RatingConfig(ci="fisher")))
    ratio = (fish.ci_high - fish.ci_low) / (boot.ci_high - boot.ci_low)
    assert ratio.between(0.75, 1.33).all()
    assert np.allclose(fish.rating, boot.rating)


def _fixed(dataset: str, a_wins: int, b_wins: int, offset: int = 0) -> pd.DataFrame:
    """Deterministic judgments of A vs B in one dataset, one example each."""
    n = a_wins + b_wins
    return pd.DataFrame(
        {
            "dataset": dataset,
            "example_id": np.arange(n) + offset,
            "contender_a": "A",
            "contender_b": "B",
            "order": "ab",
            "winner": ["a"] * a_wins + ["b"] * b_wins,
            "strength": 1,
            "error": None,
        }
    )


def test_pooled_rating_weights_datasets_equally():
    big = _fixed("big", 7000, 3000)  # A ahead in a dataset with 10x the judgments
    small = _fixed("small", 300, 700)  # B ahead by the same odds in a small one
    r = rate(pd.concat([big, small], ignore_index=True), {}, RatingConfig(ci="fisher"))
    pooled = r[r.scope == "overall"].set_index("contender")["rating"]
    per_big = r[r.scope == "big"].set_index("contender")["rating"]
    assert per_big["A"] - per_big["B"] > 100
    assert abs(pooled["A"] - pooled["B"]) < 1.0
    assert set(r.scope) == {"overall", "big", "small"}


def test_single_dataset_overall_equals_dataset():
    r = rate(simulate(1000, k=4, seed=10), {}, RatingConfig(bootstrap_rounds=50))
    a = r[r.scope == "overall"].drop(columns="scope").reset_index(drop=True)
    b = r[r.scope == "d0"].drop(columns="scope").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_anchor_pins_contender_and_keeps_differences():
    df = simulate(3000, k=5, seed=11)
    mean = overall(rate(df, {}, RatingConfig(ci="fisher")))
    pinned = overall(rate(df, {}, RatingConfig(ci="fisher", anchor="m3", anchor_rating=1500)))
    assert pinned.loc["m3", "rating"] == pytest.approx(1500)
    assert pinned.loc["m3", "ci_low"] == pytest.approx(1500) and pinned.loc["m3", "ci_high"] == pytest.approx(1500)
    diff = (pinned.rating - pinned.rating["m0"]) - (mean.rating - mean.rating["m0"])
    assert np.abs(diff).max() < 1e-6
    # A misspelt anchor used to pin the mean silently; now it is one line naming it and the contenders.
    with pytest.raises(UserError, match=r"rating.anchor 'gpt-4' is not a contender.*m0, m1, m2, m3, m4"):
        rate(df, {}, RatingConfig(ci="fisher", anchor="gpt-4"))


def test_strong_weight_counts_a_strong_verdict_twice():
    df = simulate(2000, k=4, seed=12)
    strong = df.assign(strength=np.where((df.winner != "tie") & (np.arange(len(df)) % 3 == 0), 2, df.strength))
    doubled = pd.concat([strong, strong[strong.strength == 2]], ignore_index=True).assign(strength=1)
    a = overall(rate(strong, {}, RatingConfig(ci="fisher", strong_weight=2.0)))
    b = overall(rate(doubled, {}, RatingConfig(ci="fisher")))
    assert np.abs(a.rating - b.rating).max() < 1e-6


def test_error_rows_are_ignored_and_kinds_reported():
    df = simulate(1000, k=4, seed=13)
    noisy = pd.concat([df, df.head(300).assign(winner="a", contender_a="m3", error="timeout")], ignore_index=True)
    cfg = RatingConfig(ci="fisher")
    r = overall(rate(noisy, {"m0": "reference"}, cfg))
    assert np.allclose(r.rating, overall(rate(df, {}, cfg)).rating)
    assert r.loc["m0", "kind"] == "reference" and r.loc["m1", "kind"] == "candidate"
    assert r.n_comparisons.sum() == 2 * len(df)


def test_output_columns_ranks_and_separation():
    df = pd.concat([_fixed("d", 900, 100), _fixed("d", 500, 500, offset=5000).assign(contender_a="C")])
    r = rate(df, {}, RatingConfig(bootstrap_rounds=100))
    for col in ["scope", "contender", "kind", "rating", "ci_low", "ci_high", "n_comparisons", "win_rate", "rank"]:
        assert col in r.columns
    o = r[r.scope == "overall"].sort_values("rank")
    assert list(o.contender) == ["A", "B", "C"] or list(o.contender) == ["A", "C", "B"]
    assert list(o["rank"]) == [1, 2, 3]
    assert bool(o.iloc[0].separated_from_next)  # A won 90% against B
    assert not bool(o.iloc[1].separated_from_next)  # B and C split 50/50
    assert not bool(o.iloc[2].separated_from_next)  # last has no next
    fallback = separated(r.drop(columns="separated_from_next"))
    assert fallback.loc[o.index[0], "separated_from_next"]


def test_win_matrix_is_complementary():
    df = simulate(3000, k=4, seed=14, nu=0.5, datasets=("x", "y"))
    m = win_matrix(df)
    off = ~np.eye(4, dtype=bool)
    assert np.allclose((m.to_numpy() + m.to_numpy().T)[off], 1.0)
    assert np.isnan(np.diag(m.to_numpy())).all()
    only_x = win_matrix(df, scope="x")
    assert not np.allclose(only_x.to_numpy()[off], m.to_numpy()[off])


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d.drop(columns=["winner", "dataset"]), ["missing", "winner", "dataset"]),
        (lambda d: d.assign(winner=np.where(np.arange(len(d)) == 0, "A>>B", d.winner)), ["A>>B", "allowed"]),
        (lambda d: d.assign(contender_b="m0", contender_a="m0"), ["fewer than two contenders"]),
    ],
)
def test_bad_input_is_one_clear_line(change, words):
    with pytest.raises(UserError) as err:
        rate(change(simulate(200, k=3, seed=15)), {})
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_rating_config_rejects_unknown_keys():
    with pytest.raises(ValidationError, match=r"tie\s+Extra inputs are not permitted"):
        RatingConfig(tie="davidson")  # type: ignore[call-arg]
    assert all(f.description for f in RatingConfig.model_fields.values())


def test_fast_bootstrap_draw_matches_the_multinomial(monkeypatch):
    """Many examples x rounds draw index counts instead of numpy's multinomial: same point ratings, same intervals up
    to Monte Carlo noise, each dataset's examples redrawn exactly as many times as it has."""
    import tasks.rating.bootstrap as boot
    import tasks.rating.rate as rate_mod
    from tasks.rating.judged import prepare_judgments

    df = simulate(6000, k=5, seed=31, nu=0.5, n_examples=600, datasets=("d0", "d1"))
    cfg = RatingConfig(bootstrap_rounds=400)
    exact = rate(df, {}, cfg)
    monkeypatch.setattr(boot, "EXACT_DRAWS", 0)
    monkeypatch.setattr(rate_mod, "_MAX_CHUNK_FLOATS", 100_000)  # several chunks of rounds
    fast = rate(df, {}, cfg)
    assert exact["rating"].tolist() == fast["rating"].tolist()
    width = lambda r: (r.ci_high - r.ci_low).to_numpy()  # noqa: E731
    assert np.abs(width(fast) / width(exact) - 1).max() < 0.2  # 400 rounds: the 2.5% quantiles move ~5-10%
    assert not np.array_equal(exact["ci_low"], fast["ci_low"])  # it is a different draw
    p = prepare_judgments(df, cfg)
    w = boot.drawn_weights(p, 7, np.random.default_rng(0))
    for d in range(2):
        assert (w[:, p.ex_ds == d].sum(axis=1) == (p.ex_ds == d).sum()).all()
