"""The LLM judge: pairwise verdicts from any OpenAI-compatible endpoint, cached per judgment, never paid twice.

A judgment's key is (judge model, prompt version, dataset, example, hash of the output shown first, hash of the
output shown second): the order is part of it, contender names are not, so renaming a contender or adding one
costs nothing for the pairs already judged. Judged batches are Parquet files under judgments/ whose rows carry
that key; every such row with a verdict already in the store is reused, whichever batch or run wrote it.

Calls run asynchronously inside one Prefect task per batch (tasks/judge/llm_batch.py, over tasks/api/client.py:
concurrency cap, pacing, the client's own retries). A judge that fails beyond tasks.api.failures.MAX_FAILED_SHARE
of this run's calls (no verdict in its replies, a dead server, a rejected key) stops the run with one line;
what succeeded stays in the store.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence, TypeVar

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from prefect.utilities.annotations import quote

from tasks.api.failures import Tally
from tasks.judge.card import consistency_stats, longer_won, output_lengths
from tasks.judge.columns import JUDGMENT_COLUMNS
from tasks.judge.llm_batch import EXTRA_COLUMNS, Call, check_judge_failures, judge_batch_task
from tasks.judge.metrics import METRICS, metric_verdict
from tasks.judge.prompt import conversation_text, judge_label, judge_messages, shown_to_row, text_hash
from tasks.store.keys import content_key
from tasks.store.results import JUDGMENTS_GLOB, llm_judgment_key
from tasks.store.store import Store

if TYPE_CHECKING:
    from tasks.config.schema import BudgetConfig, JudgeConfig, ModelPrice
    from tasks.data.load import Example

T = TypeVar("T")


# -------------------------------------------------------------------------------------------- cache

_CACHE_LOCK = threading.Lock()
_FILE_ROWS: dict[tuple[str, str], pd.DataFrame | None] = {}  # (store root, file) -> its judge rows, or None


def cached_judgments(store: Store, label: str) -> pd.DataFrame:
    """Every finished judgment of this judge in the store, one row per key (files are read once per process)."""
    files = sorted(store.fs.glob(store.path(JUDGMENTS_GLOB)))
    frames = []
    cols = ["key", "verdict", "raw", "prompt_tokens", "completion_tokens", "cost_usd", "error", "judge"]
    for f in files:
        memo = (store.root, f)
        with _CACHE_LOCK:
            known = memo in _FILE_ROWS
            df = _FILE_ROWS.get(memo)
        if not known:
            df = None
            with store.fs.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                if {"key", "verdict"} <= set(pf.schema_arrow.names):  # a metric batch has no judgment keys
                    df = pf.read(columns=cols).to_pandas()
            with _CACHE_LOCK:
                _FILE_ROWS[memo] = df
        if df is not None and len(df):
            frames.append(df[df["judge"] == label])
    if not frames:
        return pd.DataFrame(columns=cols).set_index("key")
    df = pd.concat(frames, ignore_index=True)
    # Only a verdict is final. A failed call, and a reply without a verdict, are asked again on the next run: the
    # run that made them stopped (tasks.api.failures), or left them out of the ratings, and the config may have changed
    # since (judge.max_tokens, judge.structured: neither is in the key).
    final = df["error"].isna() | (df["error"].astype(str) == "")
    return df[final].drop_duplicates("key", keep="last").set_index("key")


# -------------------------------------------------------------------------------------------- rounds


@dataclass
class Contest:
    """What the LLM judge compares: per dataset, the examples and every contender's outputs."""

    examples: dict[str, list[Example]]  # dataset -> test rows
    outputs: dict[str, dict[str, pd.DataFrame]]  # dataset -> contender -> outputs indexed by example_id
    metrics: dict[str, str] = field(default_factory=dict)  # dataset -> metric (the combined judge's ground truth)


