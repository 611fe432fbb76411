"""Judge repeatability: a fixed sample of an LLM judge's judgments asked a second time, for the judge card.

The sample is a share of the judgments the judge made by a call (`judge.repeat_share`, at least `judge.repeat_min`,
all of them when fewer: JudgeConfig.repeat_count), the ones whose keys sort first: the keys are hashes, so the
sample is an arbitrary but fixed one, and every run re-asks the same judgments. A second asking has its own key
(tasks/store/results.py `llm_repeat_key`), so the first's cached verdict never answers it, it is written to the
store like any judgment, and an unchanged re-run reuses it and pays nothing. Its dollars count like the judge's
(the run's spending, budget.max_usd). The repeats never enter the ratings: they go to their own table (the run's
judge_repeats.parquet), one row per sampled judgment with both verdicts; tasks/judge/card.py turns it into agreement
and win-rate moves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
from prefect.utilities.annotations import quote

from tasks.api.failures import Tally
from tasks.judge.card import PAIR, asked_mask, ok_mask, shown_winner
from tasks.judge.judgments import load_outputs
from tasks.judge.llm import Contest, _chunks, _expand, _from_cache, _records, cached_judgments
from tasks.judge.llm_batch import Call, check_judge_failures, judge_batch_task
from tasks.judge.prompt import judge_label
from tasks.store.results import llm_repeat_key
from tasks.store.store import Store

if TYPE_CHECKING:
    from tasks.config.schema import JudgeConfig, ModelPrice, SearchConfig
    from tasks.data.load import Example

REPEAT_COLUMNS = [*PAIR, "order", "judge", "key", "repeat_key", "verdict_first", "verdict_second", "winner_first",
                  "winner_second", "prompt_tokens", "completion_tokens", "cost_usd", "error"]
NOT_SENT = "not sent: budget.max_usd would have been crossed"


@dataclass
class RepeatRun:
    """The repeats of a run: one row per sampled judgment (REPEAT_COLUMNS), and what asking them cost now."""

    table: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=REPEAT_COLUMNS))
    requests: int = 0
    new: int = 0  # second verdicts asked now
    reused: int = 0  # second verdicts found in the store
    new_cost_usd: float = 0.0  # dollars this run spent on them: counted against budget.max_usd


def eligible(judgments: pd.DataFrame, label: str) -> pd.DataFrame:
    """The judgments this LLM judge asked by a call, one row per key (a prompt two pairs share was asked once), in key
    order: failed calls included, so that the sample stays the same when a re-run's retry of one succeeds; identical
    outputs and metric-decided rows were never asked."""
    if len(judgments) == 0 or "key" not in judgments.columns:
        return judgments.iloc[:0]
    asked = asked_mask(judgments) & (judgments["judge"] == label).to_numpy()
    return judgments[asked].drop_duplicates("key").sort_values("key", kind="stable")


def repeat_sample(judgments: pd.DataFrame, cfg: JudgeConfig) -> pd.DataFrame:
    """The judgments of this judge to ask again: of those asked, the ones whose keys sort first (keys are hashes: a
    fixed sample), less any that failed (no first verdict to compare)."""
    rows = eligible(judgments, judge_label(str(cfg.model)))
    sample = rows.head(cfg.repeat_count(len(rows)))
    answered = ok_mask(sample) & sample["verdict"].map(lambda v: isinstance(v, str)).to_numpy(dtype=bool)
    return sample[answered].assign(winner_first=lambda d: shown_winner(d))  # the verdict as given, before settling


def _repeat_calls(sample: pd.DataFrame, contest: Contest, cfg: JudgeConfig) -> list[Call]:
    """The sampled judgments' calls, rebuilt as the judge built them (the same prompt), under their repeat keys."""
    calls, _ = _expand(sample[PAIR].drop_duplicates(), contest, cfg)
    wanted = set(sample["key"])
    first = {c.key: c for c in calls if c.key in wanted}  # the other order of a sampled pair is not repeated
    return [dataclasses.replace(c, key=llm_repeat_key(c.key)) for c in first.values()]


