"""Datasets load from JSONL, Parquet and `datasets` folders; metrics score as documented; demo files are reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tasks.data.load import infer_metric, load_examples
from tasks.demo.data import make_rows, write_demo_datasets
from tasks.judge.metrics import exact, json_f1, rouge_l

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_demo_data_matches_generator(tmp_path):
    write_demo_datasets(tmp_path)
    for f in sorted(tmp_path.glob("*.jsonl")):
        assert f.read_bytes() == (ROOT / "configs" / "demo_data" / f.name).read_bytes(), f.name


def test_teacher_is_noisy_but_mostly_right():
    rows = make_rows("classification", 400, 1)
    wrong = sum(r["messages"][-1]["content"] != r["expected"] for r in rows)
    assert 0.08 < wrong / len(rows) < 0.25  # configured at 15%


def test_jsonl_parquet_and_datasets_folder_agree(tmp_path):
    rows = make_rows("extraction", 5, 3)
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    frame = pd.DataFrame({"id": [r["id"] for r in rows], "messages": [r["messages"] for r in rows],
                          "expected": [json.dumps(r["expected"]) for r in rows]})
    frame.to_parquet(tmp_path / "x.parquet")
    import datasets

    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "x_ds"))
    a, b, c = (load_examples(str(tmp_path / n)) for n in ("x.jsonl", "x.parquet", "x_ds"))
    assert a == b == c
    assert a[0].expected == rows[0]["expected"] and a[0].answer == rows[0]["messages"][-1]["content"]


def test_ids_default_to_line_numbers(tmp_path):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (tmp_path / "x.jsonl").write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n")
    assert [e.id for e in load_examples(str(tmp_path / "x.jsonl"))] == ["1", "3"]


@pytest.mark.parametrize("task, metric", [("extraction", "json"), ("classification", "exact"), ("summarization", "rouge")])
def test_metric_inference(task, metric):
    from tasks.data.load import _check_row

    assert infer_metric([_check_row(r, "x", i) for i, r in enumerate(make_rows(task, 40, 1))]) == metric


def test_metrics():
    assert exact(" Billing. ", "billing") == 1.0 and exact("shipping", "billing") == 0.0
    truth = {"name": "Ana", "age": 3, "city": "Lima"}
    assert json_f1(json.dumps(truth), truth) == 1.0
    assert json_f1('{"name": "Ana", "age": 3}', truth) == pytest.approx(0.8)  # p = 1, r = 2/3
    assert json_f1("not json", truth) == 0.0
    assert rouge_l("the kettle is quiet", "the kettle is quiet") == 1.0
    assert 0 < rouge_l("the kettle is loud", "the kettle is quiet") < 1
