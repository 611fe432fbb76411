"""python -m flows.ingest: a synthetic traffic log (10,000 requests, the issue's full size; tests/ingest_traffic.py)
comes out with the exact count of every step, no thread across the split, no secret left, the same bytes twice,
old rows on their side when rows are added; fine-tuning JSONL and Parquet sources; filters; one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from flows.ingest import main
from tasks.data.load import load_examples
from tasks.data.overlap import overlap
from tasks.ingest.config import IngestConfig
from tasks.ingest.ingest import run_ingest
from tasks.ingest.scrub import Scrubber
from tests.ingest_traffic import STATIC, write_traffic

ROOT = Path(__file__).resolve().parent.parent
FULL = 10_000  # requests in the traffic log: the size (about 6 s an ingest on 2 busy cores)


def rows(path: Path) -> list[dict]:
    """The rows of a JSONL output."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    """The log, its truth, and two ingests of it with the same options (threads grouped)."""
    root = tmp_path_factory.mktemp("traffic")
    truth = write_traffic(root / "traffic.jsonl", FULL)
    outs = []
    for name in ("out1", "out2"):
        run_ingest(IngestConfig(source=str(root / "traffic.jsonl"), out=str(root / name),
                                group_by="metadata.thread_id"))
        outs.append(root / name)
    return root, truth, outs


def test_every_step_counts_what_the_log_holds(traffic):
    _, truth, (out, _) = traffic
    m = json.loads((out / "ingest.json").read_text())
    c = m["counts"]
    assert c["lines"] == truth.lines == FULL + 1 and c["unreadable"] == {"broken JSON": 1}
    assert c["dropped"] == {"error": truth.errors, "cut (length)": truth.cut} == {"error": 150, "cut (length)": 150}
    assert c["kept_after_filters"] == truth.kept
    assert c["pii_found"] == dict(truth.pii) and c["rows_with_pii"] == truth.pii_rows >= 0.05 * FULL
    assert (c["exact_duplicates"], c["near_duplicates"]) == (truth.exact, truth.near) == (2500, 1000)
    assert c["duplicates_dropped"] == truth.exact + truth.near and c["rows"] == truth.rows
    assert c["static_prompt_rows"] == truth.static_rows and m["static_prompt"]["chars"] == len(STATIC)
    assert sum(s["rows"] for s in c["split"].values()) == truth.rows and c["rows_without_group_key"] == 0
    assert m["window"]["first"] == truth.first.isoformat() and m["window"]["last"] == truth.last.isoformat()
    assert m["outputs"]["train.jsonl"]["rows"] == c["split"]["train"]["rows"]
    report = (out / "ingest.md").read_text()
    assert "| duplicates | 9700 | 6200 | 2500 exact, 1000 near" in report and "broken JSON" in report


def test_no_thread_straddles_the_split_and_every_row_is_there(traffic):
    _, truth, (out, _) = traffic
    sides: dict[str, set[str]] = defaultdict(set)
    seen = {}
    for side in ("train", "test"):
        for row in rows(out / f"{side}.jsonl"):
            seen[row["source_ids"][0]] = side
            sides[truth.thread_of[row["source_ids"][0]]].add(side)
    assert set(seen) == set(truth.thread_of)  # every kept row once, each named by its own request id
    assert all(len(s) == 1 for s in sides.values())
    test_threads = sum(s == {"test"} for s in sides.values())
    assert 0.17 < test_threads / len(sides) < 0.23  # test_share 0.2 of the groups


def test_no_secret_is_left_and_placeholders_stand_in(traffic):
    _, _, (out, _) = traffic
    scrubber, left, placeholders = Scrubber("US", True), Counter(), Counter()
    for side in ("train", "test"):
        for row in rows(out / f"{side}.jsonl"):
            for m in row["messages"]:
                scrubber.text(m["content"], left)
                placeholders.update(k for k in ("EMAIL", "PHONE", "CARD") if f"<{k}>" in m["content"])
    assert not left and set(placeholders) == {"EMAIL", "PHONE", "CARD"}
    assert "@example.com" not in (out / "train.jsonl").read_text() + (out / "ingest.md").read_text()


def test_same_source_and_options_give_the_same_bytes(traffic):
    _, _, (out1, out2) = traffic
    names = sorted(p.name for p in out1.iterdir())
    assert names == ["ingest.json", "ingest.md", "test.jsonl", "train.jsonl"]
    assert names == sorted(p.name for p in out2.iterdir())
    for name in names:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name


def test_the_output_loads_and_passes_the_searchs_leak_check(traffic):
    _, _, (out, _) = traffic
    train, test = load_examples(str(out / "train.jsonl")), load_examples(str(out / "test.jsonl"))
    assert len(train) > 4 * len(test) / 1.5 and len(test) > 1000
    assert overlap(train, test, 0.9).count == 0


def test_adding_rows_never_moves_an_old_row_across_the_split(tmp_path):
    write_traffic(tmp_path / "week2.jsonl", 3000, seed=5, broken_at=-1)
    lines = (tmp_path / "week2.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "week1.jsonl").write_text("".join(lines[:2000]))
    for name in ("week1", "week2"):  # no --group-by: the near-duplicate clusters are the groups
        run_ingest(IngestConfig(source=str(tmp_path / f"{name}.jsonl"), out=str(tmp_path / f"out-{name}"),
                                test_share=0.3))
    side = {name: {r["id"]: s for s in ("train", "test") for r in rows(tmp_path / f"out-{name}" / f"{s}.jsonl")}
            for name in ("week1", "week2")}
    assert len(side["week2"]) > len(side["week1"]) > 1000
    assert {i: side["week2"][i] for i in side["week1"]} == side["week1"]


def log_line(rid: str, user: str, answer: str | None = "Fine.", **extra) -> dict:
    """A logged request with one user turn; `answer` None: an error."""
    model = extra.pop("model", "gpt-4o")
    row = {"id": rid, "timestamp": extra.pop("timestamp", "2025-03-04T10:00:00Z"),
           "metadata": extra.pop("metadata", {"app": "support", "thread_id": rid}),
           "request": {"model": model, "messages": extra.pop("messages", None) or [{"role": "user", "content": user}]}}
    message = extra.pop("message", {"role": "assistant", "content": answer})
    row["response"] = None if answer is None else {
        "id": f"c-{rid}", "model": f"{model}-2024-08-06",
        "choices": [{"message": message, "finish_reason": extra.pop("finish", "stop")}]}
    return row | extra


def write_lines(path: Path, lines: list) -> Path:
    """Write dicts as JSON lines (strings as they are)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def test_filters_and_content_kinds_are_each_counted(tmp_path):
    tool_call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "track", "arguments": "{\"parcel\": \"P-7\"}"}}]}
    src = write_lines(tmp_path / "log.jsonl", [
        log_line("a1", "where is parcel one"),
        log_line("a2", "where is parcel two", model="gpt-3.5-turbo"),
        log_line("a3", "where is parcel three", metadata={"app": "sales"}),
        log_line("a4", "where is parcel four", timestamp="2025-02-01T00:00:00Z"),
        log_line("a5", "where is parcel five", timestamp="2025-05-01T00:00:00Z"),
        log_line("a6", "where is parcel six", answer=None),
        log_line("a7", "where is parcel seven", finish="length"),
        log_line("a8", "where is parcel eight", answer="I'm sorry, but I can't help with that."),
        log_line("a9", "where is parcel nine", message={"role": "assistant", "content": None, "refusal": "No."}),
        log_line("b1", "where is parcel ten", answer="   "),
        log_line("b2", "", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is in"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]),
        log_line("b3", "", messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "text", "text": "where is"}, {"type": "text", "text": "parcel P-7"}]}], message=tool_call),
        log_line("b4", "I'm sorry, but I can't find my parcel", answer="I'm sorry, but I can't find it either: "
                 "it left the depot on Monday."),
    ])
    common = {"source": str(src), "models": ("gpt-4o",), "metadata": {"app": "support"}, "since": "2025-03-01",
              "until": "2025-04-01"}
    m = run_ingest(IngestConfig(out=str(tmp_path / "out"), **common))
    assert m["counts"]["dropped"] == {"model": 1, "metadata": 1, "before since": 1, "after until": 1, "error": 1,
                                      "cut (length)": 1, "refusal": 2, "empty answer": 1, "image": 1}
    assert m["counts"]["changed"] == {"developer role as system": 1, "text parts joined": 1,
                                      "tool calls as JSON text": 1}
    kept = {r["id"]: r for s in ("train", "test") for r in rows(tmp_path / "out" / f"{s}.jsonl")}
    b3 = next(r for r in kept.values() if r["source_ids"] == ["b3"])
    call = '{"tool_calls": [{"name": "track", "arguments": {"parcel": "P-7"}}]}'
    assert b3["messages"] == [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "where is\nparcel P-7"}, {"role": "assistant", "content": call}]
    assert sorted(r["source_ids"][0] for r in kept.values()) == ["a1", "b3", "b4"]
    m = run_ingest(IngestConfig(out=str(tmp_path / "out"), tool_calls="drop", **common))
    assert m["counts"]["dropped"]["tool call"] == 1 and m["counts"]["rows"] == 2
    assert m["window"]["frozen"] == {"since": "2025-03-01T00:00:00+00:00", "until": "2025-04-01T00:00:00+00:00"}


