"""References: API models (gpt-4, gpt-3.5-turbo, anything OpenAI-compatible) answering the test rows.

Their outputs are cached like a fine-tune's, in store/outputs/<key>.parquet, keyed by the model, the endpoint,
the answer length and the test rows (never the contender's name). Rows whose call failed after the client's
retries are kept with their `error` and asked again on the next run; answered rows are never paid for twice.
A reference whose calls fail beyond tasks.api.failures.MAX_FAILED_SHARE stops the run with one line.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.api.client import Caller, endpoint_of, resolve_api_key, run_async
from tasks.api.failures import Tally, api_hint, failure_line, fatal_line, kept_line
from tasks.core.errors import EnvironmentFailure, UserError
from tasks.generate.outputs import OUTPUT_COLUMNS
from tasks.store.results import outputs_path, reference_key
from tasks.store.store import Store

if TYPE_CHECKING:
    from tasks.config.schema import ModelPrice, Reference
    from tasks.data.load import Example

REFERENCE_COLUMNS = OUTPUT_COLUMNS + ["cost_usd"]


@dataclass
class Answered:
    """What one reference task did: its outputs file, whether it was all there, requests, dollars, outcomes."""

    rel: str
    reused: bool
    requests: int = 0
    spent_usd: float = 0.0
    tally: Tally = field(default_factory=Tally)
    fatal: str | None = None  # a 401/403/404 that stopped the calls


async def _answer_all(ref: Reference, dataset: str, examples: list[Example], price: ModelPrice | None,
                      api_key: str) -> tuple[list[dict[str, Any]], Caller]:
    """Every example's answer at temperature 0: (rows, the caller with its counts and outcomes)."""
    caller = Caller(endpoint_of(ref), api_key, price, tally=Tally(planned=len(examples)))

    async def one(ex: Example) -> dict[str, Any]:
        reply = await caller.complete([dict(m) for m in ex.prompt], ref.max_tokens)
        error = reply.error or (f"refused: {reply.refusal}" if reply.content is None and reply.refusal else None)
        if reply.halted:
            caller.tally.halted += 1  # not sent: kept as failed, so asked on the next run
        else:
            caller.tally.add(error)
        return {"dataset": dataset, "example_id": ex.id, "contender": ref.name, "output": reply.content or "",
                "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                "latency_s": reply.latency_s, "error": error, "cost_usd": reply.cost_usd}

    try:
        rows = await asyncio.gather(*(one(e) for e in examples))
    finally:
        await caller.close()
    return list(rows), caller


@task(name="reference", task_run_name="reference-{dataset}", cache_policy=NO_CACHE, persist_result=False)
def reference_task(ref: Reference, dataset: str, examples: list[Example], key: str, price: ModelPrice | None,
                   store_root: str) -> Answered:
    """Prefect task: answer the rows not answered yet, keep the answered ones, write the outputs file."""
    store, rel = Store(store_root), outputs_path(key)
    with store.lock(rel):  # another run asking the same reference waits, then asks only what it left failed
        old = store.read_parquet(rel) if store.exists(rel) else None
        if old is not None:
            failed = old["error"].notna() & (old["error"].astype(str) != "")
            if not failed.any():
                return Answered(rel, True)
            todo_ids = set(old.loc[failed, "example_id"].astype(str))
            todo = [e for e in examples if e.id in todo_ids]
        else:
            todo = examples
        api_key = resolve_api_key(ref.api_key_env, ref.api_key_secret, f"references[{ref.name}]")
        rows, caller = run_async(_answer_all(ref, dataset, todo, price, api_key))
        new = pd.DataFrame(rows, columns=REFERENCE_COLUMNS)
        if old is not None:  # keep the answered rows, replace the failed ones
            keep = old[~old["example_id"].astype(str).isin(set(new["example_id"]))]
            order = {e.id: i for i, e in enumerate(examples)}
            new = pd.concat([keep, new], ignore_index=True)
            new = new.iloc[new["example_id"].astype(str).map(order).argsort()].reset_index(drop=True)
        store.write_parquet(rel, new)  # written before any failure is raised: the answered rows are kept
        return Answered(rel, False, caller.requests, caller.spent_usd, caller.tally, caller.fatal)


def check_reference_failures(ref: Reference, dataset: str, done: Answered) -> None:
    """Stop with one line when a reference failed: a rejected key or model (UserError), too many failures."""
    who = f"references[{ref.name}] on dataset '{dataset}'"
    t = done.tally
    kept = kept_line(t.done - t.failed, "answers")
    where = ref.base_url or "https://api.openai.com/v1"
    if done.fatal:
        raise UserError(fatal_line(who, done.fatal, where, ref.api_key_env, kept))
    if t.over or t.halted:
        kind = t.most_common()[0]
        hint = api_hint(kind, f"references[{ref.name}]", where) or "use another model for this reference"
        raise EnvironmentFailure(failure_line(who, "answers", t, kept, hint))


def reference_outputs(ref: Reference, dataset: str, examples: list[Example], test_fp: str,
                      prices: dict[str, ModelPrice], store_root: str) -> tuple[tuple[str, str], bool, int, float]:
    """A reference's outputs on one dataset: ((path, key), reused, requests sent, dollars spent).

    Raises UserError / EnvironmentFailure (one line) when the reference failed (check_reference_failures).
    """
    key = reference_key(ref, test_fp)
    done = reference_task(ref, dataset, examples, key, prices.get(ref.model), store_root)
    check_reference_failures(ref, dataset, done)
    return (done.rel, key), done.reused, done.requests, done.spent_usd
