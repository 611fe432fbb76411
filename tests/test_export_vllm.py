"""python -m flows.export --check vllm: the model card's own `vllm serve` command, started as a real vLLM server (the
environment BASESEARCH_VLLM_PYTHON names), answers the test rows through the openai client exactly as the search
did, every answer stopped at the end of turn with no stop ids in the request: a Qwen2.5-style ChatML model whose eos
is not its end of turn (adapter export) and a Llama-3-style model with BOS inside its template (merged export), both
head_dim 64 (vLLM's CPU attention refuses the families' default 16). Without vLLM, or when the server cannot start,
the export says so in one line.

The vLLM tests run where BASESEARCH_VLLM_PYTHON is set (.ci/run sets it); there a missing vLLM fails them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import sys
from pathlib import Path

import pytest
import yaml

from flows.export import main
from tasks.config.schema import LoadOptions
from tasks.demo.data import make_split
from tasks.export.vllm import ENV, Answer, compare_answers, server_argv
from tasks.models.chat import load_tokenizer
from tests.conftest import write_jsonl
from tests.families import FAMILIES, build_model, build_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore")
HEAD_DIM_64 = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}  # 128 / 2 heads: head_dim 64
TEST_ROWS = 8
VLLM_LINE = re.compile(r"^check \(vllm\): (\d+) of (\d+) test outputs identical to the search's, (.+)$", re.MULTILINE)
needs_vllm = pytest.mark.skipif(not os.environ.get(ENV), reason=f"{ENV} is not set (.ci/run sets it)")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """A search through the real flow over two head_dim-64 families, fine-tuned until their answers end the turn."""
    from flows.cli import main as search_main

    root = tmp_path_factory.mktemp("vllm-export")
    models = {n: build_model(n, root / n, seed=i, **HEAD_DIM_64) for i, n in enumerate(["qwen2", "llama3"])}
    train, test = make_split("classification", 32, TEST_ROWS)  # short labels: answers end well within the limit
    cfg = {
        "name": "served",
        "candidates": [{"name": n, "path": str(p)} for n, p in models.items()],
        "datasets": [{"name": "labels", "train": str(write_jsonl(root / "train.jsonl", train)),
                      "test": str(write_jsonl(root / "test.jsonl", test))}],
        "finetune": {"max_steps": 30, "batch_size": 8, "learning_rate": 0.01, "max_length": 256, "lora_r": 8,
                     "search": {"enabled": False}},
        "generate": {"max_new_tokens": 16, "batch_size": 8},
        "rating": {"bootstrap_rounds": 20},
    }
    (root / "search.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    store = root / "store"
    with contextlib.redirect_stdout(io.StringIO()):
        assert search_main(["--config", str(root / "search.yaml"), "--store", str(store)]) == 0
    return {"store": store, "run": (store / "runs" / "LATEST").read_text().strip(), "models": models, "root": root}


def export(finished: dict, out: Path, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m flows.export` in-process, with --force (the tiny models' scores
    need not beat their floors: serving is under test)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["--run", finished["run"], "--store", str(finished["store"]), "--out", str(out), "--force", *args])
    return rc, stdout.getvalue(), stderr.getvalue()


def search_outputs(finished: dict, model: str) -> list[tuple[str, str]]:
    """The search's (output, finish_reason) of `model`'s fine-tune, found by the outputs' own columns."""
    import pandas as pd

    frames = [pd.read_parquet(p) for p in (finished["store"] / "outputs").glob("*.parquet")]
    df = next(f for f in frames if set(f["contender"]) == {model})
    return list(zip(df["output"], df["finish_reason"]))


@needs_vllm
def test_chatml_adapter_whose_eos_is_not_its_end_of_turn_is_served_as_judged(finished, tmp_path):
    # What makes this model hard to serve: its own generation config stops only at <|endoftext|>, not at <|im_end|>.
    base = finished["models"]["qwen2"]
    tok = load_tokenizer(base, LoadOptions())
    im_end, eos = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"] == eos != im_end
    answers = search_outputs(finished, "qwen2")
    assert all(f == "stop" for _, f in answers) and len(answers) == TEST_ROWS  # the fine-tune learned to end the turn

    out = tmp_path / "adapter"
    rc, stdout, stderr = export(finished, out, "--model", "qwen2", "--check", "vllm")
    assert rc == 0, stderr
    # the adapter, then (which to deploy) its merged weights, each served by its own command
    every = (str(TEST_ROWS), str(TEST_ROWS), "all stopped at end of turn")
    assert VLLM_LINE.findall(stdout) == [every, every], stdout
    assert "Traceback" not in stderr

    card = (out / "README.md").read_text()
    cmd = next(x for x in card.splitlines() if x.startswith("vllm serve "))
    assert cmd == (f"vllm serve {base} --enable-lora --max-lora-rank 8 --lora-modules qwen2-labels={out} "
                   f"--chat-template {out}/chat_template.jinja --dtype float32 --generation-config {out}")
    assert f"- **Check**: check (vllm): {TEST_ROWS} of {TEST_ROWS} test outputs identical" in card
    assert "stop_token_ids" not in card  # the client sends none: the server's generation config stops
    deploy = card.split("### Which to deploy")[1].split("```")[0]
    speeds = re.search(r"merged weights (\d+) output tokens/s, the adapter (\d+) \((\d+)% of merged\)", deploy)
    assert speeds and int(speeds[1]) > 0 and int(speeds[2]) > 0, deploy
    assert f"the other form's answers: {TEST_ROWS} of {TEST_ROWS} test outputs identical" in deploy
    assert not [p for p in tmp_path.iterdir() if p.name != "adapter"]  # the other form's folder is gone
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [im_end, eos]
    for f in out.iterdir():  # a server running as another user can read every file
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


