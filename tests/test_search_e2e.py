"""End to end: a miniature search through the real Prefect flow, then a re-run that reuses everything."""

from __future__ import annotations

import pandas as pd

from flows.cli import main
from tasks.config.schema import load_config
from tasks.plan.jobs import build_plan
from tasks.plan.prepare import prepare
from tasks.store.store import Store

OUTPUT_COLUMNS = {"dataset", "example_id", "contender", "output", "prompt_tokens", "completion_tokens", "latency_s", "error"}
JUDGMENT_COLUMNS = {"dataset", "example_id", "contender_a", "contender_b", "order", "winner", "strength", "judge", "raw",
                    "prompt_tokens", "completion_tokens", "cost_usd", "error"}
RATING_COLUMNS = {"scope", "contender", "kind", "rating", "ci_low", "ci_high", "n_comparisons", "win_rate", "rank"}


def plan_counts(out: str) -> dict[str, tuple[int, int]]:
    """stage -> (needed, in store) from the plan table the command line prints."""
    rows = [line.split() for line in out.splitlines()]
    return {r[0]: (int(r[1]), int(r[2])) for r in rows if len(r) == 6 and r[1].isdigit()}


def test_mini_search_runs_and_reruns_from_store(mini_config, tmp_path, capsys):
    store_dir = tmp_path / "store"
    # The dry run: every result the config implies, none in the empty store; nothing computed.
    assert main(["--config", str(mini_config), "--store", str(store_dir), "--dry-run"]) == 0
    counts = plan_counts(capsys.readouterr().out)
    # 2 local candidates (read in place), 1 merge, 3 models x 2 datasets, 2 teachers, 6 pairs x 2 datasets,
    # validation: winner + baseline fine-tunes and outputs, and the held-out teacher
    assert counts == {"candidates": (2, 2), "merges": (1, 0), "finetune": (6, 0), "generate": (6, 0),
                      "teacher": (2, 0), "floors": (8, 0), "judge": (12, 0), "validation": (5, 0)}
    assert not (store_dir / "adapters").exists()
    assert main(["--config", str(mini_config), "--store", str(store_dir)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[-1].startswith("report: ") and lines[-1].endswith("report.html")
    assert "alpha-beta" in out and "teacher" in out
    # the closing lines lead with the verdict: tiny random models fine-tuned a few steps learn nothing, which the
    # search says instead of recommending one (floors: each base untuned, the trivial answer)
    closing = out[out.index("no recommendation: no fine-tune beat both its untuned base and the trivial answer"):]
    closing = closing.splitlines()
    assert "(pooled leader: " in closing[0]
    assert [line.split(":")[0] for line in closing[1:3]] == ["  no recommendation for extraction",
                                                              "  no recommendation for classification"]
    assert closing[3].startswith("  validation on the held-out orders: ") and "against teacher" not in closing[3]
    assert any(line.startswith("  extraction: ") and " against the teacher (" in line for line in closing)
    # the whole ranking from rank 1, the teacher marked as a reference (it beats every tiny student here: unbeaten,
    # rated by a lower bound only)
    table = closing[closing.index(next(line for line in closing if line.startswith("ranking, all datasets"))) + 1:]
    assert table[1].split()[:4] == ["1", "teacher", "reference", "unbeaten"]
    assert {"alpha", "beta", "alpha-beta"} <= {line.split()[1] for line in table[2:5]}

    store = Store(str(store_dir))
    run = store.read_text("runs/LATEST").strip()
    for name in ("config.yaml", "ratings.parquet", "judgments.parquet", "validation.json", "report.md",
                 "report.html", "ratings.png", "frozen_winner.json"):
        assert store.exists(f"runs/{run}/{name}"), name
    ratings = store.read_parquet(f"runs/{run}/ratings.parquet")
    assert RATING_COLUMNS <= set(ratings.columns)
    assert set(ratings["scope"]) == {"overall", "extraction", "classification"}
    assert set(ratings.loc[ratings.scope == "overall", "contender"]) == {"alpha", "beta", "alpha-beta", "teacher"}
    judgments = store.read_parquet(f"runs/{run}/judgments.parquet")
    assert JUDGMENT_COLUMNS | {"kind_a", "kind_b"} <= set(judgments.columns)
    assert set(judgments["kind_a"]) | set(judgments["kind_b"]) == {"candidate", "merge", "reference"}
    assert set(judgments["order"]) == {"ab", "ba"}
    # the judged outputs' lengths (characters) travel with the judgments, for rating.length_control and flows.rank
    assert judgments[["len_a", "len_b"]].notna().all().all() and (judgments[["len_a", "len_b"]] >= 0).all().all()
    # 4 contenders -> 6 pairs, x 6 test rows x 2 orders, x 2 datasets
    assert len(judgments) == 6 * 6 * 2 * 2
    outputs = pd.concat(pd.read_parquet(p) for p in (store_dir / "outputs").glob("*.parquet"))
    assert OUTPUT_COLUMNS <= set(outputs.columns)
    validation = store.read_json(f"runs/{run}/validation.json")
    assert validation["winner"] in {"alpha", "beta", "alpha-beta"}
    # models x datasets, plus the winner and the baseline on the held-out set (the runner-up if the baseline won)
    assert len(list((store_dir / "adapters").iterdir())) == 3 * 2 + 2
    opponents = {r["opponent"] for r in validation["against"]}
    assert len(opponents - {"teacher", validation["winner"]}) == 1 and ("alpha" in opponents) != (validation["winner"] == "alpha")
    assert len(list((store_dir / "models").glob("*/mergekit_config.yml"))) == 1
    assert {r["opponent"] for r in validation["against"]} >= {"teacher"}
    report = store.read_text(f"runs/{run}/report.md")
    assert "Validation on the held-out dataset" in report
    assert report.index("## Verdict") < report.index("## Ranking") and "**No recommendation: " in report
    lifts = report.split("## Did fine-tuning work?")[1].split("\n## ")[0]
    assert sum(line.endswith("| did not learn |") for line in lifts.splitlines()) == 6  # 3 models x 2 datasets
    # each fine-tune's training figures (3 models x 2 datasets) and example outputs side by side
    fine_tunes = report.split("## Fine-tunes")[1].split("##")[0]
    assert sum(line.startswith(("| alpha |", "| beta |", "| alpha-beta |")) for line in fine_tunes.splitlines()) == 6
    assert "### extraction\n\n| example | prompt | expected | teacher | " in report.split("## Example outputs")[1]
    # validation judged only the pairs it reports: the winner against each opponent
    held = store.read_parquet(f"runs/{run}/validation_judgments.parquet")
    pairs = {frozenset(pair) for pair in zip(held["contender_a"], held["contender_b"])}
    assert pairs == {frozenset((validation["winner"], o)) for o in opponents}
    # the run followed its plan: every result the plan names with a key is in the store now
    plan = build_plan(load_config(mini_config), prepare(load_config(mini_config)), store)
    assert [j.name for j in plan.jobs if j.rel and not store.exists(j.rel)] == []

    # The measured speed is in the store for the next plan; a dry run now finds everything there.
    assert set(store.read_json("rates/finetune.json")) == {"cpu"} and store.read_json("rates/generate.json")["cpu"]
    assert main(["--config", str(mini_config), "--store", str(store_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nothing to compute" in out and "assumption" not in out

    # Second run: nothing trained, generated or judged again.
    assert main(["--config", str(mini_config), "--store", str(store_dir)]) == 0
    out = capsys.readouterr().out
    assert "0 results computed" in out
    by_stage = next(line for line in out.splitlines() if line.startswith("by the plan's stages (computed/reused): "))
    assert "finetune 0/6" in by_stage and "generate 0/6" in by_stage and "validation 0/" in by_stage
    run2 = store.read_text("runs/LATEST").strip()
    stages = store.read_json(f"runs/{run2}/stages.json")
    assert all(s["computed"] == 0 for s in stages if s["stage"].split(":")[0] in ("merges", "finetune", "generate", "judge"))
    pd.testing.assert_frame_equal(store.read_parquet(f"runs/{run2}/ratings.parquet"), ratings)


def test_the_closing_counts_use_the_plan_s_stages():
    from flows.search import stage_counts

    rows = [{"stage": s, "computed": c, "reused": r} for s, c, r in [
        ("check", 9, 0), ("candidates", 0, 4), ("finetune:x.dev", 3, 0), ("search:merge r1", 1, 0),
        ("finetune:x", 0, 3), ("generate:x", 3, 0), ("judge:x", 6, 0), ("rate", 99, 0), ("finetune:held", 2, 0)]]
    assert stage_counts(rows, "held") == {"candidates": (0, 4), "search": (4, 0), "finetune": (0, 3),
                                          "generate": (3, 0), "judge": (6, 0), "validation": (2, 0)}
