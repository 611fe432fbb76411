"""One batch of LLM judgments: a Prefect task that makes them concurrently and writes them as they come.

A judge that fails beyond tasks.api.failures.MAX_FAILED_SHARE of this run's calls (no verdict in its replies, a dead
server, a rejected key) stops the run with one line (check_judge_failures); what succeeded stays in the store.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.api.client import Caller, endpoint_of, resolve_api_key, run_async
from tasks.api.failures import Tally, api_hint, failure_line, fatal_line, kept_line
from tasks.core import progress
from tasks.core.errors import EnvironmentFailure, UserError
from tasks.judge.columns import JUDGMENT_COLUMNS
from tasks.judge.prompt import RESPONSE_FORMAT, judge_label, parse_verdict, shown_to_row
from tasks.store.results import judgments_path, llm_batch_key
from tasks.store.store import Store

if TYPE_CHECKING:
    from tasks.config.schema import JudgeConfig, ModelPrice

EXTRA_COLUMNS = ["key", "verdict", "hash_first", "hash_second"]  # beside JUDGMENT_COLUMNS in the LLM judge's files

# ------------------------------------------------------------------------------------------ batches


@dataclass(frozen=True)
class Call:
    """One judgment to make: what it is about and the prompt to send."""

    key: str
    dataset: str
    example_id: str
    contender_a: str
    contender_b: str
    order: str
    hash_first: str
    hash_second: str
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs


@dataclass
class BatchResult:
    """What one batch task made: its rows, requests sent, dollars spent, calls skipped for the budget, outcomes."""

    rows: pd.DataFrame
    paths: list[str]
    requests: int
    spent_usd: float
    skipped: int
    tally: Tally  # this run's outcomes so far, this batch included
    fatal: str | None = None  # a 401/403/404 that stopped the batch


async def _judge_one(
    caller: Caller, call: Call, max_tokens: int, label: str
) -> dict[str, Any] | Literal["budget", "halted"]:
    """One judgment; an unparseable or refused reply is asked again once, then recorded with its error.

    "budget" / "halted": not sent, for the dollar cap / because the endpoint had already failed.
    """
    messages = [{"role": r, "content": c} for r, c in call.messages]
    pt = ct = 0
    cost = 0.0
    raw = ""
    error = None
    verdict = None
    for attempt in range(2):
        reply = await caller.complete(messages, max_tokens, RESPONSE_FORMAT)
        if reply.skipped or reply.halted:
            if attempt == 0:
                return "budget" if reply.skipped else "halted"
            if reply.skipped:
                error = "budget: the retry of an unparseable reply would cross budget.max_usd"
            break  # halted: the first attempt's error stands
        pt, ct, cost = pt + reply.prompt_tokens, ct + reply.completion_tokens, cost + reply.cost_usd
        if reply.error:
            error = reply.error
            break
        raw = reply.content if reply.content is not None else f"refusal: {reply.refusal}"
        parsed = parse_verdict(reply.content)
        if parsed:
            verdict, error = parsed[0], None
            break
        if reply.refusal:
            error = f"refused: {reply.refusal}"
        elif reply.finish_reason == "length" and 0 < reply.completion_tokens < max_tokens:
            # A server (vLLM) shortens max_tokens to the context the prompt leaves: the prompt is what is too long.
            error = (f"unparseable (cut at the context length): the reply stopped after {reply.completion_tokens} of "
                     f"{max_tokens} tokens, where the prompt filled the model's context")
        elif reply.finish_reason == "length":
            error = f"unparseable (cut at max_tokens): no verdict in the reply's first {max_tokens} tokens"
        else:
            error = "unparseable: no verdict in the reply"
    winner, strength = shown_to_row(verdict, call.order) if verdict else ("tie", 0)
    return {
        "dataset": call.dataset, "example_id": call.example_id, "contender_a": call.contender_a,
        "contender_b": call.contender_b, "order": call.order, "winner": winner, "strength": strength,
        "judge": label, "raw": raw[:4000], "prompt_tokens": pt, "completion_tokens": ct, "cost_usd": cost,
        "error": error, "key": call.key, "verdict": verdict, "hash_first": call.hash_first,
        "hash_second": call.hash_second,
    }


class _Parts:
    """Judged rows written to the store as they come, in parts, so a killed batch loses at most one part."""

    def __init__(self, store_root: str, rows: int = 500, seconds: float = 30.0) -> None:
        """Flush every `rows` judgments or `seconds` seconds, whichever comes first."""
        self.store = Store(store_root)
        self.rows, self.seconds = rows, seconds
        self.pending: list[dict[str, Any]] = []
        self.last = time.monotonic()
        self.paths: list[str] = []

    def add(self, row: dict[str, Any]) -> None:
        """Keep one row; write the pending part when it is big or old enough."""
        self.pending.append(row)
        if len(self.pending) >= self.rows or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as one Parquet batch (atomic), named by the keys it holds."""
        if self.pending:
            df = pd.DataFrame(self.pending, columns=JUDGMENT_COLUMNS + EXTRA_COLUMNS)
            path = judgments_path(llm_batch_key(list(df['key'])))
            self.store.write_parquet(path, df)
            self.paths.append(path)
            self.pending = []
        self.last = time.monotonic()