@needs_vllm
def test_llama3_merged_with_bos_in_its_template_is_served_as_judged(finished, tmp_path):
    tok = load_tokenizer(finished["models"]["llama3"], LoadOptions())
    assert tok.chat_template.startswith("{{ bos_token }}")  # the template writes BOS: a server must not add another
    out = tmp_path / "merged"
    rc, stdout, stderr = export(finished, out, "--model", "llama3", "--merged", "--check", "vllm", "--no-compare")
    assert rc == 0, stderr
    assert VLLM_LINE.findall(stdout) == [(str(TEST_ROWS), str(TEST_ROWS), "all stopped at end of turn")]
    card = (out / "README.md").read_text()
    assert "### Which to deploy" not in card  # --no-compare
    assert f"vllm serve {out} --served-model-name llama3-labels --dtype float32 --generation-config {out}\n" in card
    eot, end = tok.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert set(json.loads((out / "generation_config.json").read_text())["eos_token_id"]) == {eot, end}


def test_without_vllm_the_check_is_one_line_before_any_model_loads(finished, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    rc, stdout, stderr = export(finished, tmp_path / "a", "--check", "vllm")
    assert rc == 2 and len(stderr.splitlines()) == 1 and f"{ENV} is not set" in stderr
    monkeypatch.setenv(ENV, sys.executable)  # this environment has no vLLM
    rc, stdout, stderr = export(finished, tmp_path / "b", "--check", "vllm")
    assert rc == 2 and len(stderr.splitlines()) == 1 and "has no vLLM" in stderr, stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and "exporting" not in stdout


def test_the_prefect_flow_takes_the_engine(finished, tmp_path, monkeypatch):
    from flows.export import export as export_flow
    from tasks.core.errors import UserError

    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(UserError, match=f"--check vllm: {ENV} is not set"):
        export_flow(run=finished["run"], out=str(tmp_path / "ui"), store=str(finished["store"]), force=True,
                    check_engine="vllm")
    assert not (tmp_path / "ui").exists()


def test_a_server_that_cannot_start_is_one_line(finished, tmp_path, monkeypatch):
    """A 'python' that has vLLM as far as the probe sees, whose server dies as vLLM does on an unsupported shape."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = -c ]; then echo 0.32.0; exit 0; fi\n"
                    "echo 'INFO starting'; echo 'ValueError: Unsupported CPU attention configuration: head_dim=16'\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv(ENV, str(fake))
    rc, _, stderr = export(finished, tmp_path / "out", "--model", "qwen2", "--check", "vllm")
    assert rc == 1 and len(stderr.splitlines()) == 1, stderr
    assert "the server exited (1) before it was ready: ValueError: Unsupported CPU attention" in stderr
    assert (tmp_path / "out" / "adapter_config.json").is_file()  # the export itself stays, unchecked


def test_a_difference_names_the_rows_and_the_first_differing_token():
    tok = build_tokenizer(FAMILIES["qwen2"])
    stored = {"a": ("billing", "stop"), "b": ("the order is late", "stop"), "c": ("refund", "stop")}
    same = [Answer("billing", "stop", 2), Answer(" the order is late", "stop", 5), Answer("refund", "stop", 2)]
    assert compare_answers(["a", "b", "c"], stored, same, tok) == (
        "check (vllm): 3 of 3 test outputs identical to the search's, all stopped at end of turn", "")
    differ = [Answer("billing", "stop", 2), Answer("the order is early and late", "length", 16), same[2]]
    line, problem = compare_answers(["a", "b", "c"], stored, differ, tok)
    assert line == ("check (vllm): 2 of 3 test outputs identical to the search's, 2 of 3 stopped at end of turn "
                    "(the search's: 3)")
    want, got = (tok.convert_ids_to_tokens(tok(t, add_special_tokens=False)["input_ids"])
                 for t in ("the order is late", "the order is early and late"))
    at = next(i for i, (x, y) in enumerate(zip(want, got)) if x != y)
    assert 0 < at < len(want) and want[:at] == got[:at]  # "the order is" is shared: the difference is inside
    assert problem.startswith(f"rows that differ: b; example b, token {at}: the search wrote {want[at]!r}, "
                              f"vLLM {got[at]!r}")
    assert problem.endswith("(finish_reason length)")
    # The same text, run on to max_tokens: what a server that misses the end of turn does (special tokens after it
    # are dropped from the text); measured in bench/vllm_serving.py --ablate without --generation-config.
    ran_on = [Answer("billing", "length", 16), same[1], same[2]]
    line, problem = compare_answers(["a", "b", "c"], stored, ran_on, tok)
    assert line.startswith("check (vllm): 3 of 3 test outputs identical")
    assert line.endswith("2 of 3 stopped at end of turn (the search's: 3)")
    assert problem == ("rows that ended otherwise: a; example a: the search's answer ended with finish_reason stop, "
                       "the server's length: the server does not stop at the template's end of turn (is its "
                       "--generation-config given?)")


def test_the_server_is_the_cards_command_on_loopback():
    argv = server_argv("vllm serve /m --dtype float32 --lora-modules 'a b=/x y'", "/py", 8123)
    assert argv == ["/py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--dtype", "float32",
                    "--lora-modules", "a b=/x y", "--host", "127.0.0.1", "--port", "8123"]
