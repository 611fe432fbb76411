"""The search reads an ingest folder as a dataset ({name, path}): its train and test files, its pruned static prompt
added back to the rows every contender answers, its held-out part as validation.dataset; and the search's dataset
reader names, in one line with file:line, what a row uses that it cannot train on (tool calls, JSON-object content,
images), reads text-only content parts, and notes the `name` fields it drops."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tasks.config.schema import load_config
from tasks.core.errors import UserError
from tasks.data.load import dataset_fingerprint, load_examples, static_prompt
from tasks.data.overlap import check_leaks
from tasks.ingest.config import IngestConfig
from tasks.ingest.ingest import run_ingest
from tasks.plan.prepare import load_dataset
from tasks.store.keys import file_fingerprint
from tests.ingest_traffic import STATIC, write_traffic

CONFIG = """\
name: from-traffic
candidates:
  - {name: base, path: zoo:base}
datasets:
  - {name: support, path: ingested}
validation:
  dataset: {name: support-held-out, path: ingested, part: held_out}
  baselines: [base]
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ingest of 1,500 logged requests, static prompt pruned, 15% of the groups held out."""
    root = tmp_path_factory.mktemp("ds")
    write_traffic(root / "traffic.jsonl", 1500, seed=3, broken_at=-1)
    run_ingest(IngestConfig(source=str(root / "traffic.jsonl"), out=str(root / "ingested"), prune_static=True,
                            held_out_share=0.15, group_by="metadata.thread_id"))
    (root / "search.yaml").write_text(CONFIG)
    return root


def test_an_ingest_folder_is_a_dataset_and_its_held_out_part_validates(folder):
    cfg = load_config(folder / "search.yaml")
    spec, held = cfg.datasets[0], cfg.validation.dataset
    assert (spec.train, spec.test) == (str(folder / "ingested" / "train.jsonl"), str(folder / "ingested" / "test.jsonl"))
    assert held.test == str(folder / "ingested" / "held_out.jsonl") and held.train == spec.train
    data, out = load_dataset(spec), json.loads((folder / "ingested" / "ingest.json").read_text())
    assert len(data.train) == out["counts"]["split"]["train"]["rows"]
    assert len(data.test) == out["counts"]["split"]["test"]["rows"]
    # pruned in every file; added back to the rows contenders answer, not to the training rows
    assert not any(m["content"] == STATIC for f in ("train", "test", "held_out")
                   for line in (folder / "ingested" / f"{f}.jsonl").open() for m in json.loads(line)["messages"])
    pruned = out["counts"]["static_prompt_rows"]
    restored = sum(e.prompt[0] == {"role": "system", "content": STATIC} for e in data.test)
    assert sum(e.prompt[0]["role"] == "system" for e in data.train) < 0.2 * len(data.train)
    assert restored / len(data.test) > 0.8 and pruned > 0.8 * out["counts"]["rows"]
    # the restored prompt is part of the rows' identity: a new static prompt is new outputs and judgments
    assert data.train_fp == file_fingerprint(spec.train) and data.test_fp != file_fingerprint(spec.test)
    validation = load_dataset(held)
    assert len(validation.test) == out["counts"]["split"]["held_out"]["rows"] >= 5
    assert sum(e.prompt[0] == {"role": "system", "content": STATIC} for e in validation.test) > 0.8 * len(
        validation.test)
    # the search's leak check, the held-out part compared with every other row too: nothing shared
    warnings = check_leaks(cfg.data, {"support": (spec, data.train, data.test),
                                      "support-held-out": (held, validation.train, validation.test)},
                           held_out="support-held-out")
    assert not [w for w in warnings if "test" in w and "also" in w], warnings


def test_a_changed_static_prompt_changes_the_test_fingerprint_only(folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder / "ingested", copy)
    before = dataset_fingerprint(str(copy / "test.jsonl")), dataset_fingerprint(str(copy / "train.jsonl"))
    (copy / "static_prompt.txt").write_text("You are terse.")
    after = dataset_fingerprint(str(copy / "test.jsonl")), dataset_fingerprint(str(copy / "train.jsonl"))
    assert before[0] != after[0] and before[1] == after[1]
    rows = load_examples(str(copy / "test.jsonl"))
    assert static_prompt(copy / "test.jsonl") == "You are terse." and static_prompt(copy / "train.jsonl") is None
    assert sum(e.prompt[0] == {"role": "system", "content": "You are terse."} for e in rows) > 0.8 * len(rows)


@pytest.mark.parametrize("entry, says", [
    ("{name: s, path: ingested, train: x.jsonl}", "path: an ingest folder gives train and test; set path, or train"),
    ("{name: s, train: a.jsonl, test: b.jsonl, part: held_out}", "part: only with path"),
])
def test_an_ingest_folder_entry_given_wrong_is_one_line(folder, tmp_path, entry, says):
    (tmp_path / "c.yaml").write_text(CONFIG.replace("{name: support, path: ingested}", entry))
    with pytest.raises(UserError) as e:
        load_config(tmp_path / "c.yaml")
    assert says in str(e.value) and "c.yaml:5" in str(e.value) and "\n" not in str(e.value)


def test_a_folder_without_held_out_part_or_not_an_ingest_says_so(folder, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(UserError, match=r"plain/train.jsonl: dataset file not found \(.*not an ingest folder"):
        load_examples(str(plain / "train.jsonl"))
    (plain / "ingest.json").write_text("{}")
    with pytest.raises(UserError, match="this ingest has no held-out part; ingest again with --held-out-share"):
        load_examples(str(plain / "held_out.jsonl"))


def row(*messages: dict, **extra) -> dict:
    """A fine-tuning row with these messages and an answer."""
    return {"messages": [*messages, {"role": "assistant", "content": "Done."}], **extra}


USER = {"role": "user", "content": "Book it."}


@pytest.mark.parametrize("bad, says", [
    ({"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "book"}}]},
     "message 2 (assistant) is a tool call (tool_calls), which the search cannot train on"),
    ({"role": "tool", "tool_call_id": "c1", "content": "booked"}, "message 2 has role 'tool' (a tool's result)"),
    ({"role": "user", "content": {"order": 5}}, "message 2 (user): content is a JSON object, not text"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     "message 2 (user): a content part of type 'image_url'; a text model cannot learn from it"),
    ({"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}, "content parts must be text parts"),
    ({"role": "user", "content": None}, "message 2 (user): no text content (null)"),
    ({"role": "critic", "content": "x"}, "message 2 has role 'critic'; each message needs a role"),
])
def test_a_row_the_search_cannot_train_on_is_one_line_naming_the_feature(tmp_path, bad, says):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row(USER)) + "\n" + json.dumps(row(USER, bad)) + "\n")
    with pytest.raises(UserError) as e:
        load_examples(str(path))
    assert str(e.value).startswith(f"{path}:2: ") and says in str(e.value) and "\n" not in str(e.value)


def test_text_parts_are_read_and_dropped_names_are_noted(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    parts = {"role": "user", "name": "jane", "content": [{"type": "text", "text": "Book it."},
                                                         {"type": "text", "text": "For two."}]}
    path.write_text("\n".join(json.dumps(r) for r in (row(USER), row(parts), row(dict(USER, name="bo")))) + "\n")
    with caplog.at_level(logging.WARNING, logger="basesearch"):
        rows = load_examples(str(path))
    assert rows[1].prompt == [{"role": "user", "content": "Book it.\nFor two."}]
    said = (f"{path}:2: 2 of 3 rows name a message's author (`name`); the search drops the names (chat templates "
            "have no place for them)")
    assert [r.message for r in caplog.records] == [said]


def test_too_few_rows_for_a_search_says_what_each_step_took(tmp_path):
    from tests.test_ingest import log_line, write_lines

    words = ["parcel", "invoice", "refund", "address", "courier", "label", "locker", "tracking"]
    lines = [log_line(f"r{i}", f"question about my {w} number {i} please") for i, w in enumerate(words)]
    lines += [log_line("e1", "broken one", answer=None), log_line("c1", "cut one", finish="length"),
              log_line("d1", lines[0]["request"]["messages"][0]["content"])]
    said: list[str] = []
    m = run_ingest(IngestConfig(source=str(write_lines(tmp_path / "log.jsonl", lines)), out=str(tmp_path / "out")),
                   log=said.append)
    test = m["counts"]["split"]["test"]["rows"]
    assert test < 5 and m["counts"]["rows"] == 8
    line = (f"too few rows for a search: {8 - test} train and {test} test (it needs a training row and 5 test rows); "
            "of 11 lines, unreadable: none; dropped: 1 cut (length), 1 error; duplicates dropped: 1")
    assert said[-1] == f"warning: {line}" and f"**Warning: {line}.**" in (tmp_path / "out" / "ingest.md").read_text()


def test_the_report_and_card_name_the_ingest_behind_each_file(folder, tmp_path):
    from tasks.data.provenance import source_lines

    cfg = load_config(folder / "search.yaml")
    out = json.loads((folder / "ingested" / "ingest.json").read_text())
    lines = source_lines([*cfg.datasets, cfg.validation.dataset])
    assert len(lines) == 4  # train and test of the dataset, train and held_out of the validation
    assert all(f"{out['counts']['rows_read']:,} read, {out['counts']['rows']:,} kept" in line for line in lines)
    assert "`support` train (train.jsonl): ingest of " in lines[0] and "traffic.jsonl" in lines[0]
    assert "`support-held-out` test (held_out.jsonl)" in lines[3] and "changed" not in " ".join(lines)
    # a file edited after the ingest wrote it says so; a plain file has no line
    copy = tmp_path / "ingested"
    copy.mkdir()
    for name in ("train.jsonl", "test.jsonl", "ingest.json"):
        (copy / name).write_bytes((folder / "ingested" / name).read_bytes())
    with (copy / "train.jsonl").open("a") as f:
        f.write((folder / "ingested" / "test.jsonl").read_text().splitlines()[0] + "\n")
    spec = cfg.datasets[0].model_copy(update={"train": str(copy / "train.jsonl"), "test": str(copy / "test.jsonl")})
    edited = source_lines([spec])
    assert "train.jsonl changed since the ingest wrote it" in edited[0] and "changed" not in edited[1]
    plain = cfg.datasets[0].model_copy(update={"train": str(ROOT_DATA / "extraction_train.jsonl"),
                                               "test": str(ROOT_DATA / "extraction_test.jsonl")})
    assert source_lines([plain]) == []


ROOT_DATA = Path(__file__).resolve().parent.parent / "configs" / "demo_data"
