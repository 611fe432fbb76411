"""Leaks found before any model loads: test prompts seen in training (verbatim, folded, near), counted exactly,
refused over data.max_overlap in one line naming the file; repeated training rows counted."""

from __future__ import annotations

import random

import pytest
import yaml

from tasks.config.schema import DataConfig, DatasetSpec
from tasks.core.errors import UserError
from tasks.data.load import Example
from tasks.data.overlap import check_leaks, duplicates, overlap
from tasks.demo.data import make_split
from tests.conftest import config_error, mini_config_dict, write_jsonl

WORDS = ("invoice parcel refund login password charge delivery account router screen battery order courier "
         "address card plan upgrade cancel screen warranty").split()


def _email(rng: random.Random, n: int = 24) -> str:
    """A made-up email body of n words: two of them share a 3-gram only by chance."""
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(n))


def _row(i: int, text: str, system: str = "Route the email to one of five teams.") -> Example:
    """A routing row with this email as the user's message."""
    return Example(str(i), [{"role": "system", "content": system}, {"role": "user", "content": text}], "billing")


def _leaky(rng: random.Random) -> tuple[list[Example], list[Example]]:
    """100 training rows; 100 test rows of which 30 copy a training prompt verbatim, 10 with other case and spacing,
    5 with one word of 24 changed (near), and 55 fresh."""
    train = [_row(i, _email(rng)) for i in range(100)]
    test = [_row(1000 + i, train[i].prompt[1]["content"]) for i in range(30)]
    test += [_row(1030 + i, "  " + train[30 + i].prompt[1]["content"].upper().replace(" ", "   ")) for i in range(10)]
    for i in range(5):
        words = train[40 + i].prompt[1]["content"].split()
        test.append(_row(1040 + i, " ".join(words[:-1] + ["zebra"])))
    test += [_row(1045 + i, _email(rng)) for i in range(55)]
    return train, test


def test_every_kind_is_counted_exactly_with_the_training_row_it_copies():
    train, test = _leaky(random.Random(0))
    found = overlap(train, test, near_duplicate=0.8)
    assert (len(found.verbatim), len(found.folded), len(found.near), found.rows) == (30, 10, 5, 100)
    assert found.verbatim[0] == ("1000", "0") and found.folded[0] == ("1030", "30") and found.near[0] == ("1040", "40")
    assert found.words() == "45 of 100 test prompts (45%): 30 verbatim, 10 after case/whitespace folding, 5 near-duplicates"
    # the last of 24 words changed: 21 of the 22 word 3-grams shared, Jaccard 21/23 = 0.913, near at 0.9 but not 0.95
    assert len(overlap(train, test, near_duplicate=0.9).near) == 5
    assert len(overlap(train, test, near_duplicate=0.95).near) == 0
    assert overlap(train, test, near_duplicate=1.0).count == 40


def test_a_shared_system_prompt_makes_no_near_duplicates():
    rng, system = random.Random(1), " ".join(["You route customer emails to the right team."] * 20)
    train = [_row(i, _email(rng, 6), system) for i in range(50)]
    test = [_row(100 + i, _email(rng, 6), system) for i in range(50)]
    assert overlap(train, test, near_duplicate=0.5).count == 0


def _config(tmp_path, tiny_models, tiny_data, train: list[dict], test: list[dict], **data) -> str:
    """The mini search with its extraction dataset replaced by these rows (and `data:` settings)."""
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["datasets"][0] = {"name": "extraction", "train": str(write_jsonl(tmp_path / "x_train.jsonl", train)),
                          "test": str(write_jsonl(tmp_path / "x_test.jsonl", test))}
    if data:
        cfg["data"] = data
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "c.yaml"


def test_a_leaky_dataset_is_refused_in_one_line_naming_its_test_file(tmp_path, tiny_models, tiny_data):
    train, test = make_split("extraction", 40, 20)
    test = test[:14] + train[:4] + [{**r, "messages": [{**m, "content": m["content"].lower()} for m in r["messages"]]}
                                    for r in train[4:6]]  # 4 verbatim + 2 folded of 20 test rows: 30%
    msg = config_error(_config(tmp_path, tiny_models, tiny_data, train, test))
    assert msg.startswith(f"{tmp_path / 'x_test.jsonl'}: 6 of 20 test prompts (30%): 4 verbatim, 2 after case/")
    assert "data.max_overlap (1%)" in msg and "drop those rows" in msg


def test_under_the_cap_the_overlap_is_a_warning_and_duplicates_are_named(tmp_path, tiny_models, tiny_data):
    from tasks.config.schema import load_config
    from tasks.plan.prepare import prepare

    train, test = make_split("extraction", 40, 20)
    train = train + [{**r, "id": f"again-{r['id']}"} for r in train[:3]]  # three training rows twice, other ids
    test = test[:19] + train[:1]  # 1 of 20 test prompts seen in training: 5%
    prep = prepare(load_config(_config(tmp_path, tiny_models, tiny_data, train, test, max_overlap=0.05)))
    lines = [w for w in prep.warnings if w.startswith("dataset extraction:")]
    assert lines[0].startswith("dataset extraction: 1 of 20 test prompts (5%): 1 verbatim")
    assert lines[1].startswith("dataset extraction: 3 of 43 training rows repeat an earlier row")


def test_the_held_out_dataset_is_compared_with_every_other_dataset():
    train, test = make_split("extraction", 30, 10)
    held_train, held_test = make_split("orders", 30, 10)
    spec = lambda n: DatasetSpec(name=n, train=f"{n}_train.jsonl", test=f"{n}_test.jsonl")  # noqa: E731
    ex = lambda rows: [Example(r["id"], r["messages"][:-1], r["messages"][-1]["content"]) for r in rows]  # noqa: E731
    splits = {"x": (spec("x"), ex(train), ex(test)), "held": (spec("held"), ex(held_train), ex(held_test[:9] + test[:1]))}
    assert check_leaks(DataConfig(max_overlap=0.5), splits, held_out="held") == [
        "dataset held: 1 of 10 test prompts (10%): 1 verbatim, 0 after case/whitespace folding, 0 near-duplicates also "
        f"appear in held_train.jsonl and every other dataset (e.g. verbatim {test[0]['id']} ~ {test[0]['id']})"]
    with pytest.raises(UserError, match="^held_test.jsonl: 1 of 10 test prompts"):
        check_leaks(DataConfig(), splits, held_out="held")
    assert check_leaks(DataConfig(), {"held": splits["held"]}) == []  # alone, it has no leak


def test_the_shipped_demo_datasets_do_not_leak():
    from tasks.config.schema import load_config
    from tasks.data.load import load_examples
    from tests.test_data import ROOT

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    specs = [*cfg.datasets, cfg.validation.dataset]
    splits = {d.name: (d, load_examples(d.train), load_examples(d.test)) for d in specs}
    assert check_leaks(cfg.data, splits, held_out=cfg.validation.dataset.name) == []
    assert all(not duplicates(train) for _, train, _ in splits.values())
