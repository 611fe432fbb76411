"""python -m flows.ingest relabel: a stronger model's answers written beside the originals (never over them),
through the judge's client against the project's fake OpenAI-compatible server: exact answers and token counts, the
pruned static prompt sent back, the dollar cap, a re-run that pays only for what is missing, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.ingest import main
from tasks.data.load import load_examples
from tasks.ingest.config import IngestConfig, RelabelConfig
from tasks.ingest.ingest import run_ingest
from tasks.ingest.relabel import run_relabel
from tests.fake_openai import FakeOpenAI
from tests.ingest_traffic import STATIC, write_traffic

KEY = "sk-relabel-test-9876543210"
ENV = "BASESEARCH_TEST_RELABEL_KEY"
STRONG = "strong-model"


def rows(path: Path) -> list[dict]:
    """A JSONL file's rows."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def folder(tmp_path) -> Path:
    """An ingest of 80 logged requests, static prompt pruned."""
    write_traffic(tmp_path / "log.jsonl", 80, seed=11, broken_at=-1)
    run_ingest(IngestConfig(source=str(tmp_path / "log.jsonl"), out=str(tmp_path / "data"), prune_static=True))
    return tmp_path / "data"


@pytest.fixture
def server(monkeypatch):
    """The fake server serving the strong model, its key in the environment."""
    monkeypatch.setenv(ENV, KEY)
    with FakeOpenAI(api_key=KEY) as srv:
        srv.faults.models = [STRONG]
        yield srv


def config(srv: FakeOpenAI, folder: Path, **extra) -> RelabelConfig:
    """Relabel `folder` with the strong model on the fake server."""
    return RelabelConfig(**{"folder": str(folder), "model": STRONG, "base_url": srv.base_url, "api_key_env": ENV,
                            "concurrency": 4, **extra})


def sent_text(row: dict, static: str | None) -> str:
    """What the fake server sees of a regenerate request: every message's content, the static prompt first."""
    prompt = [m["content"] for m in row["messages"][:-1]]
    first_system = row["messages"][0]["role"] == "system"
    return "\n".join(([static] if static and not first_system else []) + prompt)