def finetune_rows() -> list[dict]:
    """Fine-tuning rows as the search's datasets hold them: one repeats another, one holds an e-mail address."""
    out = [{"id": f"r{i}", "messages": [{"role": "system", "content": "Label the ticket."},
                                         {"role": "user", "content": f"ticket {i}: the parcel {i * 7} is late"},
                                         {"role": "assistant", "content": "late"}], "expected": "late"}
           for i in range(40)]
    out[5]["messages"][1]["content"] += ", write to ann.lee@example.org"
    out.append({**out[3], "id": "r3-again"})
    return out


def test_finetuning_jsonl_and_parquet_sources_give_the_same_rows(tmp_path):
    import pandas as pd

    data = finetune_rows()
    write_lines(tmp_path / "rows.jsonl", data)
    pd.DataFrame(data).to_parquet(tmp_path / "rows.parquet")
    results = {}
    for name in ("rows.jsonl", "rows.parquet"):
        out = tmp_path / f"out-{name}"
        m = run_ingest(IngestConfig(source=str(tmp_path / name), out=str(out), prune_static=True))
        results[name] = {s: (out / f"{s}.jsonl").read_bytes() for s in ("train", "test")}
        c = m["counts"]
        assert (c["exact_duplicates"], c["rows"], c["pii_found"], c["static_prompt_rows"]) == (1, 40, {"EMAIL": 1}, 40)
        assert (out / "static_prompt.txt").read_text() == "Label the ticket."
        examples = load_examples(str(out / "train.jsonl"))
        assert examples[0].prompt[0]["role"] == "user" and examples[0].expected == "late"
    assert results["rows.jsonl"] == results["rows.parquet"]
    text = results["rows.jsonl"]["train"] + results["rows.jsonl"]["test"]
    assert b"ann.lee@" not in text and b"<EMAIL>" in text and b'"source_ids": ["r3", "r3-again"]' in text


