"""The search's own merges: the development split, the proposal rule, and a miniature search killed mid-round and
resumed (same proposals, nothing finished recomputed), then run again (nothing computed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from flows.cli import main
from tasks.config.merge_search import MergeSearchConfig
from tasks.config.schema import load_config
from tasks.data.devsplit import split_rows
from tasks.data.load import load_examples
from tasks.plan.propose import config_point, improved, kept, propose
from tasks.store.store import Store
from tests.conftest import mini_config_dict, write_config, write_jsonl


def content(rows) -> set[str]:
    """Rows as comparable text of their content."""
    return {repr((r.prompt, r.answer, r.expected)) for r in rows}


def test_dev_split_is_stable_by_content_and_never_test(tiny_data, tmp_path):
    train_path, test_path = tiny_data["extraction"]
    rows = load_examples(str(train_path))
    train, dev = split_rows(rows, 0.4)
    assert dev and train and len(train) + len(dev) == len(rows) and not content(train) & content(dev)
    # the same rows reversed and renumbered: the same development rows (content, not position or id)
    raw = [yaml.safe_load(line) for line in train_path.read_text().splitlines()]
    shuffled = write_jsonl(tmp_path / "rev.jsonl", [{**r, "id": f"x{i}"} for i, r in enumerate(reversed(raw))])
    assert content(split_rows(load_examples(str(shuffled)), 0.4)[1]) == content(dev)
    # a larger share keeps every development row of a smaller one (a threshold on a fixed hash)
    assert content(dev) <= content(split_rows(rows, 0.6)[1])
    # development rows come from the training file only
    test_rows = content(load_examples(str(test_path)))
    assert not (content(dev) - content(rows)) and not ((content(dev) & test_rows) - content(rows))


def ratings(values: dict[str, float], width: float = 10.0) -> pd.DataFrame:
    """A pooled ratings table of models with +-width intervals."""
    return pd.DataFrame([{"scope": "overall", "contender": n, "kind": "merge" if "-" in n else "candidate",
                          "rating": v, "ci_low": v - width, "ci_high": v + width} for n, v in values.items()])


def test_rule_is_deterministic_tries_each_new_family_and_skips_tried_points():
    cfg = MergeSearchConfig(rounds=2, proposals=4, methods=["slerp", "ties"])
    merges = [m for m in load_config("configs/demo.yaml").merges]
    points = [config_point(m) for m in merges]
    assert [(p.method, p.param) for p in points] == [("slerp", 0.5), ("ties", 0.5)]
    r = ratings({"hermes-zephyr-slerp": 1050, "zephyr": 1040, "hermes": 1030, "neural": 1000, "base": 990})
    ok = lambda names: True  # noqa: E731
    first = propose(r, points, cfg, "base", ok, 1)
    assert [p.name for p in first] == [p.name for p in propose(r, points, cfg, "base", ok, 1)]
    assert len(first) == 4 and len({p.name for p in first}) == 4
    # each new family (slerp of the top two, TIES of the top three other than base) gets a point before any gets two;
    # TIES, with no observation yet, starts in the middle of its range
    assert [p.rule for p in first[:2]] == ["slerp-top2", "ties-top3"]
    assert first[0].parents == ("hermes-zephyr-slerp", "zephyr") and first[1].param == 0.5
    assert first[1].recipe()["base_model"] == "base" and first[1].parents == ("hermes", "hermes-zephyr-slerp", "zephyr")
    assert all(0 < p.param < 1 and round(p.param * 100, 6) == round(p.param * 100) for p in first)
    assert "1045" in first[0].reason and first[0].record()["recipe"]["merge_method"] == "slerp"
    # round 2: a proposal leads by far -> the model proposes next to it (its kernel's length 0.1); nothing tried twice
    best = first[1]
    r2 = ratings({best.name: 1200, "hermes-zephyr-slerp": 1050, "zephyr": 1040, "hermes": 1030,
                  **{p.name: 1000 for p in first[2:] + first[:1]}})
    second = propose(r2, points + first, cfg, "base", ok, 2)
    tried = {(p.family, round(p.param, 6)) for p in points + first}
    assert all((p.family, round(p.param, 6)) not in tried for p in second)
    near = [p for p in second if p.family == best.family]
    assert near and all(abs(p.param - best.param) <= 0.1 for p in near) and "last round" in near[0].reason
    # a contender without a rating (no judgments) informs nothing and breaks nothing
    r_nan = pd.concat([r, ratings({"late": float("nan")})], ignore_index=True)
    assert [p.name for p in propose(r_nan, points, cfg, "base", ok, 1)] == [p.name for p in first]
    # nothing mergeable: only the families tried before
    assert all(p.rule == "ucb" for p in propose(r, points, cfg, "base", lambda names: False, 1))
    # the stop rule and the kept set
    assert improved(r2, [best.name])[0] and not improved(r2, ["zephyr"])[0]
    assert kept(r2, [p.name for p in first], 1) == [best.name]


def test_rule_finds_a_narrow_peak_and_never_repeats_a_point():
    """A slerp family whose true rating (no noise) is flat but for a narrow bump at t 0.83 (width 0.06, on top of
    the parents' line): five rounds of four land within 0.03 of it, every point in (0, 1), none twice."""
    cfg = MergeSearchConfig(rounds=5, proposals=4, methods=["slerp"])
    models = {"a": 1000.0, "b": 990.0, "c": 900.0}
    truth = lambda t: 1000 - 10 * t + 150 * np.exp(-(((t - 0.83) / 0.06) ** 2))  # noqa: E731
    measured, points = dict(models), []
    for r in range(1, 6):
        new = propose(ratings(measured, 5.0), points, cfg, None, lambda names: set(names) <= set(models), r)
        assert len(new) == 4
        points += new
        measured |= {p.name: truth(p.param) for p in new}
    keys = [(p.family, p.param) for p in points]
    assert len(set(keys)) == len(keys) and all(0 < p.param < 1 and p.family == points[0].family for p in points)
    pick = max(points, key=lambda p: measured[p.name])
    assert abs(pick.param - 0.83) <= 0.03, [(p.param, round(measured[p.name])) for p in points]


def search_config(tiny_models, tiny_data, tmp_path, rounds: int):
    """The miniature search with the loop on: one dataset, two proposals a round."""
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["datasets"] = cfg["datasets"][:1]
    cfg["search"] = {"rounds": rounds, "proposals": 2, "dev_share": 0.4, "patience": rounds}
    return write_config(tmp_path, cfg)


def test_dev_share_too_small_is_one_line(tiny_models, tiny_data, tmp_path, capsys):
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["search"] = {"rounds": 1, "dev_share": 0.05}
    assert main(["--config", str(write_config(tmp_path, cfg)), "--store", str(tmp_path / "s"), "--dry-run"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "search.dev_share: 0.05 of dataset 'extraction'" in err[0] and "fewer than the 5" in err[0]


def test_search_killed_mid_round_resumes_with_the_same_proposals(tiny_models, tiny_data, tmp_path, monkeypatch,
                                                                  capsys):
    import flows.steps

    config, store_dir = search_config(tiny_models, tiny_data, tmp_path, 2), tmp_path / "store"
    store = Store(str(store_dir))
    real_judge = flows.steps.judge_all

    def killed(run, datasets, outputs, *args, **kw):
        """Die at round 1's judging, after its proposals were merged, fine-tuned and answered."""
        if any(name.startswith("r1-") for outs in outputs.values() for name in outs):
            raise RuntimeError("killed mid-round")
        return real_judge(run, datasets, outputs, *args, **kw)

    monkeypatch.setattr(flows.steps, "judge_all", killed)
    with pytest.raises(RuntimeError, match="killed mid-round"):
        main(["--config", str(config), "--store", str(store_dir)])
    killed_run = max((store_dir / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    proposed = yaml.safe_load((killed_run / "search" / "round-1.yaml").read_text())
    assert len(proposed) == 2 and all(p["reason"] and p["parents"] and p["recipe"]["merge_method"] for p in proposed)
    monkeypatch.setattr(flows.steps, "judge_all", real_judge)

    assert main(["--config", str(config), "--store", str(store_dir)]) == 0
    run = store.read_text("runs/LATEST").strip()
    assert yaml.safe_load(store.read_text(f"runs/{run}/search/round-1.yaml")) == proposed
    stages = store.read_json(f"runs/{run}/stages.json")
    dev = [s for s in stages if s["stage"] in ("finetune:extraction.dev", "generate:extraction.dev")]
    # round 0 (3 models) and round 1 (2 proposals) were finished before the kill: reused, not recomputed
    assert [(s["computed"], s["reused"]) for s in dev[:4]] == [(0, 3), (0, 3), (0, 2), (0, 2)]
    assert all(s["computed"] == 0 for s in stages if s["stage"] == "search:merge r1")
    # search.refit off: the test rating's fine-tunes are the loop's (configured models from round 0, the kept
    # proposal from its round): none is trained again, they only answer the test rows
    main_ft = [s for s in stages if s["stage"] == "finetune:extraction"]
    assert main_ft and main_ft[0]["computed"] == 0 and main_ft[0]["reused"] == 4
    path = store.read_json(f"runs/{run}/search/search.json")
    assert path["kept"] and path["stop"] and path["rounds"][0]["proposals"][0]["dev"]
    assert len(path["rounds"]) == 2  # patience 2: round 1's proposals, above the leader or not, do not end the loop
    split = store.read_json(f"runs/{run}/search/split.json")[0]
    test_ids = {e.id for e in load_examples(str(tiny_data["extraction"][1]))}
    train_ids = {e.id for e in load_examples(str(tiny_data["extraction"][0]))}
    assert split["dev_share"] == 0.4 and split["dev_rows"] >= 5 and set(split["dev_ids"]) <= train_ids
    assert split["dev_file"].endswith("/dev.jsonl") and f"{store_dir}/splits/" in split["dev_file"] and test_ids
    assert not {e.id for e in load_examples(split["dev_file"])} - train_ids
    # the kept proposal is rated on the test split with every other contender, and the report tells the path
    ratings = store.read_parquet(f"runs/{run}/ratings.parquet")
    assert set(path["kept"]) <= set(ratings.loc[ratings["scope"] == "extraction", "contender"])
    report = store.read_text(f"runs/{run}/report.md")
    section = report.split("## The search's own merges")[1].split("\n## ")[0]
    assert "| round | proposal | rule |" in section and "best hand-written model" in section and "Held out" in section
    kept_recipe = yaml.safe_load(store.read_text(f"runs/{run}/search/kept.yaml"))
    assert [k["name"] for k in kept_recipe if k["kept"]] == path["kept"]
    # a kept proposal is a model of the run for flows.export
    from tasks.export.export import open_run

    assert set(path["kept"]) <= {m.name for m in open_run(store, run).config.merges}

    capsys.readouterr()
    # the plan of an unchanged re-run keys the loop's proposals and the winner as the finished run made them
    assert main(["--config", str(config), "--store", str(store_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nothing to compute" in out and f"winner of runs/{run}, a finished run of this same config" in out
    assert main(["--config", str(config), "--store", str(store_dir)]) == 0
    assert "0 results computed" in capsys.readouterr().out
    # a config changed in any way has no finished run: the loop is counted at its most again
    changed = yaml.safe_load(config.read_text())
    changed["search"]["proposals"] = 3
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    assert main(["--config", str(tmp_path / "changed.yaml"), "--store", str(store_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "up to 2 rounds x 3 proposals" in out and "nothing to compute" not in out


def test_plan_counts_the_loop_and_with_refit_off_trains_each_model_once(tiny_models, tiny_data, tmp_path):
    from tasks.plan.jobs import search_plan
    from tasks.plan.prepare import prepare

    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["datasets"] = cfg["datasets"][:1]
    plans = {}
    for refit in (False, True):
        cfg["search"] = {"rounds": 2, "proposals": 3, "dev_share": 0.4, "refit": refit}
        config = load_config(write_config(tmp_path, cfg))
        plans[refit] = search_plan(config, prepare(config), Store(str(tmp_path / "store")))
    loop = {r: [j for j in p.jobs if j.stage == "search"] for r, p in plans.items()}
    main_ft = {r: {j.rel for j in p.jobs if j.stage == "finetune"} for r, p in plans.items()}
    dev_ft = {r: {j.rel for j in jobs if j.rel and j.rel.startswith("adapters/")} for r, jobs in loop.items()}
    # refit off: the 3 models' fine-tunes are the loop's round 0 (so it only answers the development rows); on: the
    # loop fine-tunes them on the training rows minus the development rows, the adapters refit-off trains for the test
    assert not dev_ft[False] and len(main_ft[False]) == 3 and dev_ft[True] == main_ft[False] != main_ft[True]
    for r in (False, True):
        assert sum("answering extraction.dev" in j.name for j in loop[r]) == 3
        assert sum(j.name.startswith("round ") for j in loop[r]) == 2 * 3  # every round at its most
        assert sum(j.name.startswith("kept proposal") for j in loop[r]) == 1 and all(j.gpu_s > 0 for j in loop[r])
    assert any("reuse the search's fine-tunes" in a for a in plans[False].assumptions)


def test_a_finished_run_from_before_a_new_knob_is_still_this_config(tmp_path, tiny_models, tiny_data):
    from tasks.plan.previous import previous_decisions

    cfg = load_config(write_config(tmp_path, mini_config_dict(tiny_models, tiny_data)))
    store = Store(str(tmp_path / "store"))
    saved = cfg.model_dump(mode="json")
    saved["generate"].pop("engine")  # the run finished before generate.engine existed
    rel = "runs/mini-20261201-120000-abcdef"
    store.write_text(f"{rel}/config.yaml", yaml.safe_dump(saved, sort_keys=False))
    store.write_text(f"{rel}/report.html", "<html></html>")
    store.write_json(f"{rel}/frozen_winner.json", {"winner": "beta"})
    assert previous_decisions(cfg, store).winner == "beta"
    # a run of another config is not this one's
    saved["finetune"]["max_steps"] += 1
    store.write_text(f"{rel}/config.yaml", yaml.safe_dump(saved, sort_keys=False))
    assert previous_decisions(cfg, store) is None
