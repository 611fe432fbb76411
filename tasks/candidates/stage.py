"""The candidates stage's Prefect tasks: every candidate's local folder, the demo zoo built first, side by side.

The plain functions are in tasks/models/fingerprint.py (which stays free of Prefect and torch, so a config is checked in a
fraction of a second) and tasks/demo/zoo.py.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.candidates.resolve import materialize
from tasks.config.schema import Candidate
from tasks.demo.zoo import ensure_zoo_models
from tasks.store.store import Store


@task(name="candidate", task_run_name="candidate-{c.name}", cache_policy=NO_CACHE)
def candidate_task(c: Candidate, store_root: str, others: list[Candidate] = ()) -> str:
    """Prefect task: the candidate's local folder (zoo model built, hub weights fetched, adapter merged, on first use).

    `others` are the search's candidates and ingredients, which an adapter's base may name.
    """
    return str(materialize(c, Store(store_root), log=get_run_logger().info, others=list(others)))


@task(name="zoo", task_run_name="zoo-{names}", cache_policy=NO_CACHE)
def zoo_task(names: list[str], store_root: str, workers: int) -> dict[str, str]:
    """Prefect task: build the missing zoo models `names` (siblings in `workers` processes): name -> folder."""
    folders = ensure_zoo_models(Store(store_root), names, workers, log=get_run_logger().info)
    return {n: str(f) for n, f in folders.items()}