def test_dedup_off_keeps_copies_grouped_and_keep_pii_only_counts(tmp_path):
    data = finetune_rows()
    write_lines(tmp_path / "rows.jsonl", data)
    m = run_ingest(IngestConfig(source=str(tmp_path / "rows.jsonl"), out=str(tmp_path / "out"), exact_dedup=False,
                                scrub_pii=False, held_out_share=0.2, test_share=0.3))
    c = m["counts"]
    assert (c["exact_duplicates"], c["duplicates_dropped"], c["rows"], c["pii_found"]) == (1, 0, 41, {"EMAIL": 1})
    out = {s: rows(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "test", "held_out")}
    assert all(out.values()) and sum(map(len, out.values())) == 41
    copies = [(s, r["group"]) for s, rs in out.items() for r in rs if r["source_ids"][0] in ("r3", "r3-again")]
    assert len(copies) == 2 and copies[0] == copies[1]  # one group, one side
    assert "ann.lee@example.org" in json.dumps(out) and "ann.lee" not in (tmp_path / "out" / "ingest.md").read_text()


def test_a_bad_line_is_one_error_line_naming_file_and_line(tmp_path, capsys):
    src = write_lines(tmp_path / "log.jsonl", [log_line("a1", "where is my parcel"), '{"request": {"mod',
                                               log_line("a2", "where is my other parcel")])
    assert main([str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {src}:2: broken JSON; 1 of 3 lines unreadable") and "\n" not in err
    assert main([str(src), "--out", str(tmp_path / "out"), "--max-unreadable", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert f"unreadable lines skipped: 1 broken JSON, first {src}:2: broken JSON" in printed
    assert printed.strip().endswith(str(tmp_path / "out"))
    assert main([str(src), "--out", str(tmp_path / "out"), "--since", "yesterday"]) == 2
    assert capsys.readouterr().err.startswith("error: --since: Input should be a valid datetime")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert main([str(src), "--out", str(tmp_path / "mine")]) == 2
    assert "holds files an ingest did not write (notes.txt)" in capsys.readouterr().err


def test_help_is_fast_and_imports_nothing_heavy():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.ingest", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert proc.returncode == 0 and "usage: python -m flows.ingest" in proc.stdout, proc.stderr[-2000:]
    assert not imported & {"prefect", "pandas", "datasketch", "phonenumbers", "torch", "numpy"}
