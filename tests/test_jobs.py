"""The plan: a cap the plan alone exceeds refuses the run in one line before any model loads; estimates scale with
the work and use the store's measured rates once there are some."""

from __future__ import annotations

import pytest
import yaml

from flows.cli import main
from tasks.config import load_config
from tasks.errors import UserError
from tasks.jobs import Job, Plan, build_plan, check_budget
from tasks.prepare import prepare
from tasks.rates import ASSUMED_RATE, record_rate
from tasks.store import Store


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
    from tasks.config import BudgetConfig

    class Cfg:
        budget = BudgetConfig(max_usd=5.0)

    with pytest.raises(UserError, match=r"budget.max_usd: .* \$5.50, \$0.50 over the cap of \$5.00"):
        check_budget(plan, Cfg())
    Cfg.budget = BudgetConfig(max_usd=6.0)
    check_budget(plan, Cfg())  # what the store already holds costs nothing


def test_estimates_use_measured_rates(mini_config, tmp_path):
    cfg = load_config(mini_config)
    prep, store = prepare(cfg), Store(str(tmp_path / "store"))
    assumed = build_plan(cfg, prep, store)
    assert any("assumed" in a for a in assumed.assumptions)
    record_rate(store, "finetune", "cpu", 1000, 10, 1.0)  # 10,000 parameter-characters/s measured
    measured = build_plan(cfg, prep, store)
    ft = lambda p: sum(j.gpu_s for j in p.jobs if j.stage == "finetune")  # noqa: E731
    assert ft(measured) == pytest.approx(ft(assumed) * ASSUMED_RATE["finetune"]["cpu"] / 10_000)
    assert [a for a in measured.assumptions if a.startswith("finetune")] == []
    longer = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"max_steps": 6})})
    assert ft(build_plan(longer, prep, store)) == pytest.approx(2 * ft(measured))  # 3 -> 6 steps: twice the time
