"""Judge repeatability (tasks/judge/repeat.py, the card's numbers in tasks/judge/card.py): a fixed sample of an LLM
judge's judgments asked a second time against the fake OpenAI-compatible server (tests/fake_openai.py), a
deterministic judge and a coin-flipping one; the sample's size, the re-run that pays nothing, the dollar cap."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pandas as pd
import pytest
from prefect import flow

from tasks.config.schema import BudgetConfig, JudgeConfig, ModelPrice
from tasks.data.load import Example
from tasks.judge.card import repeat_agreement, win_rate_moves
from tasks.judge.llm import Contest, JudgeRun, run_llm_judge
from tasks.judge.repeat import NOT_SENT, RepeatRun, eligible, repeat_judge
from tasks.report.judge_card import card_section, repeat_lines
from tasks.store.results import llm_repeat_key
from tests.fake_openai import FakeOpenAI, Faults

KEY = "sk-test-repeat-2b7e"  # the key the `server` fixture (conftest.py) wants, set in $ENV
ENV = "BASESEARCH_TEST_REPEAT_KEY"
LABEL = "openai:judge-model@prompt-v1"
ALL = BudgetConfig(strategy="all-pairs")


def _outputs(name: str, texts: list[str]) -> pd.DataFrame:
    """A contender's outputs indexed by example_id."""
    return pd.DataFrame({"example_id": [str(i) for i in range(len(texts))], "contender": name, "output": texts,
                         "error": None}).set_index("example_id")


def _contest(n: int = 8) -> Contest:
    """Three contenders of clearly different quality on n examples: 3 pairs x n x 2 orders = 6n judgments."""
    examples = [Example(str(i), [{"role": "user", "content": f"Name item {i}."}], f"item {i} teacher",
                        f"item {i} red box") for i in range(n)]
    outs = {"best": _outputs("best", [f"item {i} red box" for i in range(n)]),
            "half": _outputs("half", [f"item {i} blue" for i in range(n)]),
            "worst": _outputs("worst", [f"no idea {i}" for i in range(n)])}
    return Contest({"d": examples}, {"d": outs})


def _cfg(srv: FakeOpenAI, **kw) -> JudgeConfig:
    """An openai judge config pointing at the fake server."""
    return JudgeConfig(kind="openai", model="judge-model", base_url=srv.base_url, api_key_env=ENV, **kw)


@flow(name="judge-repeat-test")
def _judge_and_repeat(contest: Contest, cfg: JudgeConfig, store: str, price: ModelPrice | None = None,
                      usd_left: float | None = None) -> tuple[JudgeRun, RepeatRun]:
    """The first judging, then its repeat sample, inside a flow as the search runs them."""
    first = run_llm_judge(contest, cfg, ALL, price, store)
    return first, repeat_judge(first.judgments, contest, cfg, price, usd_left, store)


# ------------------------------------------------------------------------------------------ units


@pytest.mark.parametrize("n, share, minimum, expected", [
    (0, 0.05, 50, 0), (10, 0.05, 50, 10), (50, 0.05, 50, 50), (1000, 0.05, 50, 50), (1001, 0.05, 50, 51),
    (4000, 0.05, 50, 200), (48, 0.25, 10, 12), (48, 0.0, 0, 0), (48, 1.0, 0, 48),
])
def test_sample_size_is_the_share_at_least_the_minimum_at_most_all(n, share, minimum, expected):
    judge = JudgeConfig(kind="openai", model="m", repeat_share=share, repeat_min=minimum)
    assert judge.repeat_count(n) == expected


def _repeats(pairs: list[tuple[str, str, str]]) -> pd.DataFrame:
    """Repeat rows of one pair (x, y) on examples e0.., with (first winner, second winner, error) each."""
    return pd.DataFrame([{"dataset": "d", "example_id": f"e{i}", "contender_a": "x", "contender_b": "y",
                          "order": "ab", "judge": LABEL, "winner_first": w1, "winner_second": w2, "error": err}
                         for i, (w1, w2, err) in enumerate(pairs)])


def test_agreement_and_moves_by_hand():
    # x (contender a) wins 3 of 4 the first time (75%); the second time 1 win, 1 tie, 2 losses (37.5%); the two
    # verdicts agree on examples 0 and 3. A 5th repeat failed: it is not counted.
    table = _repeats([("a", "a", None), ("a", "b", None), ("a", "tie", None), ("b", "b", None),
                      ("a", None, "unparseable: no verdict in the reply")])
    a = repeat_agreement(table, rounds=200)
    assert a["n"] == 4 and a["share"] == 0.5 and a["low"] <= 0.5 <= a["high"]
    moves = win_rate_moves(table).set_index("contender")
    x, p = moves.loc["x"], (0.75 + 0.375) / 2
    assert x["n"] == 4 and x["first"] == 0.75 and x["second"] == 0.375 and x["move"] == pytest.approx(-0.375)
    assert x["move_se"] == pytest.approx(0.375 / (p * (1 - p) / 4) ** 0.5)  # about 1.5 SE
    assert moves.loc["y", "move"] == pytest.approx(0.375) and moves.loc["y", "move_se"] == pytest.approx(x["move_se"])


