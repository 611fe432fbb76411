"""References: API models (gpt-4, gpt-3.5-turbo, anything OpenAI-compatible) answering the test rows.

Their outputs are cached like a fine-tune's, in store/outputs/<key>.parquet, keyed by the model, the endpoint,
the answer length and the test rows (never the contender's name). Rows whose call failed after the client's
retries are kept with their `error` and asked again on the next run; answered rows are never paid for twice.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.generate import OUTPUT_COLUMNS
from tasks.llm_judge import Caller, endpoint_of, resolve_api_key, run_async
from tasks.store import Store, content_key

if TYPE_CHECKING:
    from tasks.config import ModelPrice, Reference
    from tasks.data import Example

STAGE_VERSION = "1"
REFERENCE_COLUMNS = OUTPUT_COLUMNS + ["cost_usd"]


def reference_key(ref: Reference, test_fp: str) -> str:
    """Content key of a reference's test outputs: model, endpoint, answer length, test rows, code version."""
    return content_key("reference", ref.model, ref.base_url, ref.max_tokens, test_fp, STAGE_VERSION)


async def _answer_all(ref: Reference, dataset: str, examples: list[Example], price: ModelPrice | None,
                      api_key: str) -> tuple[list[dict[str, Any]], int, float]:
    """Every example's answer at temperature 0: (rows, requests sent, dollars spent)."""
    caller = Caller(endpoint_of(ref), api_key, price)

    async def one(ex: Example) -> dict[str, Any]:
        reply = await caller.complete([dict(m) for m in ex.prompt], ref.max_tokens)
        error = reply.error or (f"refused: {reply.refusal}" if reply.content is None and reply.refusal else None)
        return {"dataset": dataset, "example_id": ex.id, "contender": ref.name, "output": reply.content or "",
                "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                "latency_s": reply.latency_s, "error": error, "cost_usd": reply.cost_usd}

    try:
        rows = await asyncio.gather(*(one(e) for e in examples))
    finally:
        await caller.close()
    return list(rows), caller.requests, caller.spent_usd


@task(name="reference", task_run_name="reference-{dataset}", cache_policy=NO_CACHE, persist_result=False)
def reference_task(ref: Reference, dataset: str, examples: list[Example], key: str, price: ModelPrice | None,
                   store_root: str) -> tuple[str, bool, int, float]:
    """Prefect task: (outputs path, whether all of it was already there, requests sent, dollars spent)."""
    store, rel = Store(store_root), f"outputs/{key}.parquet"
    old = store.read_parquet(rel) if store.exists(rel) else None
    if old is not None:
        failed = old["error"].notna() & (old["error"].astype(str) != "")
        if not failed.any():
            return rel, True, 0, 0.0
        todo_ids = set(old.loc[failed, "example_id"].astype(str))
        todo = [e for e in examples if e.id in todo_ids]
    else:
        todo = examples
    api_key = resolve_api_key(ref.api_key_env, ref.api_key_secret, f"references[{ref.name}]")
    rows, requests, spent = run_async(_answer_all(ref, dataset, todo, price, api_key))
    new = pd.DataFrame(rows, columns=REFERENCE_COLUMNS)
    if old is not None:  # keep the answered rows, replace the failed ones
        keep = old[~old["example_id"].astype(str).isin(set(new["example_id"]))]
        order = {e.id: i for i, e in enumerate(examples)}
        new = pd.concat([keep, new], ignore_index=True)
        new = new.iloc[new["example_id"].astype(str).map(order).argsort()].reset_index(drop=True)
    store.write_parquet(rel, new)
    return rel, False, requests, spent


def reference_outputs(ref: Reference, dataset: str, examples: list[Example], test_fp: str,
                      prices: dict[str, ModelPrice], store_root: str) -> tuple[tuple[str, str], bool, int, float]:
    """A reference's outputs on one dataset: ((path, key), reused, requests sent, dollars spent)."""
    key = reference_key(ref, test_fp)
    rel, reused, requests, spent = reference_task(ref, dataset, examples, key, prices.get(ref.model), store_root)
    return (rel, key), reused, requests, spent