def repeat_judge(first: pd.DataFrame, contest: Contest, cfg: JudgeConfig, price: ModelPrice | None,
                 usd_left: float | None, store_root: str) -> RepeatRun:
    """Ask one LLM judge's repeat sample a second time (what the store holds is reused); never crosses `usd_left`.

    Raises UserError / EnvironmentFailure (one line) when the judge fails, as the first judging does.
    """
    sample = repeat_sample(first, cfg)
    run = RepeatRun()
    if len(sample) == 0:
        return run
    calls = _repeat_calls(sample, contest, cfg)
    hits, todo = _from_cache(calls, _records(cached_judgments(Store(store_root), judge_label(str(cfg.model)))))
    run.reused = len(hits)
    answered, tally = [pd.DataFrame(hits)], Tally()
    for chunk in _chunks(todo, cfg.batch_size):
        left = None if usd_left is None else usd_left - run.new_cost_usd
        res = judge_batch_task(quote(list(chunk)), len(chunk), cfg, price, left, store_root, tally)
        tally = res.tally
        run.requests += res.requests
        run.new_cost_usd += res.spent_usd
        run.new += len(res.rows)
        answered.append(res.rows)
        check_judge_failures(cfg, tally, res.fatal)  # what came back is in the store already
        if res.skipped:
            break
    found = [a for a in answered if len(a)]
    run.table = _table(sample, pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=["key"]))
    return run


def _table(sample: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """One row per sampled judgment: both verdicts as given; a repeat that was not asked keeps NOT_SENT."""
    by_key = _records(second)
    rows: list[dict[str, Any]] = []
    for r in sample.to_dict("records"):
        rk = llm_repeat_key(r["key"])
        hit = by_key.get(rk)
        err = NOT_SENT if hit is None else hit["error"] if isinstance(hit["error"], str) and hit["error"] else None
        verdict = hit["verdict"] if hit is not None and isinstance(hit["verdict"], str) else None
        rows.append({**{c: r[c] for c in [*PAIR, "order", "judge", "key"]}, "repeat_key": rk,
                     "verdict_first": r["verdict"], "verdict_second": verdict, "winner_first": r["winner_first"],
                     "winner_second": None if err or verdict is None else hit["winner"],
                     "prompt_tokens": 0 if hit is None else int(hit["prompt_tokens"]),
                     "completion_tokens": 0 if hit is None else int(hit["completion_tokens"]),
                     "cost_usd": 0.0 if hit is None else float(hit["cost_usd"]), "error": err})
    return pd.DataFrame(rows, columns=REPEAT_COLUMNS)


def repeat_judges(judgments: pd.DataFrame, datasets: dict[str, list[Example]],
                  outputs: dict[str, dict[str, tuple[str, str]]], cfg: SearchConfig, store_root: str,
                  spent_usd: float = 0.0) -> RepeatRun:
    """Every LLM judge of the search asks its repeat sample of `judgments` (the test rating's) a second time.

    `outputs` maps dataset -> contender -> (outputs Parquet path, outputs key), as for run_openai_judge;
    `spent_usd`: what the run spent so far, counted against budget.max_usd with the repeats' own dollars.
    """
    total = RepeatRun()
    judges = [j for j in cfg.llm_judges() if j.repeat_share > 0 or j.repeat_min > 0]
    if not judges or len(judgments) == 0:
        return total
    store = Store(store_root)
    contest = Contest(datasets, {ds: {c: load_outputs(store, rel, c).set_index("example_id")
                                      for c, (rel, _) in outs.items()} for ds, outs in outputs.items()})
    frames = []
    for judge in judges:
        cap = cfg.budget.max_usd
        left = None if cap is None else cap - spent_usd - total.new_cost_usd
        # No metrics in the contest: the combined judge's sampled rows are those its LLM decided, and their prompts
        # do not depend on the metric.
        run = repeat_judge(judgments, contest, judge, cfg.prices.get(str(judge.model)), left, store_root)
        frames.append(run.table)
        total.requests += run.requests
        total.new += run.new
        total.reused += run.reused
        total.new_cost_usd += run.new_cost_usd
    total.table = pd.concat(frames, ignore_index=True)
    return total