def test_the_same_verdicts_twice_move_nothing_even_at_a_win_rate_of_one():
    table = _repeats([("a", "a", None)] * 6)  # x always wins: p = 1, SE 0, and no move
    assert repeat_agreement(table)["share"] == 1.0
    moves = win_rate_moves(table)
    assert (moves["move"] == 0).all() and (moves["move_se"] == 0).all()


# ------------------------------------------------------------------------------------ against the server


def test_a_deterministic_judge_agrees_with_itself_and_a_rerun_pays_nothing(server, tmp_path):
    contest, cfg = _contest(), _cfg(server, repeat_share=0.25, repeat_min=10)
    first, rep = _judge_and_repeat(contest, cfg, str(tmp_path))
    assert server.stats()["chat"] == 48 + 12  # 48 judgments, then max(10, 25% of 48) = 12 asked again
    assert rep.requests == rep.new == 12 and rep.reused == 0 and len(rep.table) == 12
    assert server.stats()["paid_twice"] == 12  # the very prompts of the sample, asked a second time
    assert rep.table["error"].isna().all() and set(rep.table["key"]) <= set(first.judgments["key"])
    assert list(rep.table["repeat_key"]) == [llm_repeat_key(k) for k in rep.table["key"]]
    assert list(rep.table["key"]) == sorted(eligible(first.judgments, LABEL)["key"])[:12]  # the keys that sort first
    assert repeat_agreement(rep.table)["share"] == 1.0
    moves = win_rate_moves(rep.table)
    assert set(moves["contender"]) <= {"best", "half", "worst"} and (moves["move_se"] == 0).all()
    assert (rep.table["verdict_first"] == rep.table["verdict_second"]).all()

    # Re-run: the first judgments and the repeats are all in the store; the repeats never became first judgments.
    server.reset()
    again, rep2 = _judge_and_repeat(contest, cfg, str(tmp_path))
    assert server.stats()["chat"] == 0 and rep2.requests == 0 and rep2.reused == 12 and again.reused == 48
    cols = ["dataset", "example_id", "contender_a", "contender_b", "order", "winner", "key"]
    pd.testing.assert_frame_equal(again.judgments[cols], first.judgments[cols], check_dtype=False)
    pd.testing.assert_frame_equal(rep2.table, rep.table, check_dtype=False)
    assert not set(again.judgments["key"]) & set(rep.table["repeat_key"])


def test_the_sample_is_capped_at_the_judgments_made_and_repeats_can_be_turned_off(server, tmp_path):
    _, rep = _judge_and_repeat(_contest(), _cfg(server, repeat_share=0.05, repeat_min=100), str(tmp_path / "a"))
    assert len(rep.table) == rep.requests == 48  # fewer than repeat_min: every one
    server.reset()
    first, off = _judge_and_repeat(_contest(), _cfg(server, repeat_share=0, repeat_min=0), str(tmp_path / "b"))
    assert server.stats()["chat"] == 48 and len(off.table) == 0 and off.requests == 0
    lines = repeat_lines(first.judgments, off.table)
    assert any("not repeated (judge.repeat_share and judge.repeat_min are 0)" in line for line in lines)


def test_a_judge_that_answers_at_random_agrees_with_itself_about_half_the_time(server, tmp_path):
    server.faults = Faults(coin_flip=True)
    first, rep = _judge_and_repeat(_contest(40), _cfg(server, repeat_share=1.0), str(tmp_path))
    assert len(rep.table) == rep.requests == 240
    a = repeat_agreement(rep.table)
    assert 0.38 < a["share"] < 0.62 and a["low"] < 0.5 < a["high"], a  # 240 coin pairs: 50% +- 3.2 points
    assert win_rate_moves(rep.table)["move_se"].max() > 0
    lines, _ = card_section(first.judgments, _contest(40).examples, {"d": "exact"}, _contest(40).outputs,
                            repeats=rep.table)
    text = "\n".join(lines)
    assert "### Repeatability" in text and f"| {LABEL} | 240 of 240 (100%) | {a['share']:.0%} (95% CI" in text
    assert "3.4 points, about 3 standard errors" in text


def test_the_repeats_never_cross_the_dollar_cap_and_what_was_not_sent_is_said(server, tmp_path):
    price = ModelPrice(input=1000.0, output=1000.0)  # $1 per 1,000 tokens: a call costs ~$0.15
    cfg = _cfg(server, repeat_share=1.0, concurrency=4)
    first, rep = _judge_and_repeat(_contest(), cfg, str(tmp_path), price, 2.0)
    assert 0 < rep.new_cost_usd <= 2.0 and rep.requests < 48
    assert rep.table["cost_usd"].sum() == pytest.approx(rep.new_cost_usd)
    unsent = rep.table[rep.table["error"] == NOT_SENT]
    assert len(unsent) == 48 - rep.new > 0 and unsent["winner_second"].isna().all()
    lines = repeat_lines(first.judgments, rep.table)
    assert any(f"{len(unsent)} not sent (budget.max_usd)" in line for line in lines)
