"""The plan: a cap the plan alone exceeds refuses the run in one line before any model loads; estimates scale with
the work and use the store's measured rates once there are some."""

from __future__ import annotations

import pytest
import yaml

from flows.cli import main
from tasks.compute.speeds import ASSUMED_RATE, record_rate
from tasks.config.schema import load_config
from tasks.core.errors import UserError
from tasks.plan.jobs import Job, Plan, build_plan, check_budget
from tasks.plan.prepare import prepare
from tasks.store.store import Store


def test_a_plan_over_the_gpu_cap_refuses_before_any_model_loads(mini_config, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = yaml.safe_load(mini_config.read_text())
    cfg["budget"]["max_gpu_hours"] = 1e-9
    mini_config.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(mini_config), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: budget.max_gpu_hours: the plan's fine-tunes and generations are estimated at ")
    assert not (tmp_path / "store" / "adapters").exists()


def test_the_dollar_cap_covers_judge_and_references():
    plan = Plan([Job("references", "gpt on x", "outputs/k.parquet", False, usd=3.0),
                 Job("judge", "LLM judge on x", None, False, usd=2.5), Job("judge", "old", "j", True, usd=9.0)])
    from tasks.config.schema import BudgetConfig

    class Cfg:
        budget = BudgetConfig(max_usd=5.0)

    with pytest.raises(UserError, match=r"budget.max_usd: .* \$5.50, \$0.50 over the cap of \$5.00"):
        check_budget(plan, Cfg())
    Cfg.budget = BudgetConfig(max_usd=6.0)
    check_budget(plan, Cfg())  # what the store already holds costs nothing


def test_the_search_loops_proposals_never_refuse_a_plan():
    from tasks.config.schema import BudgetConfig

    plan = Plan([Job("finetune", "a on x", "adapters/k", False, gpu_s=1800),
                 Job("search", "round 1 proposal 1 on x.dev", None, False, gpu_s=3600, optional=True)])

    class Cfg:
        budget = BudgetConfig(max_gpu_hours=1.0)

    assert plan.gpu_hours() == 1.5 and plan.gpu_hours(required=True) == 0.5
    check_budget(plan, Cfg())  # the loop stops itself before a round that would not fit
    Cfg.budget = BudgetConfig(max_gpu_hours=0.4)
    with pytest.raises(UserError, match=r"estimated at 0.500 GPU-hours, 0.100 over the cap of 0.4"):
        check_budget(plan, Cfg())


def test_the_guard_counts_only_planned_work_the_store_lacks(mini_config, tmp_path):
    from tasks.plan.jobs import Guard

    store = Store(str(tmp_path / "store"))
    import pandas as pd

    store.write_parquet("outputs/done.parquet", pd.DataFrame({"example_id": ["1"], "output": ["x"]}))
    guard = Guard(load_config(mini_config), (1.0, 1.0), planned=[
        Job("generate", "a on x", "outputs/done.parquet", False, gpu_s=5.0),  # made since the plan: not counted
        Job("finetune", "a on x", "adapters/k", False, gpu_s=2.0),
        Job("validation", "finetune winner on y", None, False, gpu_s=3.0)])  # no key until the winner is known
    assert guard.planned_s(store) == 5.0


def test_estimates_use_measured_rates(mini_config, tmp_path):
    cfg = load_config(mini_config)
    prep, store = prepare(cfg), Store(str(tmp_path / "store"))
    assumed = build_plan(cfg, prep, store)
    assert any("assumed" in a for a in assumed.assumptions)
    record_rate(store, "finetune", "cpu", 1000, 10, 1.0)  # 10,000 parameter-characters/s measured
    measured = build_plan(cfg, prep, store)
    ft = lambda p: sum(j.gpu_s for j in p.jobs if j.stage == "finetune")  # noqa: E731
    assert ft(measured) == pytest.approx(ft(assumed) * ASSUMED_RATE["finetune"]["cpu"] / 10_000)
    assert [a for a in measured.assumptions if a.startswith("finetune") and "assumed" in a] == []
    longer = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"max_steps": 6})})
    assert ft(build_plan(longer, prep, store)) == pytest.approx(2 * ft(measured))  # 3 -> 6 steps: twice the time


def test_a_batch_s_rates_are_written_once_at_its_end(tmp_path, monkeypatch):
    from tasks.compute import speeds

    store, writes = Store(str(tmp_path / "store")), []
    write = Store.write_json
    monkeypatch.setattr(Store, "write_json", lambda self, rel, obj: writes.append(rel) or write(self, rel, obj))
    with speeds.batched_rates():
        with speeds.batched_rates():  # nested (a pool run's batch inside a staying run): the outer one writes
            record_rate(store, "generate", "cpu", 100, 10, 1.0)
        record_rate(store, "generate", "cpu", 300, 10, 1.0)
        record_rate(store, "finetune", "cuda", 50, 2, 1.0)
        assert writes == [] and not store.exists("rates/generate.json")  # held while the batch goes on
    assert sorted(writes) == ["rates/finetune.json", "rates/generate.json"]  # one write per stage
    assert store.read_json("rates/generate.json") == {"cpu": [1000.0, 3000.0]}
    assert store.read_json("rates/finetune.json") == {"cuda": [100.0]}
    record_rate(store, "generate", "cpu", 500, 10, 1.0)  # outside a batch: at once, appended
    assert store.read_json("rates/generate.json") == {"cpu": [1000.0, 3000.0, 5000.0]}