async def _judge_all(calls: Sequence[Call], cfg: JudgeConfig, price: ModelPrice | None, usd_left: float | None,
                     api_key: str, parts: _Parts, tally: Tally, bar: progress.Bar,
                     ) -> tuple[list[dict[str, Any]], Caller, int]:
    """Every call concurrently: (rows, the caller with its counts, calls skipped for the budget)."""
    caller = Caller(endpoint_of(cfg), api_key, price, usd_left, tally=tally, structured=cfg.structured)
    tally.planned += len(calls)
    label = judge_label(str(cfg.model))

    async def one(call: Call) -> dict[str, Any] | str:
        out = await _judge_one(caller, call, cfg.max_tokens, label)
        if isinstance(out, dict):
            parts.add(out)
            tally.add(out["error"], out["raw"] if out["error"] else None)
        elif out == "halted":
            tally.halted += 1
        bar.advance()
        return out

    try:
        results = await asyncio.gather(*(one(c) for c in calls))
    finally:
        await caller.close()
        parts.flush()
    rows = [r for r in results if isinstance(r, dict)]
    return rows, caller, sum(1 for r in results if r == "budget")


@task(name="judge-llm", task_run_name="judge-llm-{n_calls}-calls", cache_policy=NO_CACHE, persist_result=False)
def judge_batch_task(calls: Any, n_calls: int, cfg: JudgeConfig, price: ModelPrice | None,
                     usd_left: float | None, store_root: str, tally: Tally | None = None) -> BatchResult:
    """Prefect task: make a batch of judgments concurrently, written to the store in parts as they come.

    `calls` is a list of Call, quoted (prefect.utilities.annotations.quote) so that Prefect does not walk
    thousands of prompts looking for futures (~0.3 s per 1,000 calls). `tally`: this run's outcomes so far.
    """
    calls = calls.unquote() if hasattr(calls, "unquote") else calls
    tally = tally or Tally()
    key = resolve_api_key(cfg.api_key_env, cfg.api_key_secret, "judge")
    parts = _Parts(store_root)
    with progress.bar(f"judge: {cfg.model}", n_calls, "calls") as bar:
        rows, caller, skipped = run_async(_judge_all(calls, cfg, price, usd_left, key, parts, tally, bar))
    df = pd.DataFrame(rows, columns=JUDGMENT_COLUMNS + EXTRA_COLUMNS)
    return BatchResult(df, parts.paths, caller.requests, caller.spent_usd, skipped, tally, caller.fatal)


def _judge_hint(cfg: JudgeConfig, kind: str) -> str:
    """What to change in the config for the judge's most common failure."""
    api = api_hint(kind, "judge", cfg.base_url or "https://api.openai.com/v1")
    if api:
        return api
    if kind == "unparseable (cut at max_tokens)":
        return (f"raise judge.max_tokens (now {cfg.max_tokens}) so that the reply reaches its verdict, or use a "
                "judge.model that answers in the asked JSON format")
    if kind == "unparseable (cut at the context length)":
        return ("the judge's prompts fill its model's context, so raising judge.max_tokens cannot help: use a "
                "judge.model with a longer context (a vLLM server: a larger --max-model-len), or shorter answers to "
                "judge (generate.max_new_tokens)")
    if kind == "refused":
        return "the model refuses to judge: use another judge.model"
    other = ("judge.structured: false if the endpoint mangles JSON output" if cfg.structured
             else "judge.structured: true (the verdict as a JSON schema)")
    return (f"the model gives no verdict in the asked format: use a stronger judge.model, a bigger judge.max_tokens "
            f"(now {cfg.max_tokens}), or {other}")


def check_judge_failures(cfg: JudgeConfig, tally: Tally, fatal: str | None) -> None:
    """Stop with one line when the judge failed: a rejected key or model (UserError), too many failures."""
    kept = kept_line(tally.done - tally.failed, "verdicts")
    if fatal:
        raise UserError(fatal_line("judge", fatal, cfg.base_url or "https://api.openai.com/v1", cfg.api_key_env, kept))
    if tally.over or tally.halted:
        hint = _judge_hint(cfg, tally.most_common()[0])
        raise EnvironmentFailure(failure_line("judge", "verdicts", tally, kept, hint))
