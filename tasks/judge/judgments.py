"""Judgments: pairwise verdicts on (dataset, example, contender A, contender B, order).

The `metric` judge is the free, deterministic default: each output is scored against the expected answer
(or the teacher's) with the dataset's metric and the higher score wins. It sees no order, but both orders
are recorded so that its judgments have the same shape as an LLM judge's.
"""

from __future__ import annotations

import json
from itertools import combinations
from typing import TYPE_CHECKING

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.judge.columns import JUDGMENT_COLUMNS  # shared with tasks.judge.llm, which imports nothing of this module
from tasks.judge.metrics import METRICS, metric_verdict
from tasks.store.results import judgments_path, metric_judgment_key
from tasks.store.store import Store

if TYPE_CHECKING:
    from tasks.config.schema import JudgeConfig, SearchConfig
    from tasks.data.load import Example
    from tasks.judge.llm import JudgeRun as LLMRun


def metric_judgments(
    dataset: str, examples: list[Example], metric: str, outputs_a: pd.DataFrame, outputs_b: pd.DataFrame,
    cfg: JudgeConfig,
) -> pd.DataFrame:
    """Both orders of every example's comparison of contender A's outputs with contender B's."""
    score = METRICS[metric]
    a = outputs_a.set_index("example_id")
    b = outputs_b.set_index("example_id")
    name_a, name_b = a["contender"].iloc[0], b["contender"].iloc[0]
    rows = []
    for ex in examples:
        # A generation that failed has no answer to score: it scores 0, and the error is kept beside it.
        sa = 0.0 if a.at[ex.id, "error"] else score(a.at[ex.id, "output"], ex.truth)
        sb = 0.0 if b.at[ex.id, "error"] else score(b.at[ex.id, "output"], ex.truth)
        winner, strength = metric_verdict(sa, sb, cfg.strong_margin)
        raw = json.dumps({"score_a": round(sa, 4), "score_b": round(sb, 4)})
        for order in ("ab", "ba"):
            rows.append({
                "dataset": dataset, "example_id": ex.id, "contender_a": name_a, "contender_b": name_b,
                "order": order, "winner": winner, "strength": strength, "judge": f"metric:{metric}", "raw": raw,
                "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "error": None,
            })
    return pd.DataFrame(rows, columns=JUDGMENT_COLUMNS)


def metric_scores(examples: list[Example], metric: str, outputs: pd.DataFrame) -> pd.Series:
    """Each example's metric score of one contender's outputs (for the report's absolute numbers)."""
    score = METRICS[metric]
    out = outputs.set_index("example_id")
    return pd.Series({ex.id: score(out.at[ex.id, "output"], ex.truth) for ex in examples}, dtype=float)


def load_outputs(store: Store, rel: str, contender: str) -> pd.DataFrame:
    """A contender's outputs, named as in the current config (keys do not depend on names)."""
    return store.read_parquet(rel).assign(contender=contender)


@task(name="judge", task_run_name="judge-{dataset}", cache_policy=NO_CACHE)
def judge_task(
    dataset: str, examples: list[Example], metric: str, test_fp: str, outputs: dict[str, tuple[str, str]],
    cfg: JudgeConfig, store_root: str, pairs_with: str | None = None,
) -> tuple[list[tuple[str, str, str]], int]:
    """Prefect task: judge every pair of contenders (or only `pairs_with`'s) on every test row, one Parquet batch
    per pair.

    `outputs` maps contender -> (outputs Parquet path, outputs key). Returns ([(batch path, name A, name B)],
    how many batches were already in the store). A is the contender whose outputs key sorts first, so a
    batch's key does not depend on the order the config lists contenders in.
    """
    store = Store(store_root)
    pairs = [(a, b) for a, b in combinations(sorted(outputs, key=lambda n: outputs[n][1]), 2)
             if pairs_with is None or pairs_with in (a, b)]

    def pair(ab: tuple[str, str]) -> tuple[tuple[str, str, str], bool]:
        """One pair's batch: (its path, A, B), and whether it was in the store already."""
        a, b = ab
        rel = judgments_path(metric_judgment_key(cfg, metric, test_fp, outputs[a][1], outputs[b][1]))

        def judge() -> str:
            """The pair's verdicts on every example, written to the store."""
            out_a, out_b = load_outputs(store, outputs[a][0], a), load_outputs(store, outputs[b][0], b)
            return store.write_parquet(rel, metric_judgments(dataset, examples, metric, out_a, out_b, cfg))

        return (rel, a, b), store.compute_once(rel, judge)[1]  # another run judging the pair: wait, then reuse it

    done = store.each(pair, pairs)  # on an object store several pairs at once: each pair is requests, not CPU
    return [batch for batch, _ in done], sum(reused for _, reused in done)


def load_judgments(store: Store, batches: list[tuple[str, str, str] | pd.DataFrame]) -> pd.DataFrame:
    """All judged batches as one table, contenders named as in the current config.

    A batch is a metric batch (Parquet path, contender A, contender B) or the LLM judge's table of the
    judgments a run uses (already named; see run_openai_judge).
    """
    # The LLM judge's `winner` stays object dtype: an empty slice of a pandas-3 `str` column keeps `str` through
    # .map(), which tasks/rating/win_rates.py per_example_score cannot subtract from (its contenders all sit in one order).
    frames = store.each(lambda b: b.astype({"winner": object}) if isinstance(b, pd.DataFrame)
                        else store.read_parquet(b[0]).assign(contender_a=b[1], contender_b=b[2]), batches)
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=JUDGMENT_COLUMNS)


def run_openai_judge(
    datasets: dict[str, list[Example]], outputs: dict[str, dict[str, tuple[str, str]]], cfg: SearchConfig,
    store_root: str, all_pairs: bool = False, spent_usd: float = 0.0, pairs_with: str | None = None,
    judge: JudgeConfig | None = None, metrics: dict[str, str] | None = None,
) -> LLMRun:
    """The LLM judge over every dataset at once: adaptive rounds (or all pairs) pooled across datasets.

    `outputs` maps dataset -> contender -> (outputs Parquet path, outputs key), as for judge_task; `spent_usd`
    is what earlier judging in the same run cost, counted against budget.max_usd; `pairs_with` (with `all_pairs`)
    judges only that contender's pairs. `judge`: one of the search's judges (default: cfg.judge); `metrics`
    (dataset -> metric) is the ground truth's scorer for the combined judge.
    """
    judge = judge or cfg.judge
    from tasks.judge.llm import Contest, run_llm_judge

    store = Store(store_root)
    contest = Contest(
        examples=datasets,
        outputs={ds: {c: load_outputs(store, rel, c).set_index("example_id") for c, (rel, _) in outs.items()}
                 for ds, outs in outputs.items()},
        metrics=dict(metrics or {}),
    )
    budget = cfg.budget.model_copy(update={"strategy": "all-pairs"}) if all_pairs else cfg.budget
    price = cfg.prices.get(str(judge.model))
    return run_llm_judge(contest, judge, budget, price, store_root, seed=cfg.rating.seed, spent_before=spent_usd,
                         pairs_with=pairs_with)