@dataclass
class JudgeRun:
    """The judgments a search uses and how they were obtained."""

    judgments: pd.DataFrame
    stop_reason: str
    requests: int = 0
    new: int = 0
    reused: int = 0
    free: int = 0  # identical outputs, failed generations, metric verdicts: decided without a call
    metric_decided: int = 0  # combined judge: judgments the metric decided (its scores differed), of `free`
    cost_usd: float = 0.0  # dollars of every judgment used (cached ones included: paid by earlier runs)
    new_cost_usd: float = 0.0  # dollars spent by this run: the only ones counted against budget.max_usd
    longer_won: float | None = None  # share of decided judgments won by the longer output
    batches: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        """The numbers for the report's stage table."""
        out = {"requests": self.requests, "cost_usd": round(self.new_cost_usd, 4),
               "judge_usd_total": round(self.cost_usd, 4), "stop": self.stop_reason,
               **consistency_stats(self.judgments), "longer_won": self.longer_won}
        return out | ({"metric_decided": self.metric_decided} if self.metric_decided else {})


def reference_text(ex: Example, mode: str) -> str | None:
    """The reference answer shown to the judge for an example."""
    if mode == "none":
        return None
    if ex.expected is not None:
        return ex.expected if isinstance(ex.expected, str) else json.dumps(ex.expected, ensure_ascii=False)
    return ex.answer if mode == "expected-or-teacher" else None


def _orders(cfg: JudgeConfig, slot_key: str) -> list[str]:
    """Both orders, or one order drawn from the slot's hash (the same draw on every re-run, so it is cached)."""
    if cfg.both_orders:
        return ["ab", "ba"]
    return ["ab" if int(slot_key[:8], 16) % 2 == 0 else "ba"]


def _metric_row(base: dict[str, Any], ex: Example, metric: str | None, oa: dict[str, Any], ob: dict[str, Any],
                cfg: JudgeConfig) -> dict[str, Any] | None:
    """Combined judge: the metric's verdict (without the order) where the row's `expected` separates the two outputs.

    A failed output scores 0, as with the metric judge. None: no metric here, no `expected`, or equal scores (the LLM
    judge decides those).
    """
    if metric is None or ex.expected is None:
        return None
    score = METRICS[metric]
    sa = 0.0 if oa["error"] else score(oa["output"], ex.expected)
    sb = 0.0 if ob["error"] else score(ob["output"], ex.expected)
    if sa == sb:
        return None
    winner, strength = metric_verdict(sa, sb, cfg.strong_margin)
    return base | {"winner": winner, "strength": strength, "judge": f"metric:{metric}", "error": None, "key": None,
                   "verdict": None, "raw": json.dumps({"score_a": round(sa, 4), "score_b": round(sb, 4)})}


