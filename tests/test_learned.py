"""Did fine-tuning work? A fine-tune counts as having learned only when it beats its untuned base and the trivial
answer on the metric; where none does, the verdict recommends nothing for that dataset, with the reason."""

from __future__ import annotations

import random

import pandas as pd

from tasks.config.base import TRIVIAL, untuned_name
from tasks.config.schema import DatasetSpec
from tasks.data.load import DatasetInfo, Example
from tasks.generate.floors import trivial_answers, trivial_outputs
from tasks.models.fingerprint import ModelInfo
from tasks.plan.prepare import Prepared
from tasks.report.learned import learned_lines, lifts, nothing_learned

TEAMS = ["billing", "shipping", "tech", "accounts", "sales"]


def _rows(n: int, seed: int, labels: list[str] | None = None) -> list[Example]:
    """Email-routing rows: the label is in the email (a learnable task) unless `labels` overrides it (random)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        team = rng.choice(TEAMS)
        answer = labels[i] if labels else team
        rows.append(Example(f"{seed}-{i}", [{"role": "user", "content": f"Email {i} for the {team} team."}], answer))
    return rows


def _outputs(name: str, rows: list[Example], answers: list[str]) -> pd.DataFrame:
    """A contender's outputs table."""
    return pd.DataFrame({"dataset": "emails", "example_id": [r.id for r in rows], "contender": name, "output": answers,
                         "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0, "error": None})


def _found(train: list[Example], test: list[Example], tuned: list[str], untuned: list[str]):
    """The lift of one fine-tune `m` on an `emails` dataset with these answers of its own and of its base."""
    spec = DatasetSpec(name="emails", train="t.jsonl", test="s.jsonl", metric="exact")
    prep = Prepared({"m": ModelInfo("m", "fp", {})}, {"emails": DatasetInfo(spec, train, test, "a", "b", "exact")})
    frames = {"emails": {"m": _outputs("m", test, tuned), untuned_name("m"): _outputs("u", test, untuned),
                         TRIVIAL: trivial_outputs("emails", train, test, "exact")}}
    return lifts(prep, frames, 0.95, 0, {("m", "emails"): (9.86, 9.67)})


def test_a_fine_tune_at_chance_learned_nothing_and_the_dataset_gets_no_recommendation():
    rng = random.Random(1)
    labels = [rng.choice(TEAMS) for _ in range(200)]  # random labels: nothing to learn
    train, test = _rows(160, 1, labels[:160]), _rows(40, 2, labels[160:])
    guesses = [rng.choice(TEAMS) for _ in test]  # what a model that learned nothing answers
    found = _found(train, test, guesses, ["I am a helpful assistant."] * len(test))
    assert len(found) == 1 and not found[0].learned and nothing_learned(found)
    [line] = learned_lines(found)
    assert line.startswith("no recommendation for emails: no fine-tune beat both its untuned base (0.00) and the "
                           "trivial answer (")
    assert "its training loss went 9.86 -> 9.67 (2% lower)" in line
    assert "other learning rates (finetune.epochs, finetune.search" in line


def test_a_fine_tune_that_learned_the_task_clears_both_floors():
    train, test = _rows(160, 1), _rows(40, 2)
    found = _found(train, test, [r.answer for r in test], ["I am a helpful assistant."] * len(test))
    assert found[0].learned and found[0].score == 1.0 and learned_lines(found) == [] and not nothing_learned(found)
    # beating the untuned base is not enough: a fine-tune that always answers the majority label ties the trivial one
    majority = trivial_answers(train, test, "exact")
    assert not _found(train, test, majority, ["?"] * len(test))[0].learned


def test_the_trivial_answer_is_the_majority_label_or_the_first_sentence():
    train, test = _rows(50, 1), _rows(5, 2)
    common = pd.Series([r.answer for r in train]).value_counts().index[0]
    assert trivial_answers(train, test, "exact") == [common] * 5
    review = [Example("r", [{"role": "system", "content": "Summarize."},
                            {"role": "user", "content": "Great phone. The battery lasts two days! Pricey though."}], "")]
    assert trivial_answers([], review, "rouge") == ["Great phone."]
