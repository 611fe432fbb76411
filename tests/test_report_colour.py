"""The report reads as an answer: the HTML win-rate matrix coloured with a legend, an unbeaten teacher in words."""

from __future__ import annotations

import re

import pandas as pd

from tasks.report.tables import WIN_RATES_CAPTION, WIN_RATES_HEADING, colour_win_rates, win_colour


def test_win_colour_runs_from_red_through_white_to_blue():
    assert win_colour(0.0) == "#f4a582" and win_colour(0.5) == "#f7f7f7" and win_colour(1.0) == "#92c5de"
    # halfway between white and each end
    assert win_colour(0.25) == "#f6cebc" and win_colour(0.75) == "#c4deea"


def test_the_html_matrix_is_coloured_and_has_a_legend():
    from tasks.report.report import html_report, win_rate_table

    judgments = pd.DataFrame({
        "dataset": "d", "example_id": ["1", "2", "3", "4"], "contender_a": "x", "contender_b": "y", "order": "ab",
        "winner": ["a", "a", "a", "tie"], "strength": 1, "error": None,
    })
    md = "\n".join([f"## {WIN_RATES_HEADING} (row against column)", "", WIN_RATES_CAPTION, "",
                    win_rate_table(judgments, ["x", "y"]), "", "## Other", "", "| a | b |", "|---|---|", "| 5% | 7% |"])
    html = html_report(md, b"png")
    cells = re.findall(r'<td style="background:(#[0-9a-f]{6})">(\d+)%</td>', html)
    assert sorted(cells) == sorted([(win_colour(0.88), "88"), (win_colour(0.12), "12")])
    assert "win rate of the row against the column" in html and "<td>5%</td>" in html  # other tables untouched
    assert colour_win_rates("<p>no matrix</p>") == "<p>no matrix</p>"


def test_an_unbeaten_teacher_is_said_in_words():
    import numpy as np

    from tasks.report.report import teacher_lines

    ratings = pd.DataFrame({
        "scope": "extraction", "contender": ["teacher", "a", "b"], "kind": ["reference", "candidate", "candidate"],
        "rating": [np.inf, 1200.0, 900.0], "ci_low": [3000.0, 1100.0, 800.0], "ci_high": [np.inf, 1300.0, 1000.0],
        "n_comparisons": 10, "win_rate": [1.0, 0.4, 0.3], "rank": [1, 2, 3], "separated_from_next": [True, False, False],
    })
    [line] = teacher_lines(ratings)
    assert line == ("- **extraction**: best student a trailed the teacher: the teacher won every judgment it was in, "
                    "so the gap has no finite size (rated by a bound only).")