def _expand(plan: pd.DataFrame, contest: Contest, cfg: JudgeConfig) -> tuple[list[Call], list[dict[str, Any]]]:
    """Planned comparisons -> calls to make, and rows decided without a call (identical or failed outputs, and with
    the combined judge the metric's verdicts where ground truth separates the outputs)."""
    model = str(cfg.model)
    label = judge_label(model)
    calls: list[Call] = []
    free: list[dict[str, Any]] = []
    by_id = {ds: {e.id: e for e in exs} for ds, exs in contest.examples.items()}
    table = _output_table(contest)
    metrics = contest.metrics if cfg.kind == "combined" else {}
    conv_cache: dict[tuple[str, str], tuple[str, str | None, str]] = {}
    for ds, ex_id, ca, cb in plan[["dataset", "example_id", "contender_a", "contender_b"]].itertuples(index=False):
        if (ds, ex_id) not in conv_cache:
            ex = by_id[ds][ex_id]
            conv, ref = conversation_text(ex.prompt), reference_text(ex, cfg.reference)
            conv_cache[ds, ex_id] = (conv, ref, text_hash(conv + "\x00" + (ref if ref is not None else "\x01")))
        conv, ref, ex_hash = conv_cache[ds, ex_id]
        oa, ob = table[ds, ca, ex_id], table[ds, cb, ex_id]
        ha, hb = oa["hash"], ob["hash"]
        base = {"dataset": ds, "example_id": ex_id, "contender_a": ca, "contender_b": cb, "judge": label,
                "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
        decided = _metric_row(base, by_id[ds][ex_id], metrics.get(ds), oa, ob, cfg) if metrics else None
        for order in _orders(cfg, content_key(ds, ex_id, *sorted([ha, hb]))):
            first, second = (oa, ob) if order == "ab" else (ob, oa)
            hf, hs = (ha, hb) if order == "ab" else (hb, ha)
            if decided is not None:
                free.append(decided | {"order": order, "hash_first": hf, "hash_second": hs})
                continue
            key = llm_judgment_key(model, ds, ex_id, ex_hash, hf, hs)
            failed = [n for n, o in ((ca, oa), (cb, ob)) if o["error"]]
            if failed:
                free.append(base | {"order": order, "winner": "tie", "strength": 0, "raw": "",
                                    "error": f"output: {', '.join(failed)} failed to answer", "key": key,
                                    "verdict": None, "hash_first": hf, "hash_second": hs})
            elif ha == hb:
                free.append(base | {"order": order, "winner": "tie", "strength": 0, "raw": "identical outputs",
                                    "error": None, "key": key, "verdict": "A=B", "hash_first": hf,
                                    "hash_second": hs})
            else:
                msgs = judge_messages(conv, ref, str(first["output"]), str(second["output"]))
                calls.append(Call(key, ds, ex_id, ca, cb, order, hf, hs,
                                  tuple((m["role"], m["content"]) for m in msgs)))
    return calls, free


def _output_table(contest: Contest) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(dataset, contender, example) -> {output, error, hash}: plain dicts, ~50x faster than DataFrame.loc."""
    table = {}
    for ds, outs in contest.outputs.items():
        for c, df in outs.items():
            for ex, out, err in zip(df.index, df["output"], df["error"]):
                text = "" if out is None else str(out)
                table[ds, c, str(ex)] = {"output": text, "error": err if isinstance(err, str) and err else None,
                                         "hash": text_hash(text)}
    return table


def _records(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Judgment rows by key, as plain dicts (a dict lookup is ~100x faster than DataFrame.loc)."""
    if "key" in df.columns:
        df = df.drop_duplicates("key", keep="last").set_index("key")
    return df.to_dict("index")


def _from_cache(calls: list[Call], cache: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Call]]:
    """Rows for the calls already judged (renamed to this run's contenders), and the calls still to make."""
    rows, todo = [], []
    for c in calls:
        hit = cache.get(c.key)
        if hit is not None:
            verdict = hit["verdict"] if isinstance(hit["verdict"], str) else None
            winner, strength = shown_to_row(verdict, c.order) if verdict else ("tie", 0)
            rows.append({"dataset": c.dataset, "example_id": c.example_id, "contender_a": c.contender_a,
                         "contender_b": c.contender_b, "order": c.order, "winner": winner, "strength": strength,
                         "judge": hit["judge"], "raw": hit["raw"], "prompt_tokens": int(hit["prompt_tokens"]),
                         "completion_tokens": int(hit["completion_tokens"]), "cost_usd": float(hit["cost_usd"]),
                         "error": hit["error"] if isinstance(hit["error"], str) else None, "key": c.key,
                         "verdict": verdict, "hash_first": c.hash_first, "hash_second": c.hash_second})
        else:
            todo.append(c)
    return rows, todo


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    """Consecutive slices of at most `size` items."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_llm_judge(
    contest: Contest, cfg: JudgeConfig, budget: BudgetConfig, price: ModelPrice | None, store_root: str, seed: int = 0,
    spent_before: float = 0.0, pairs_with: str | None = None,
) -> JudgeRun:
    """Judge in rounds planned by tasks.judge.rounds.plan_round (adaptive or all-pairs) until it gives a stop reason.

    `pairs_with`: judge only this contender's pairs (all-pairs strategy). `spent_before`: dollars new judging cost
    earlier in the same run. Cached judgments cost nothing now (an
    earlier run paid for them): only new spending counts against budget.max_usd, and it never crosses it.
    Raises UserError / EnvironmentFailure (one line) when the judge fails (check_judge_failures).
    """
    from tasks.judge.rounds import plan_round

    store = Store(store_root)
    label = judge_label(str(cfg.model))
    cache = _records(cached_judgments(store, label))
    contenders = sorted({c for outs in contest.outputs.values() for c in outs})
    examples = {ds: [e.id for e in exs] for ds, exs in contest.examples.items()}
    rng = np.random.default_rng(seed)  # the same plan on every re-run, so a re-run finds every judgment cached
    run = JudgeRun(pd.DataFrame(columns=JUDGMENT_COLUMNS + EXTRA_COLUMNS), "")
    frames: list[pd.DataFrame] = []
    done = run.judgments
    tally = Tally()
    orders = 2 if cfg.both_orders else 1  # judgments each planned comparison makes (see _orders)
    while True:
        plan, reason = plan_round(contenders, examples, done, budget, rng, spent_usd=spent_before + run.new_cost_usd,
                                  orders=orders, pairs_with=pairs_with)
        if reason:
            run.stop_reason = reason
            break
        if len(plan) == 0:
            run.stop_reason = "nothing left to judge"
            break
        calls, free = _expand(plan, contest, cfg)
        hits, todo = _from_cache(calls, cache)
        run.free += len(free)
        run.metric_decided += sum(r["judge"] != label for r in free)
        run.reused += len(hits)
        # Two contenders with the same output make the same prompt: it is asked once and answers both.
        first: dict[str, Call] = {}
        dups = [c for c in todo if first.setdefault(c.key, c) is not c]
        todo = list(first.values())
        new_rows: list[pd.DataFrame] = []
        skipped = 0
        for chunk in _chunks(todo, cfg.batch_size):
            usd_left = None if budget.max_usd is None else budget.max_usd - spent_before - run.new_cost_usd
            res = judge_batch_task(quote(list(chunk)), len(chunk), cfg, price, usd_left, store_root, tally)
            tally = res.tally
            run.requests += res.requests
            run.new_cost_usd += res.spent_usd
            run.cost_usd += res.spent_usd
            run.new += len(res.rows)
            skipped += res.skipped
            run.batches += res.paths
            new_rows.append(res.rows)
            check_judge_failures(cfg, tally, res.fatal)  # the rows so far are in the store already
            if res.skipped:
                break
        run.cost_usd += sum(float(h["cost_usd"]) for h in hits)  # for the report, not the budget
        if dups and new_rows:
            answered = _records(pd.concat(new_rows, ignore_index=True))
            dup_rows, _ = _from_cache(dups, answered)
            # Paid once, by the row it was asked for: the copies cost nothing more.
            free += [r | {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0} for r in dup_rows]
            run.free += len(dup_rows)
        round_df = pd.concat([pd.DataFrame(free + hits, columns=JUDGMENT_COLUMNS + EXTRA_COLUMNS), *new_rows],
                             ignore_index=True)
        frames.append(round_df)
        done = pd.concat(frames, ignore_index=True)
        if skipped:
            run.stop_reason = (f"dollar budget reached: ${spent_before + run.new_cost_usd:.4f} spent of "
                               f"${budget.max_usd:.2f}; {skipped} calls not sent")
            break
    # One order whatever came from the store and what was asked now, so a re-run's table is the same.
    done = done.sort_values(["dataset", "example_id", "contender_a", "contender_b", "order"], kind="stable")
    done = done.reset_index(drop=True)
    run.judgments = settle_disagreements(done) if len(done) else done
    run.longer_won = longer_won(done, output_lengths(contest.outputs))  # from the verdicts as given
    return run


def settle_disagreements(df: pd.DataFrame) -> pd.DataFrame:
    """A pair whose two orders name opposite winners counts as a tie in both rows (the verdicts stay in `verdict`)."""
    ok = df["error"].isna() | (df["error"].astype(str) == "")
    both = df[ok].groupby(["dataset", "example_id", "contender_a", "contender_b"])["winner"].agg(
        lambda w: set(w) == {"a", "b"} and len(w) == 2)
    flip = both[both].index
    if len(flip) == 0:
        return df
    idx = pd.MultiIndex.from_frame(df[["dataset", "example_id", "contender_a", "contender_b"]])
    mask = idx.isin(flip) & ok.to_numpy()
    out = df.copy()
    out.loc[mask, "winner"] = "tie"
    out.loc[mask, "strength"] = 0
    return out
