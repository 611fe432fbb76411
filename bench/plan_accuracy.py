"""How close the plan's GPU-time estimate comes to what the run then records.

    python bench/plan_accuracy.py [--config configs/demo.yaml]

1. runs the search once on a fresh store (it records the measured rates in store/rates/);
2. changes finetune.seed, so every fine-tune and generation is new work, and plans it (`--dry-run`'s plan);
3. runs that search and sums what it records: the training loops' seconds (adapters/*/train_metrics.json) and
   the generation batches' seconds (outputs' batch_s), of the results the second run added.
Also prints the first run's plan (made with the assumed rates, on the empty store) against the first run's record.

    python bench/plan_accuracy.py --llm-judge

plans and runs the demo judged by an LLM on the fake OpenAI server (tests/fake_openai.py), all pairs, with one
reference model and prices, and prints the plan's dollars against the dollars the run recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._machine import header  # noqa: E402
from tasks.config.schema import SearchConfig, load_config  # noqa: E402
from tasks.plan.jobs import build_plan  # noqa: E402
from tasks.plan.prepare import prepare  # noqa: E402
from tasks.store.store import Store  # noqa: E402


def estimate(cfg: SearchConfig, store: Path) -> dict[str, float]:
    """The plan's seconds still to compute: fine-tuning and generation (validation's included)."""
    plan = build_plan(cfg, prepare(cfg), Store(str(store)), "cpu")
    out = {"finetune": 0.0, "generate": 0.0}
    for j in plan.jobs:
        if not j.done and j.gpu_s:
            out["finetune" if j.stage == "finetune" or j.name.startswith("finetune") else "generate"] += j.gpu_s
    return out


def recorded(store: Path, before: set[str]) -> dict[str, float]:
    """Seconds recorded by the results added since `before` (names of the store's adapters and outputs)."""
    out = {"finetune": 0.0, "generate": 0.0}
    for d in (store / "adapters").iterdir():
        if d.name not in before and (d / "train_metrics.json").is_file():
            out["finetune"] += json.loads((d / "train_metrics.json").read_text())["seconds"]
    for p in (store / "outputs").glob("*.parquet"):
        df = pd.read_parquet(p)
        if p.name not in before and "finish_reason" in df:
            out["generate"] += float((df["batch_s"] / df["batch_size"]).sum())  # each batch's time, once
    return out


def run(cfg: SearchConfig, folder: Path, store: Path) -> None:
    """`python -m flows.search` on the config (written out with its paths resolved)."""
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    subprocess.run([sys.executable, "-m", "flows.search", "--config", str(path), "--store", str(store)], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def names(store: Path) -> set[str]:
    """Names of the store's adapters and outputs."""
    return {p.name for sub in ("adapters", "outputs") if (store / sub).is_dir() for p in (store / sub).iterdir()}


def dollars(cfg: SearchConfig) -> None:
    """The plan's dollars against a run's, on the fake server."""
    from tests.fake_openai import FakeOpenAI

    os.environ["BENCH_JUDGE_KEY"] = "sk-bench"
    with FakeOpenAI("sk-bench") as srv, tempfile.TemporaryDirectory() as tmp:
        api = {"base_url": srv.base_url, "api_key_env": "BENCH_JUDGE_KEY"}
        cfg = cfg.model_copy(update={
            "judge": cfg.judge.model_copy(update={"kind": "openai", "model": "judge-model", **api}),
            "references": [{"name": "gpt-ref", "model": "ref-model", **api}],
            "prices": {"judge-model": {"input": 2.5, "output": 10.0}, "ref-model": {"input": 0.5, "output": 1.5}},
            "budget": cfg.budget.model_copy(update={"strategy": "all-pairs"})})
        cfg = SearchConfig.model_validate(cfg.model_dump())
        store = Path(tmp) / "store"
        plan = build_plan(cfg, prepare(cfg), Store(str(store)), "cpu")
        run(cfg, Path(tmp), store)
        run_id = (store / "runs" / "LATEST").read_text().strip()
        stages = json.loads((store / "runs" / run_id / "stages.json").read_text())
    print(header())
    print()
    print("| stage | planned USD | recorded USD | plan / record |")
    print("|---|---|---|---|")
    for stage in ("references", "judge"):  # validation's reference answers and judging counted with their kind
        est = sum(j.usd for j in plan.jobs if not j.done and j.usd
                  and (j.stage == stage or j.stage == "validation" and ("LLM judge" in j.name) == (stage == "judge")))
        rec = sum(float(r.get("cost_usd") or 0) for r in stages if r["stage"].split(":")[0] == stage)
        print(f"| {stage} | {est:.4f} | {rec:.4f} | {est / rec if rec else float('nan'):.2f} |")
    planned = sum(float(j.name.split(": ")[-1].split()[-2]) for j in plan.jobs if "LLM judge" in j.name)
    print(f"\nplanned comparisons {planned:.0f}; the run's judge stages: "
          + "; ".join(f"{r['stage']} " + ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("stage", "seconds"))
                      for r in stages if r["stage"].startswith("judge")))


def main() -> None:
    """Two runs, one table."""
    config = sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else str(ROOT / "configs" / "demo.yaml")
    cfg = load_config(config)
    if "--llm-judge" in sys.argv:
        return dollars(cfg)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        first = estimate(cfg, store)
        run(cfg, Path(tmp), store)
        rows.append(("1st run, assumed rates (empty store)", first, recorded(store, set())))
        reseeded = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"seed": cfg.finetune.seed + 1})})
        second, before = estimate(reseeded, store), names(store)
        run(reseeded, Path(tmp), store)
        rows.append(("2nd run (new seed), measured rates", second, recorded(store, before)))
    print(header())
    print()
    print("| plan | stage | estimated s | recorded s | estimate / recorded |")
    print("|---|---|---|---|---|")
    for label, est, rec in rows:
        for stage in ("finetune", "generate"):
            ratio = est[stage] / rec[stage] if rec[stage] else float("nan")
            print(f"| {label} | {stage} | {est[stage]:.1f} | {rec[stage]:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
