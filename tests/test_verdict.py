"""The verdict: the best fine-tune's win rate against each reference with its interval, its cost per 1,000 requests
from its measured batches and the device's price, latencies per request, all computed from the run's tables."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.config.schema import SearchConfig
from tasks.report.verdict import recommendation, serving, verdict_lines, verdicts

CFG = SearchConfig.model_validate({
    "name": "v", "candidates": [{"name": "a", "path": "zoo:a"}, {"name": "b", "path": "zoo:b"}],
    "datasets": [{"name": "x", "train": "t.jsonl", "test": "t.jsonl"}],
    "references": [{"name": "gpt", "model": "gpt-4o"}], "prices": {"gpt-4o": {"input": 2.5, "output": 10.0}},
    "compute": {"usd_per_hour": {"cpu": 0.36}},
})


def tuned_outputs(n: int = 8) -> pd.DataFrame:
    """A fine-tune's outputs in two batches of 4: 2 s and 1 s of device time, 10 tokens a row."""
    return pd.DataFrame({"dataset": "x", "example_id": [str(i) for i in range(n)], "completion_tokens": 10,
                         "latency_s": [0.5, 1.0, 1.5, 2.0, 0.25, 0.5, 0.75, 1.0], "batch_s": [2.0] * 4 + [1.0] * 4,
                         "batch_size": 4, "device": "cpu"})


def api_outputs(n: int = 8) -> pd.DataFrame:
    """A reference's outputs: 3 s a request, $0.01 a request."""
    return pd.DataFrame({"dataset": "x", "example_id": [str(i) for i in range(n)], "completion_tokens": 20,
                         "latency_s": 3.0, "cost_usd": 0.01})


def test_a_fine_tunes_cost_is_its_device_time_per_request_times_the_price():
    s = serving(tuned_outputs(), "candidate", "a", CFG)
    # 3 s of device time for 8 requests at $0.36/h: $0.0003 in all, $0.0375 per 1,000 requests
    assert s.usd_per_1k == pytest.approx(0.36 * 3 / 3600 / 8 * 1000)
    assert s.usd_per_1m_out == pytest.approx(0.36 * 3 / 3600 / 80 * 1e6)
    assert s.p50_s == pytest.approx(0.875) and s.p95_s == pytest.approx(1.825)
    assert "cpu at $0.36/h" in s.where and "27 tokens/s" in s.where  # 80 tokens in 3 s
    ref = serving(api_outputs(), "reference", "gpt", CFG)
    assert ref.usd_per_1k == pytest.approx(10.0) and ref.p50_s == 3.0
    old = serving(tuned_outputs().drop(columns=["batch_s", "batch_size", "device"]), "candidate", "a", CFG)
    assert old.usd_per_1k is None and "not timed" in old.where  # outputs stored before per-request timing


def judgments(a_wins: int, n: int = 8) -> pd.DataFrame:
    """a against teacher and against gpt: a wins the first `a_wins` examples, loses the rest (both orders)."""
    rows = []
    for other in ("teacher", "gpt"):
        for i in range(n):
            win = i < a_wins
            rows += [{"dataset": "x", "example_id": str(i), "contender_a": "a", "contender_b": other, "order": "ab",
                      "winner": "a" if win else "b", "error": None},
                     {"dataset": "x", "example_id": str(i), "contender_a": other, "contender_b": "a", "order": "ba",
                      "winner": "b" if win else "a", "error": None}]
    return pd.DataFrame(rows)


def ratings(best: str) -> pd.DataFrame:
    """A pooled and per-dataset table where `best` leads the fine-tunes."""
    rows = []
    for scope in ("overall", "x"):
        for name, kind, r in ((best, "candidate", 1100), ("b" if best == "a" else "a", "candidate", 900),
                              ("teacher", "reference", 1000), ("gpt", "reference", 1050)):
            rows.append({"scope": scope, "contender": name, "kind": kind, "rating": r, "ci_low": r - 50,
                         "ci_high": r + 50, "rank": 0})
    return pd.DataFrame(rows)


