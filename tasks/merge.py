"""Merges: run a mergekit recipe over candidate folders through mergekit's Python API."""

from __future__ import annotations

import copy
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import Merge
from tasks.errors import UserError
from tasks.store import Store

STAGE_VERSION = "1"  # sharding changes files, not weights


def _swap_models(recipe: dict[str, Any], paths: dict[str, str]) -> dict[str, Any]:
    """The recipe with every candidate name replaced by its local folder (absolute, so mergekit never asks the hub)."""
    out = copy.deepcopy(recipe)

    def swap(ref: Any) -> Any:
        return paths.get(ref, ref) if isinstance(ref, str) else ref

    if "base_model" in out:
        out["base_model"] = swap(out["base_model"])
    for entry in out.get("models") or []:
        entry["model"] = swap(entry.get("model"))
    for sl in out.get("slices") or []:
        for src in sl.get("sources") or []:
            src["model"] = swap(src.get("model"))
    return out


def validate_recipe(merge: Merge, paths: dict[str, str]) -> None:
    """Raise a one-line UserError when mergekit rejects the recipe (checked before any model is loaded)."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        MergeConfiguration.model_validate(_swap_models(merge.recipe, paths))
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise UserError(f"merge '{merge.name}': recipe.{key}: {err['msg']}") from None


def recipe_fingerprint(merge: Merge, fingerprints: dict[str, str]) -> dict[str, Any]:
    """The recipe with model names replaced by fingerprints: what the merged weights depend on."""
    return _swap_models(merge.recipe, fingerprints) | {"mergekit": version("mergekit"), "stage": STAGE_VERSION}


def run_merge(merge: Merge, paths: dict[str, str], out_dir: Path) -> None:
    """Merge into `out_dir` with mergekit (lazy tensor loading), and save the recipe beside the weights."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate(_swap_models(merge.recipe, paths))
    # lazy_unpickle + one shard writer keep memory near one tensor at a time, not whole models.
    # 256 MiB output shards: the writer holds one shard in memory, not one 5 GB shard. With lazy loading the
    # inputs stay memory-mapped: a 1B bf16 merge completes under a hard cgroup limit of 1.5x one model's size
    # (bench/merge_memory.py --limit-x 1.5).
    options = MergeOptions(quiet=True, lazy_unpickle=True, copy_tokenizer=True, write_model_card=False,
                           random_seed=0, out_shard_size=256 * 2**20)
    mergekit_run(cfg, str(out_dir), options=options)
    (out_dir / "mergekit_config.yml").write_text(
        f"# {merge.name}: the recipe as written in the search config\n"
        + yaml.safe_dump(merge.recipe, sort_keys=False)
        + "# resolved to local folders:\n"
        + "\n".join(f"# {line}" for line in cfg.to_yaml().splitlines())
        + "\n"
    )


@task(name="merge", task_run_name="merge-{merge.name}", cache_policy=NO_CACHE)
def merge_task(merge: Merge, paths: dict[str, str], key: str, store_root: str) -> tuple[str, bool]:
    """Prefect task: (local folder of the merged model, whether it was already in the store)."""
    store, rel = Store(store_root), f"models/{key}"
    if store.exists(rel):
        return str(store.local_dir(rel)), True
    with store.new_dir(rel) as tmp:
        run_merge(merge, paths, tmp)
    return str(store.local_dir(rel)), False
