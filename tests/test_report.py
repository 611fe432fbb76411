"""The report names the winner only with its separation caveat, and says whether validation held."""

from __future__ import annotations

import pandas as pd

from tasks.rating.win_rates import summarize, verdict, win_rate_ci
from tasks.report.report import (html_report, judge_lines, separation_rows, stages_table, stretch_notes,
                                 teacher_lines,
                                 validation_lines, winner_line)


def _ratings(separated: bool) -> pd.DataFrame:
    """A pooled scope of three contenders."""
    return pd.DataFrame({
        "scope": "overall", "contender": ["m1", "teacher", "m2"], "kind": ["merge", "reference", "candidate"],
        "rating": [1100.0, 1000.0, 900.0], "ci_low": [1050.0 if separated else 980.0, 1000.0, 850.0],
        "ci_high": [1150.0, 1000.0, 950.0], "n_comparisons": 10, "win_rate": [0.7, 0.5, 0.3], "rank": [1, 2, 3],
        "separated_from_next": [separated, True, False],
    })


def test_winner_named_with_caveat():
    assert "leads by 100 Elo, but is **not separated** from teacher" in winner_line(_ratings(False))
    assert "separated from teacher" in winner_line(_ratings(True)) and "not" not in winner_line(_ratings(True))
    assert separation_rows(_ratings(True)) == ["- m1 > teacher", "- teacher > m2"]


def test_student_against_teacher():
    (line,) = teacher_lines(_ratings(True))
    assert "m1 beat the teacher by 100 Elo" in line and "intervals separate" in line
    level = _ratings(False).assign(rating=[1000.2, 1000.0, 900.0])  # equal to the Elo shown: neither beat nor trailed
    assert teacher_lines(level) == ["- **overall**: best student m1 matched the teacher (0 Elo apart; intervals overlap, "
                                    "so not a clear result)."]


def test_validation_verdicts():
    judgments = pd.DataFrame({
        "dataset": "h", "example_id": [str(i) for i in range(20)], "contender_a": "w", "contender_b": "b",
        "order": "ab", "winner": ["a"] * 18 + ["b"] * 2, "error": None,
    })
    result = summarize(judgments, "w", ["b"], 0.95)
    row = result["against"][0]
    assert row["win_rate"] == 0.9 and row["ci_low"] > 0.5 and row["verdict"] == "held"
    assert verdict(0.55, 0.4) == "held, but not significantly" and verdict(0.4, 0.2) == "did not hold"
    text = "\n".join(validation_lines(result | {"frozen_at": "t", "dataset": "h"}))
    assert "w wins 90% (95% CI" in text and "against **b**: the advantage **held**" in text and "**h** was read" in text
    none = summarize(judgments.assign(winner="b"), "w", ["b"], 0.95)
    assert "w wins none of the 20 examples against **b**: the advantage **did not hold**" in validation_lines(none)[-1]
    # an opponent the winner rated below in the search (the teacher, usually): no advantage was claimed to hold
    behind = summarize(judgments.assign(winner="b"), "w", ["b"], 0.95, behind=frozenset({"b"}))
    assert behind["against"][0]["verdict"] == "no advantage to test"
    assert validation_lines(behind)[-1].endswith("against **b**: **no advantage to test**: it rated below b in the search.")
    # the interval is computed over examples, and narrows with more of them
    wide = win_rate_ci(pd.Series([1.0, 0.0] * 5))
    narrow = win_rate_ci(pd.Series([1.0, 0.0] * 500))
    assert narrow[2] - narrow[1] < wide[2] - wide[1]


def test_judge_lines_show_bill_and_biases():
    rows = [{"stage": "judge:adaptive", "computed": 5, "reused": 0, "requests": 10, "cost_usd": 0.25,
             "consistency": 0.8, "longer_won": 0.6, "stop": "all pairs judged"}]
    (line,) = judge_lines(rows)
    assert "10 requests" in line and "$0.2500" in line and "consistency 80%" in line and "longer output won 60%" in line


def test_win_rate_matrix_in_report():
    from tasks.report.report import win_rate_table

    judgments = pd.DataFrame({
        "dataset": "d", "example_id": ["1", "2", "3", "4"], "contender_a": "x", "contender_b": "y", "order": "ab",
        "winner": ["a", "a", "a", "tie"], "strength": 1, "error": None,
    })
    table = win_rate_table(judgments)
    assert "88%" in table and "12%" in table  # x: 3.5 of 4 against y


def test_html_shows_tags_as_text_and_stage_tables_have_no_nan():
    """An end-of-turn token in a sentence or a table cell is shown, not swallowed as an HTML tag."""
    from tasks.core.tables import md_table

    formats = pd.DataFrame({"model": ["a", "b"], "turns end with": ["</s>", "<|im_end|>"]})
    page = html_report(f"turns end with '</s>'\n\n{md_table(formats)}\n", b"png")
    assert "turns end with '&lt;/s&gt;'" in page and "<td>&lt;/s&gt;</td>" in page
    assert "<td>&lt;|im_end|&gt;</td>" in page and "</s>" not in page.replace("&lt;/s&gt;", "")
    # a token named in a code span (a prompt format's end of turn) shows as the token, | and all, in a table cell
    code = html_report(md_table(pd.DataFrame({"format": ["turns end with `<|im_end|>`"]})), b"png")
    assert "<td>turns end with <code>&lt;|im_end|&gt;</code></td>" in code
    table = stages_table([{"stage": "finetune", "computed": 2, "reused": 0, "seconds": 1.5},
                          {"stage": "judge", "computed": 1, "reused": 0, "seconds": 0.25, "requests": 12.0}])
    assert "nan" not in md_table(table) and table["requests"].tolist() == ["", 12]


def test_a_stretched_scale_gets_a_plain_note():
    close = _ratings(True)
    assert stretch_notes(close) == []
    far = close.assign(rating=[-4000.0, 1000.0, -5000.0], ci_low=[-5500.0, 1000.0, -6000.0],
                       ci_high=[-2500.0, 1000.0, -3900.0])
    assert stretch_notes(far) == []  # a wide span, but no one wins nearly everything: no cause to state
    [note, blank] = stretch_notes(far.assign(win_rate=[0.05, 0.97, 0.02]))
    assert note.startswith("- overall: ratings run from -6000 to 1000 Elo because m1 wins 5% of its comparisons")
    assert not blank