def test_regenerated_answers_are_written_beside_the_originals(server, folder):
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    m = run_relabel(config(server, folder, price_input=2.0, price_output=8.0))
    train = rows(folder / "train.jsonl")
    new = rows(folder / "train.relabeled.jsonl")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in before} == before  # originals untouched
    assert [r["id"] for r in new] == [r["id"] for r in train] and all(r["relabeled"] for r in new)
    for old, r in zip(train, new):
        last_user = next(x["content"] for x in reversed(old["messages"]) if x["role"] == "user")
        assert r["messages"][-1] == {"role": "assistant", "content": f"{STRONG} answers: {last_user[:60]}"}
        assert r["original"] == old["messages"][-1]["content"] and r["messages"][:-1] == old["messages"][:-1]
    # the pruned static prompt went back into every request: the fake counts len(text) // 4 prompt tokens
    prompt_tokens = sum(max(1, len(sent_text(r, STATIC)) // 4) for r in train)
    completion_tokens = sum(max(1, len(r["messages"][-1]["content"]) // 4) for r in new)
    s = m["splits"]["train"]
    assert (s["prompt_tokens"], s["completion_tokens"]) == (prompt_tokens, completion_tokens)
    assert s["outcomes"] == {"relabeled": len(train)} and s["changed"] == len(train) and m["requests"] == len(train)
    assert m["spent_usd"] == pytest.approx((2.0 * prompt_tokens + 8.0 * completion_tokens) / 1e6, abs=1e-6)
    assert server.stats()["chat"] == len(train) and server.stats()["models"] == 1  # one preflight
    assert KEY not in (folder / "relabel.json").read_text() and len(load_examples(str(folder / "train.relabeled.jsonl")))


def test_the_dollar_cap_stops_asking_and_the_next_run_asks_only_the_rest(server, folder):
    train = rows(folder / "train.jsonl")
    m = run_relabel(config(server, folder, price_input=1000.0, price_output=1000.0, max_usd=3.0, max_tokens=100))
    s = m["splits"]["train"]
    skipped = s["outcomes"].get("not sent: dollar cap", 0)
    assert 0 < skipped < len(train) and s["outcomes"]["relabeled"] == len(train) - skipped
    assert m["spent_usd"] <= 3.0 and m["requests"] == len(train) - skipped == server.stats()["chat"]
    kept = [r for r in rows(folder / "train.relabeled.jsonl") if not r["relabeled"]]
    assert len(kept) == skipped and all(r["messages"][-1]["content"] == r["original"] for r in kept)
    server.reset()
    m2 = run_relabel(config(server, folder, price_input=1000.0, price_output=1000.0, max_tokens=100))
    assert server.stats()["chat"] == skipped and m2["splits"]["train"]["reused"] == len(train) - skipped
    assert m2["splits"]["train"]["outcomes"] == {"relabeled": len(train)}
    # a new ingest into the folder keeps relabel's files: the next relabel asks only new rows
    run_ingest(IngestConfig(source=str(folder.parent / "log.jsonl"), out=str(folder), prune_static=True))
    server.reset()
    run_relabel(config(server, folder, price_input=1000.0, price_output=1000.0, max_tokens=100))
    assert server.stats()["chat"] == 0


def test_revise_sends_the_instructions_and_the_original_answer(server, folder, tmp_path):
    (tmp_path / "how.txt").write_text("Answer in one sentence, politely.")
    m = run_relabel(config(server, folder, mode="revise", instructions=str(tmp_path / "how.txt"), splits=("test",)))
    new = rows(folder / "test.relabeled.jsonl")
    assert m["splits"]["test"]["outcomes"] == {"relabeled": len(new)} and not (folder / "train.relabeled.jsonl").exists()
    assert all(r["messages"][-1]["content"].startswith(f"{STRONG} answers: Below are a conversation") for r in new)
    # the relabeled test rows are answered as the originals are: the pruned static prompt added back
    variant, plain = load_examples(str(folder / "test.relabeled.jsonl")), load_examples(str(folder / "test.jsonl"))
    assert [e.prompt for e in variant] == [e.prompt for e in plain]
    assert sum(e.prompt[0] == {"role": "system", "content": STATIC} for e in variant) > 0.8 * len(variant)
    with pytest.raises(Exception, match="made with other settings"):  # another mode never mixes with these answers
        run_relabel(config(server, folder, splits=("test",)))


@pytest.mark.parametrize("extra, says", [
    (["--mode", "revise"], "--instructions: --mode revise needs a file of instructions"),
    (["--max-usd", "5"], "--max-usd: a dollar cap needs the model's prices"),
    (["--api-key-env", "BASESEARCH_NO_SUCH_KEY"], "relabel: the API key is missing: set $BASESEARCH_NO_SUCH_KEY"),
    (["--model", "no-such-model"], "relabel: model 'no-such-model' not found"),
])
def test_relabel_mistakes_are_one_line(server, folder, capsys, extra, says):
    argv = ["relabel", str(folder), "--model", STRONG, "--base-url", server.base_url, "--api-key-env", ENV, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and err.count("\n") == 0 and KEY not in err
    assert not (folder / "train.relabeled.jsonl").exists() and server.stats()["chat"] <= 1


def test_relabel_from_the_command_line(server, folder, capsys):
    argv = ["relabel", str(folder), "--model", STRONG, "--base-url", server.base_url, "--api-key-env", ENV,
            "--split", "train", "--split", "test"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(folder) and out[1].startswith("train: ") and "answers changed" in out[1]
    assert (folder / "train.relabeled.jsonl").exists() and (folder / "test.relabeled.jsonl").exists()


def test_the_search_reads_both_variants_as_datasets(server, folder):
    from tasks.config.schema import load_config
    from tasks.plan.prepare import load_dataset

    run_relabel(config(server, folder))
    (folder.parent / "search.yaml").write_text(
        "name: variants\ncandidates: [{name: base, path: zoo:base}]\ndatasets:\n"
        "  - {name: support, path: data}\n"
        "  - {name: support-relabeled, train: data/train.relabeled.jsonl, test: data/test.jsonl}\n")
    plain, relabeled = (load_dataset(d) for d in load_config(folder.parent / "search.yaml").datasets)
    assert [e.id for e in plain.train] == [e.id for e in relabeled.train] and plain.test == relabeled.test
    assert all(a.answer != b.answer and b.answer.startswith(f"{STRONG} answers: ")
               for a, b in zip(plain.train, relabeled.train))
    assert plain.train_fp != relabeled.train_fp and plain.test_fp == relabeled.test_fp  # only the training rows differ


def test_the_relabel_flow_run_completes_and_keeps_the_key_out_of_the_run(server, folder):
    import yaml

    from flows.ingest import relabel
    from tests.test_ingest_flow import run_of

    state = relabel(config(server, folder, splits=("test",)), return_state=True)
    assert state.is_completed(), state
    assert state.result() == json.loads((folder / "relabel.json").read_text())
    assert len(rows(folder / "test.relabeled.jsonl")) == len(rows(folder / "test.jsonl"))
    run, logs, _ = run_of(state)
    assert run.name == f"relabel-{folder}" and KEY not in json.dumps(run.parameters) + logs
    listed = yaml.safe_load((Path(__file__).resolve().parent.parent / "deployments" / "prefect.yaml").read_text())
    ui = next(d for d in listed["deployments"] if d["entrypoint"] == "flows/ingest.py:relabel")
    assert ui["name"] == "ui" and RelabelConfig(**ui["parameters"]["config"]).model == "gpt-4o"