def test_verdicts_name_the_best_fine_tune_and_its_win_rates():
    outs = {"x": {"a": tuned_outputs(), "b": tuned_outputs(), "teacher": api_outputs().assign(latency_s=0.0),
                  "gpt": api_outputs()}}
    rows = verdicts(CFG, ratings("a"), judgments(a_wins=6), outs)
    # one dataset: said once, under its name (the pooled scope would repeat it word for word)
    assert [r["scope"] for r in rows] == ["x"] and {r["model"] for r in rows} == {"a"}
    two = verdicts(CFG, ratings("a"), judgments(a_wins=6), outs | {"y": outs["x"]})
    assert [r["scope"] for r in two] == ["overall", "x"]  # (y has no ratings here: no best fine-tune, no line)
    against = {a["reference"]: a for a in rows[0]["against"]}
    assert against["teacher"]["win_rate"] == pytest.approx(0.75) and against["gpt"]["n"] == 8
    assert against["teacher"]["ci_low"] < 0.75 < against["teacher"]["ci_high"]
    lines = verdict_lines(rows, 0.95)
    gpt = next(line for line in lines if line.startswith("x: a wins 75%") and "against gpt" in line)
    # $0.0375 against $10 per 1,000 requests; median 0.875 s against 3 s
    assert "1/267 of its cost per 1,000 requests" in gpt and "3.4x its speed" in gpt
    assert any(line.startswith("x: a serves at $0.0375 per 1,000 requests") for line in lines)
    assert any(line.startswith("x: gpt costs $10.00 per 1,000 requests") for line in lines)
    lost = verdict_lines(verdicts(CFG, ratings("a"), judgments(a_wins=0), outs), 0.95)
    # a 0%-0% interval said in words (every example lost), not as "wins 0% (95% CI 0%-0%)"
    assert any("a wins none of the 8 examples against the teacher (worse)" in line for line in lost), lost
    assert not any("CI 0%-0%" in line for line in lost)
    # non-inferiority: an interval whose low end stays above 50% minus the margin is "as good as", else undecided
    even = judgments(a_wins=4)  # 4 of 8 examples: 50%, an interval far wider than 5 points
    rows = verdicts(CFG, ratings("a"), even, outs)
    assert "(no clear difference)" in verdict_lines(rows, 0.95)[0]
    assert "(as good as the teacher within 49 points)" in verdict_lines(rows, 0.95, margin=0.49)[0]


def test_the_recommendation_says_whether_the_leader_is_clear_and_how_it_validated():
    [line] = recommendation(ratings("b"), None, 0.95)
    assert line.startswith("recommended base model: b (candidate, best pooled rating, its 95% interval clear of a's")
    close = ratings("b").assign(ci_low=lambda d: d["rating"] - 300, ci_high=lambda d: d["rating"] + 300)
    assert "overlaps a's: a tie" in recommendation(close, None, 0.95)[0]
    val = {"dataset": "held", "winner": "b", "against": [
        {"opponent": "a", "win_rate": 0.625, "ci_low": 0.5, "ci_high": 0.75, "verdict": "held, but not significantly"}]}
    assert recommendation(ratings("b"), val, 0.95)[1] == (
        "validation on the held-out held: b wins 62% (95% CI 50%-75%) against a: held, but not significantly")


def test_a_priced_teacher_gets_the_cost_and_speed_ratios():
    """teacher: {model, latency_s} with its price: the verdict says what share of its cost, how many times its speed."""
    from tasks.config.schema import ModelPrice, TeacherConfig

    outs = {"x": {"a": tuned_outputs(), "b": tuned_outputs(), "teacher": api_outputs().assign(output="x" * 400),
                  "gpt": api_outputs()}}
    cfg = CFG.model_copy(update={"teacher": TeacherConfig(model="gpt-4", latency_s=3.5),
                                 "prices": {**CFG.prices, "gpt-4": ModelPrice(input=30, output=60)}})
    lines = verdict_lines(verdicts(cfg, ratings("a"), judgments(a_wins=6), outs, {"x": 8 * 2000}), 0.95)
    # 8 requests of 2,000 prompt characters (500 tokens) and 400 answer characters (100 tokens) at $30/$60 per 1M:
    # $0.015 + $0.006 = $0.021 a request, $21.00 per 1,000; a's $0.0375 is 1/560 of it, its 0.875 s median 4x faster
    teacher = next(line for line in lines if "against the teacher" in line)
    assert "1/560 of its cost per 1,000 requests" in teacher and "4.0x its speed" in teacher
    assert any(line.startswith("x: the teacher (gpt-4 at $30/$60 per 1M tokens, as characters / 4) costs $21.00 per "
                               "1,000 requests") and line.endswith("latency median 3.50 s as configured") for line in lines)
    unpriced = verdict_lines(verdicts(CFG, ratings("a"), judgments(a_wins=6), outs, {"x": 16000}), 0.95)
    assert not any("of its cost" in line for line in unpriced if "against the teacher" in line)