def test_the_guard_stops_before_a_stage_would_cross_a_cap(mini_config):
    from tasks.config.schema import BudgetConfig
    from tasks.plan.jobs import BudgetStop, Guard

    cfg = load_config(mini_config)
    cfg = cfg.model_copy(update={"budget": BudgetConfig(max_gpu_hours=0.01, max_usd=1.0)})
    guard = Guard(cfg, (1.0, 1.0))
    guard.gpu("fine-tuning on x", 30.0)  # 30 s of a 36 s cap: goes on
    guard.gpu_s = 30.0
    with pytest.raises(BudgetStop, match=r"^budget.max_gpu_hours: stopped before generation on x: 0.00833 GPU-hours "
                                         r"spent and 0.00278 more estimated would cross the cap of 0.01; "):
        guard.gpu("generation on x", 10.0)
    guard.usd = 0.75
    guard.dollars("gpt answering x", 0.25)  # exactly at the cap: still within it
    with pytest.raises(BudgetStop, match=r"^budget.max_usd: stopped before gpt answering x: \$0.7500 spent"):
        guard.dollars("gpt answering x", 0.26)


def test_a_run_stops_mid_way_at_the_gpu_cap_and_the_next_run_goes_on(mini_config, tmp_path, capsys, monkeypatch):
    """The plan is under the cap (a store that claims a very fast device), the measured fine-tunes are not: the run
    stops before generating, says why in one line and in stopped.json, and keeps its adapters for the next run."""
    cfg = yaml.safe_load(mini_config.read_text())
    cfg.update(merges=[], datasets=cfg["datasets"][:1], validation=None)
    cfg["budget"]["max_gpu_hours"] = 0.01 / 3600  # 10 ms: the plan's estimate fits, two real fine-tunes do not
    mini_config.write_text(yaml.safe_dump(cfg))
    store = Store(str(tmp_path / "store"))
    for stage in ("finetune", "generate"):
        record_rate(store, stage, "cpu", 1e15, 1, 1.0)  # 1e15 parameter-characters per second: estimates ~0 s
    assert main(["--config", str(mini_config), "--store", store.root]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: budget.max_gpu_hours: stopped before generation on extraction: ")
    assert err[-1].endswith("raise the cap and run again to go on from there")
    assert [line for line in err if line.startswith("error:")] == err[-1:]  # one line (a UserError: no traceback)
    run = next((tmp_path / "store" / "runs").iterdir()).name
    stopped = store.read_json(f"runs/{run}/stopped.json")
    assert stopped["reason"] == err[-1].removeprefix("error: ") and stopped["gpu_hours_spent"] > 0.01 / 3600
    assert len(list((tmp_path / "store" / "adapters").iterdir())) == 2
    assert not (tmp_path / "store" / "outputs").exists()

    del cfg["budget"]["max_gpu_hours"]
    mini_config.write_text(yaml.safe_dump(cfg))
    import tasks.plan.prepare

    checks = []
    real_prepare = tasks.plan.prepare.prepare
    monkeypatch.setattr(tasks.plan.prepare, "prepare", lambda *a, **k: checks.append(1) or real_prepare(*a, **k))
    assert main(["--config", str(mini_config), "--store", store.root]) == 0
    assert len(checks) == 1  # the command line's check is handed to the flow, not repeated
    run2 = store.read_text("runs/LATEST").strip()
    stages = {s["stage"]: s for s in store.read_json(f"runs/{run2}/stages.json")}
    assert (stages["finetune:extraction"]["computed"], stages["finetune:extraction"]["reused"]) == (0, 2)
    assert stages["generate:extraction"]["computed"] == 2


@pytest.mark.parametrize("job,task", [("FinetuneJob", "tasks.train.finetune:finetune_task"),
                                      ("GenerateJob", "tasks.generate.outputs:generate_task")])
def test_a_stage_job_carries_exactly_its_task_s_arguments(job, task):
    """The job a plan emits and the task (and pool flow, flows/stages.py) that runs it meet by these names."""
    import dataclasses
    import importlib
    import inspect

    import flows.stages
    import tasks.plan.jobs as jobs

    module, name = task.split(":")
    fn = getattr(importlib.import_module(module), name).fn  # the Prefect task's own function
    fields = [f.name for f in dataclasses.fields(getattr(jobs, job))]
    assert fields == [p for p in inspect.signature(fn).parameters if p != "store_root"]
    flow = {"FinetuneJob": flows.stages.finetune_flow, "GenerateJob": flows.stages.generate_flow}[job].fn
    assert inspect.signature(flow).parameters["jobs"].annotation == f"list[{job}]"  # a batch of these jobs


def test_the_run_s_jobs_are_the_plan_s_keys(mini_config, tmp_path):
    """One source of truth: the jobs the run walks carry the keys the plan names, result for result."""
    from tasks.plan.jobs import dataset_keys, finetune_jobs, generate_jobs
    from tasks.store.results import adapter_path, outputs_path

    cfg = load_config(mini_config)
    prep = prepare(cfg)
    plan = build_plan(cfg, prep, Store(str(tmp_path / "store")))
    planned = {j.rel for j in plan.jobs if j.stage in ("finetune", "generate", "teacher")}
    models = [n for n, i in prep.models.items() if i.finetuned]
    walked = set()
    for data in prep.datasets.values():
        keys = dataset_keys(cfg, prep.models, data, models)
        ft = finetune_jobs(cfg, prep.models, data, models, {m: f"/models/{m}" for m in models}, keys)
        gen = generate_jobs(cfg, data, ft, [f"/adapters/{j.key}" for j in ft], keys)
        walked |= {adapter_path(j.key) for j in ft} | {outputs_path(j.key) for j in gen}
        walked.add(outputs_path(keys.outputs["teacher"]))
        assert [j.model_dir for j in gen] == [j.model_dir for j in ft] and all(j.load == prep.models[j.model].load
                                                                               for j in ft)
    assert walked == planned and len(walked) == len(prep.datasets) * (2 * len(models) + 1)
