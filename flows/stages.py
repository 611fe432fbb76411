"""The GPU stages as their own flows, deployed to a work pool and called with `run_deployment` in pool mode.

Each wraps the very task that `compute.mode: local` calls in-process, with the same JSON-able arguments, so
a pool run computes exactly what a local run would and leaves it in the same place in the store. With a bucket as the
store, paths arrive as `store:<rel>` and are fetched to the worker's own disk first (tasks/store/portable.py).
Run names read like the work: merge-<merge>, finetune-<model>-<dataset>, generate-<model>-<dataset>.
"""

from __future__ import annotations

from prefect import flow

from tasks.config.schema import LoadOptions, Merge
from tasks.config.stages import FinetuneConfig, GenerateConfig
from tasks.generate.outputs import generate_task
from tasks.models.merge import merge_task
from tasks.store.portable import localized
from tasks.train.finetune import finetune_task


@flow(name="merge", flow_run_name="merge-{merge.name}")
def merge_flow(merge: Merge, paths: dict[str, str], key: str, store_root: str) -> tuple[str, bool]:
    """Merge candidates with a mergekit recipe into store/models/<key>: (folder, already there?)."""
    return merge_task(merge, localized({"paths": paths, "store_root": store_root})["paths"], key, store_root)


@flow(name="finetune", flow_run_name="finetune-{model}-{dataset}")
def finetune_flow(
    model: str, dataset: str, model_dir: str, train_path: str, cfg: FinetuneConfig, key: str, store_root: str,
    load: LoadOptions | None = None, dev_from: str = "", dev_share: float = 0.0,
) -> tuple[str, bool]:
    """LoRA fine-tune one model on one dataset into store/adapters/<key>: (folder, already there?)."""
    p = localized({"model_dir": model_dir, "train_path": train_path, "dev_from": dev_from, "store_root": store_root})
    return finetune_task(model, dataset, p["model_dir"], p["train_path"], cfg, key, store_root, load, p["dev_from"],
                         dev_share)


@flow(name="generate", flow_run_name="generate-{model}-{dataset}")
def generate_flow(
    model: str, dataset: str, model_dir: str, adapter_dir: str, test_path: str, cfg: GenerateConfig, key: str,
    store_root: str, load: LoadOptions | None = None,
) -> tuple[str, bool]:
    """One fine-tune answers one test file into store/outputs/<key>.parquet: (path, already there?)."""
    p = localized({"model_dir": model_dir, "adapter_dir": adapter_dir, "test_path": test_path,
                   "store_root": store_root})
    return generate_task(model, dataset, p["model_dir"], p["adapter_dir"], p["test_path"], cfg, key, store_root, load)
