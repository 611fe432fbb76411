"""Every shipped config, in miniature, run twice under an LLM judge that fails: the re-run computes nothing new and
pays only for the judgments that failed the first time.

Each config in configs/ keeps its own judge(s), budget, search loop, references and settings; only what makes it
slow or remote is swapped: its models for the two tiny ones (and the mini merge), its datasets for the small demo
splits, its training for a few steps, and every endpoint for the fake one, which fails 3% of first attempts with a
500 (`max_retries: 0`, so they stay failed; under the 5% that stops a run). A shipped config with the metric judge alone runs twice all the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import mini_config_dict
from tests.fake_openai import Faults

KEY = "sk-test-shipped-7d2e"
ENV = "BASESEARCH_TEST_SHIPPED_KEY"
# [!.]: not a bench's temporary .bench-*.yaml beside them
CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("[!.]*.yaml"))


def _miniature(shipped: Path, tiny_models, tiny_data, base_url: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """The shipped config with tiny models, data and training, and its endpoints on the fake server; and the API
    models it names."""
    raw, mini = yaml.safe_load(shipped.read_text()), mini_config_dict(tiny_models, tiny_data)
    raw |= {k: mini[k] for k in ("candidates", "merges", "datasets", "validation")}
    raw.pop("ingredients", None)
    raw["finetune"] = mini["finetune"] | {"search": raw.get("finetune", {}).get("search", {})}
    raw["generate"] = mini["generate"]
    if raw.get("search", {}).get("rounds"):
        raw["search"] |= {"rounds": 1, "proposals": 2, "dev_share": 0.5, "base_model": "alpha"}
    for judge in raw.get("judges") or [raw.get("judge") or {}]:
        if judge.get("kind") in ("openai", "combined"):
            judge |= {"base_url": base_url, "api_key_env": ENV, "max_retries": 0}
    for ref in raw.get("references", []):
        ref |= {"base_url": base_url, "api_key_env": ENV, "max_retries": 0}
    raw.setdefault("rating", {})["bootstrap_rounds"] = 20
    path = tmp_path / shipped.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    named = [j["model"] for j in raw.get("judges") or [raw.get("judge") or {}] if j.get("model")]
    return path, named + [r["model"] for r in raw.get("references", [])]


def _failed(store, run: str) -> int:
    """LLM judgments of a run that ended in an error: the rated ones, the validation's and the judge card's repeats."""
    n = 0
    for name in ("judgments", "validation_judgments", "judge_repeats"):
        rel = f"runs/{run}/{name}.parquet"
        if store.exists(rel):
            df = store.read_parquet(rel)
            n += int(df["error"].notna().sum()) if "error" in df.columns else 0
    return n


def _keys(store, run: str, name: str) -> set[str]:
    """The judgment keys of a run's table (none when it has no such table)."""
    rel = f"runs/{run}/{name}.parquet"
    return set(store.read_parquet(rel)["key"]) if store.exists(rel) else set()


@pytest.mark.parametrize("shipped", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_an_unchanged_rerun_pays_only_for_the_judgments_that_failed(shipped, server, tmp_path, tiny_models,
                                                                     tiny_data, capsys):
    from flows.cli import main
    from tasks.store.store import Store

    config, models = _miniature(shipped, tiny_models, tiny_data, server.base_url, tmp_path)
    server.faults = Faults(rate_500=0.03, models=models)
    args = ["--config", str(config), "--store", str(tmp_path / "store")]
    assert main(args) == 0
    store = Store(str(tmp_path / "store"))
    first_run = store.read_text("runs/LATEST").strip()
    failed = _failed(store, first_run)
    llm = server.stats()["chat"] > 0
    assert failed > 0 or not llm  # the faults were met where an LLM was asked
    capsys.readouterr()

    server.faults, _ = Faults(models=models), server.reset()  # the endpoint recovers
    assert main(args) == 0
    printed = capsys.readouterr()
    out = printed.out + printed.err
    run = store.read_text("runs/LATEST").strip()
    stages = store.read_json(f"runs/{run}/stages.json")
    gpu = [s for s in stages if s["stage"].split(":")[0] in ("finetune", "generate", "floors", "merges", "search")]
    assert all(s["computed"] == 0 for s in gpu), [s for s in gpu if s["computed"]]
    # exactly the failed judgments, asked once more, and the judge card's repeat of those its fixed sample holds
    # (a judgment in the sample that failed had no first verdict to compare)
    repeated = _keys(store, first_run, "judge_repeats")
    assert _keys(store, run, "judge_repeats") >= repeated
    assert server.stats()["chat"] == failed + len(_keys(store, run, "judge_repeats") - repeated)
    assert _failed(store, run) == 0
    if failed:  # the re-run's plan names what it asks again, and nothing else
        assert "judgments that failed in runs/" in out and "asked again" in out, out
    else:
        assert "nothing to compute" in out, out
    assert main([*args, "--dry-run"]) == 0  # and now nothing at all is left
    assert "nothing to compute" in capsys.readouterr().out
