"""The judge card on a small judgments table, every number computed by hand; the combined judge and several judges
against the fake OpenAI-compatible server (tests/fake_openai.py); their config errors in one line."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.data.load import Example
from tasks.judge.card import agreement, metric_winners, output_lengths, position_consistency, shown_winner
from tasks.report.judge_card import card_section, card_table

LLM = "openai:judge-model@prompt-v1"

# Four examples of one pair (x, y), expected answer and each contender's output (lengths chosen: x is the longer on
# e1 and e2, y on e3 and e4). The exact metric: e1 x right, e2 y right, e3 x right, e4 both wrong (a tie).
EXPECTED = {"e1": "long answer", "e2": "ok", "e3": "yes", "e4": "zzz"}
OUT_X = {"e1": "long answer", "e2": "wrong wrong", "e3": "yes", "e4": "aa"}
OUT_Y = {"e1": "short", "e2": "ok", "e3": "no no no no", "e4": "bbbbbbbb"}
# The LLM's verdicts (A = the output shown first; order ba shows y first):
#   e1 ab A>B -> x, ba B>A -> x: consistent      e2 ab A>B -> x, ba A>B -> y: inconsistent (position bias)
#   e3 ab A=B, ba A=B: consistent (ties)          e4 ab B>>A -> y, ba A>>B -> y: consistent
VERDICTS = {("e1", "ab"): ("A>B", "a"), ("e1", "ba"): ("B>A", "a"), ("e2", "ab"): ("A>B", "a"),
            ("e2", "ba"): ("A>B", "b"), ("e3", "ab"): ("A=B", "tie"), ("e3", "ba"): ("A=B", "tie"),
            ("e4", "ab"): ("B>>A", "b"), ("e4", "ba"): ("A>>B", "b")}
METRIC = {"e1": "a", "e2": "b", "e3": "a", "e4": "tie"}


def _table() -> pd.DataFrame:
    """8 LLM rows (disagreeing orders settled as ties in `winner`, as the judge stores them), 8 metric rows, 1 failed."""
    rows = []
    for (ex, order), (verdict, shown) in VERDICTS.items():
        settled = "tie" if ex == "e2" else shown
        rows.append({"dataset": "d", "example_id": ex, "contender_a": "x", "contender_b": "y", "order": order,
                     "winner": settled, "strength": 0 if settled == "tie" else 1, "judge": LLM, "error": None,
                     "verdict": verdict, "raw": "{}", "hash_first": f"h{ex}{order}", "hash_second": f"k{ex}{order}"})
    for ex, w in METRIC.items():
        for order in ("ab", "ba"):
            rows.append({"dataset": "d", "example_id": ex, "contender_a": "x", "contender_b": "y", "order": order,
                         "winner": w, "strength": 0 if w == "tie" else 2, "judge": "metric:exact", "error": None,
                         "verdict": None, "raw": "{}", "hash_first": None, "hash_second": None})
    rows.append({"dataset": "d", "example_id": "e1", "contender_a": "x", "contender_b": "z", "order": "ab",
                 "winner": "tie", "strength": 0, "judge": LLM, "error": "timeout", "verdict": None, "raw": "",
                 "hash_first": "p", "hash_second": "q"})
    return pd.DataFrame(rows)


def _world() -> tuple[dict, dict, dict]:
    """(examples, metrics, outputs) of the table above."""
    examples = {"d": [Example(ex, [{"role": "user", "content": ex}], "teacher", want) for ex, want in EXPECTED.items()]}
    outputs = {"d": {c: pd.DataFrame({"example_id": list(o), "output": list(o.values()), "error": None})
                     for c, o in (("x", OUT_X), ("y", OUT_Y))}}
    return examples, {"d": "exact"}, outputs


def test_card_numbers_match_the_hand_count():
    df = _table()
    examples, metrics, outputs = _world()
    # the verdicts as given, not the settled winners: e2's two rows name x then y
    assert shown_winner(df[df.judge == LLM]).tolist()[:4] == ["a", "a", "a", "b"]
    assert position_consistency(df) == (0.75, 4)  # e1, e3, e4 of 4 pairs seen both ways
    win = metric_winners(df, examples, metrics, outputs)
    assert win[df.judge == LLM].tolist()[:8] == ["a", "a", "b", "b", "a", "a", "tie", "tie"]
    assert pd.isna(win.iloc[-1])  # contender z has no outputs: no metric verdict
    card = card_table(df, output_lengths(outputs), win).set_index("judge")
    llm, metric = card.loc[LLM], card.loc["metric"]
    assert (llm["judgments"], llm["failed"], metric["judgments"]) == (8, 1, 8)
    # 6 decisive verdicts (e1 x2, e2 x2, e4 x2); the longer output won e1 x2, e2's ab and e4 x2
    assert (llm["longer_won"], llm["longer_won_n"]) == (5 / 6, 6)
    # where the metric separates (e1, e2, e3: 6 rows): agrees on e1 x2 and e2's ba; e3's ties do not agree
    assert (llm["agreement_share"], llm["agreement_n"], llm["agreement_examples"]) == (0.5, 6, 3)
    assert llm["agreement_ties"] == pytest.approx(2 / 6)
    # 3 examples with 2, 1, 0 agreeing: drawing e3 three times (1/27 = 3.7% > 2.5%) gives 0, e1 three times 1
    assert (llm["agreement_low"], llm["agreement_high"]) == (0.0, 1.0)
    assert pd.isna(metric["consistency"]) and metric["agreement_n"] == 0  # the metric is not checked against itself


def test_agreement_interval_resamples_examples_not_judgments():
    # 20 examples, 2 judgments each that agree or disagree together (15 of 20 agree): the interval must be that of
    # 20 draws, not 40. Wilson on 40 independent judgments is 0.59..0.86 (0.26 wide); 20 clusters give ~0.38.
    rows = [{"dataset": "d", "example_id": str(i), "contender_a": "x", "contender_b": "y", "order": o,
             "winner": "a" if i < 15 else "b", "judge": LLM, "error": None} for i in range(20) for o in ("ab", "ba")]
    df = pd.DataFrame(rows)
    out = agreement(df, pd.Series("a", index=df.index), 0.95, rounds=2000, seed=1)
    assert out["share"] == 0.75 and out["n"] == 40 and out["examples"] == 20
    assert out["low"] < 0.75 < out["high"] and out["high"] - out["low"] > 0.3


def test_card_section_warns_below_the_threshold_and_names_it():
    examples, metrics, outputs = _world()
    lines, warnings = card_section(_table(), examples, metrics, outputs, confidence=0.95)
    text = "\n".join(lines)
    assert "## Judge card" in text and "75% (4)" in text and "83% (6)" in text  # consistency, longer output won
    assert "50% (95% CI 0%-100%, 6)" in text  # the table's cell
    assert "names the metric's winner in 50% of 6 judgments on 3 examples (95% CI 0%-100%); ties there 33%" in text
    assert len(warnings) == 1 and "50%" in warnings[0] and "below 70%" in warnings[0] and "\n" not in warnings[0]
    assert "**Warning:**" in text
    metric_only = _table()[lambda d: d.judge != LLM]
    assert card_section(metric_only, examples, metrics, outputs) == ([], [])  # no LLM judge, no card


def test_a_failed_output_scores_zero_for_the_metric():
    examples, metrics, outputs = _world()
    x = outputs["d"]["x"]
    x.loc[x.example_id == "e1", "error"] = "generation failed"  # its text, the right answer, is not scored
    win = metric_winners(_table(), examples, metrics, outputs)
    assert win.iloc[0] == "tie"  # x 0 (failed) against y 0 (wrong)


# ------------------------------------------------------------------------------- against the fake server

from tests.fake_openai import Faults  # noqa: E402
from tests.test_llm_judge import ALL, ENV, KEY, _cfg, _judge_flow, _outputs  # noqa: E402


def _truth_contest(combined: bool = True):
    """best right everywhere, half right on even examples, worst never; example 7 has no `expected`."""
    from tasks.judge.llm import Contest

    examples = [Example(str(i), [{"role": "user", "content": f"Name item {i}."}], f"item {i} teacher",
                        None if i == 7 else f"item {i} red box") for i in range(8)]
    outs = {"best": _outputs("best", [f"item {i} red box" for i in range(8)]),
            "half": _outputs("half", [f"item {i} red box" if i % 2 == 0 else f"item {i} blue" for i in range(8)]),
            "worst": _outputs("worst", ["no idea at all"] * 8)}
    return Contest({"d": examples}, {"d": outs}, {"d": "exact"} if combined else {})


def test_combined_judge_asks_the_llm_only_where_the_metric_ties(server, tmp_path):
    from tasks.rating.rate import rate

    run = _judge_flow(_truth_contest(), _cfg(server).model_copy(update={"kind": "combined"}), ALL, None, str(tmp_path / "a"))
    # LLM calls, by hand: half vs worst on the odd examples (both wrong: 0 = 0), 4 x 2 orders = 8; example 7 (no
    # `expected`) for best-half and best-worst, 2 x 2 = 4. best-half on the even examples are identical outputs:
    # tied without a call (8). The metric decides the other 28 of the 3 pairs x 8 examples x 2 orders = 48.
    assert server.stats()["chat"] == 12 and run.requests == 12
    df = run.judgments
    assert len(df) == 48 and run.metric_decided == 28 and run.stats()["metric_decided"] == 28
    assert df["judge"].value_counts().to_dict() == {"metric:exact": 28, "openai:judge-model@prompt-v1": 20}
    metric = df[df["judge"] == "metric:exact"]
    assert set(metric["example_id"]) == set("0123456") and metric["cost_usd"].sum() == 0
    overall = rate(df).query("scope == 'overall'").set_index("contender")["rank"]
    assert overall.to_dict() == {"best": 1, "half": 2, "worst": 3}
    # the plain LLM judge on the same outputs: every pair whose outputs differ, 48 - 8 identical = 40 judgments,
    # of which half vs worst on the even examples repeat best vs worst's prompts (half = best there): 32 calls
    server.reset()
    _judge_flow(_truth_contest(False), _cfg(server), ALL, None, str(tmp_path / "b"))
    assert server.stats()["chat"] == 32


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("case, expected", [
    ("both", "give either judge: (one judge) or judges: (several, pooled), not both"),
    ("combined-in-list", "judges[1]: kind combined is a judge of its own"),
    ("twice", "judges[1]: the same judge as judges[0] (openai, model judge-model)"),
    ("empty", "judges: List should have at least 1 item"),
    ("no-model", "judges.1: the openai judge needs a model id"),
    ("combined-no-model", "judge: the combined judge needs a model id"),
])
def test_judge_config_errors_are_one_line(tmp_path, tiny_models, tiny_data, case, expected):
    from tests.conftest import config_error, mini_config_dict, write_config

    cfg = mini_config_dict(tiny_models, tiny_data)
    llm = {"kind": "openai", "model": "judge-model", "base_url": "http://127.0.0.1:9/v1", "api_key_env": ENV}
    cfg["judges"] = {"both": [{"kind": "metric"}], "combined-in-list": [{"kind": "metric"}, llm | {"kind": "combined"}],
                     "twice": [llm, llm], "empty": [], "no-model": [{"kind": "metric"}, {"kind": "openai"}],
                     "combined-no-model": None}[case]
    if case == "both":
        cfg["judge"] = llm
    if case == "combined-no-model":
        cfg["judge"] = {"kind": "combined"}
        del cfg["judges"]
    msg = config_error(write_config(tmp_path, cfg))
    assert expected in msg and "search.yaml" in msg, msg


# ------------------------------------------------------------------------------------------ whole searches


def test_two_judges_pooled_then_the_combined_judge_on_the_same_store(server, tmp_path, tiny_models, tiny_data,
                                                                    capsys, caplog):
    import os
    from pathlib import Path

    import yaml

    from flows.cli import main
    from tasks.store.store import Store
    from tests.conftest import mini_config_dict

    caplog.set_level("DEBUG")
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg.update(merges=[], datasets=cfg["datasets"][:1])
    cfg["finetune"]["max_steps"] = 1
    llm = {"kind": "openai", "model": "judge-model", "base_url": server.base_url, "api_key_env": ENV}
    cfg["judges"] = [{"kind": "metric"}, llm]
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    store_dir = tmp_path / "store"
    server.faults = Faults(prefer_first=True)  # a position-biased judge: "A>B" whatever it is shown
    assert main(["--config", str(path), "--store", str(store_dir)]) == 0
    warned = capsys.readouterr().err + caplog.text
    store = Store(str(store_dir))
    run = store.read_text("runs/LATEST").strip()
    judgments = store.read_parquet(f"runs/{run}/judgments.parquet")
    label = "openai:judge-model@prompt-v1"
    assert set(judgments["judge"]) == {"metric:json", label}
    pooled = store.read_parquet(f"runs/{run}/ratings.parquet")
    by_judge = store.read_parquet(f"runs/{run}/ratings_by_judge.parquet")
    assert set(by_judge["judge"]) == {"metric", label}
    assert {"scope", "contender", "kind", "rating", "ci_low", "ci_high", "n_comparisons", "win_rate", "rank"} <= set(
        pooled.columns)
    # the pooled fit counts every judge's judgments; each judge's own fit only its own
    n = lambda df: df[df.scope == "overall"].groupby("contender")["n_comparisons"].sum()  # noqa: E731
    pd.testing.assert_series_equal(n(pooled), n(by_judge), check_names=False)
    report = store.read_text(f"runs/{run}/report.md")
    assert "Judges (pooled): `metric`, `openai judge-model`" in report
    assert "## Judge card" in report and "### Ratings per judge" in report and "names the metric's winner in" in report
    assert server.stats()["chat"] > 0
    # half its verdicts name the first shown: it agrees with ground truth on about half, and the run says so
    assert "**Warning:** judge openai:judge-model@prompt-v1 agrees with ground truth on only" in report
    assert "agrees with ground truth on only" in warned and "below 70%" in warned
    assert "| openai:judge-model@prompt-v1 | 36 | 50% | 0% (18) |" in report  # no comparison consistent

    # The same search with the combined judge: outputs and LLM verdicts are all in the store, and the LLM is asked
    # only where the metric ties, so not one request is sent.
    cfg.pop("judges")
    cfg["judge"] = llm | {"kind": "combined"}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    server.reset()
    assert main(["--config", str(path), "--store", str(store_dir)]) == 0
    assert server.stats()["chat"] == 0
    run2 = store.read_text("runs/LATEST").strip()
    j2 = store.read_parquet(f"runs/{run2}/judgments.parquet")
    counts = j2["judge"].value_counts()
    assert counts["metric:json"] > 0 and counts[label] > 0
    assert not store.exists(f"runs/{run2}/ratings_by_judge.parquet")
    report2 = store.read_text(f"runs/{run2}/report.md")
    assert "judgments decided by the metric where ground truth separated the outputs" in report2
    assert "not measured: the metric decided every comparison its ground truth separates" in report2

    out = capsys.readouterr()
    leaks = [p for p in store_dir.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    leaks += [p for p in Path(os.environ["PREFECT_HOME"]).rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leaks == [] and KEY not in out.out + out.err + caplog.text + warned


def test_the_plan_counts_every_judge_at_its_own_price(mini_config, tmp_path):
    from tasks.config.schema import SearchConfig, load_config
    from tasks.plan.jobs import build_plan
    from tasks.plan.prepare import prepare
    from tasks.store.store import Store

    base = load_config(mini_config)
    prep, store = prepare(base), Store(str(tmp_path / "store"))  # metric judge: no endpoint is asked
    llm = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}
    raw = base.model_dump() | {"prices": {"m1": {"input": 10.0, "output": 10.0}, "m2": {"input": 1.0, "output": 1.0}}}
    pooled = SearchConfig.model_validate(raw | {"judges": [{"kind": "metric"}, llm | {"model": "m1"},
                                                           llm | {"model": "m2"}]})
    plan = build_plan(pooled, prep, store)
    usd = {m: sum(j.usd for j in plan.jobs if m in j.name) for m in ("LLM judge m1", "LLM judge m2")}
    # 2 datasets + the held-out one, each judge; same comparisons, prices 10x apart
    assert sum("LLM judge m1" in j.name for j in plan.jobs) == 3 and sum("LLM judge m2" in j.name for j in plan.jobs) == 3
    assert usd["LLM judge m1"] == pytest.approx(10 * usd["LLM judge m2"]) and usd["LLM judge m2"] > 0
    metric = [j for j in plan.jobs if j.stage == "judge" and j.rel]  # the metric judge's batches, as with judge: metric
    assert metric == [j for j in build_plan(base, prep, store).jobs if j.stage == "judge"]
    combined = SearchConfig.model_validate(raw | {"judge": llm | {"model": "m1", "kind": "combined"}})
    plan = build_plan(combined, prep, store)
    assert sum(j.usd for j in plan.jobs if "combined judge" in j.name) == pytest.approx(usd["LLM judge m1"])
    assert any("the combined judge pays only where the metric ties" in a for a in plan.assumptions)
