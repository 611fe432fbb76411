"""Where the GPU stages run: each takes a batch of jobs and returns their results in order.

`compute.mode: local` runs every job in this process, one after another (a single GPU or CPU gains nothing
from running two trainings at once). The jobs' arguments are JSON-able, so that a work pool can take them
as deployment parameters with identical code and results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.finetune import finetune_task
from tasks.generate import generate_task
from tasks.merge import merge_task

if TYPE_CHECKING:
    from tasks.config import ComputeConfig, FinetuneConfig, GenerateConfig, Merge


@dataclass(frozen=True)
class FinetuneJob:
    """One LoRA fine-tune: which model, on which training file, stored under which key."""

    model: str
    dataset: str
    model_dir: str
    train_path: str
    cfg: FinetuneConfig
    key: str


@dataclass(frozen=True)
class GenerateJob:
    """One fine-tune answering one test file."""

    model: str
    dataset: str
    model_dir: str
    adapter_dir: str
    test_path: str
    cfg: GenerateConfig
    key: str


def merge_models(merge: Merge, paths: dict[str, str], key: str, compute: ComputeConfig, store: str) -> tuple[str, bool]:
    """(merged model folder, reused?) for one merge."""
    return merge_task(merge, paths, key, store)


def finetune_all(jobs: list[FinetuneJob], compute: ComputeConfig, store: str) -> list[tuple[str, bool]]:
    """(adapter folder, reused?) for every job, in order."""
    return [finetune_task(**vars(j), store_root=store) for j in jobs]


def generate_all(jobs: list[GenerateJob], compute: ComputeConfig, store: str) -> list[tuple[str, bool]]:
    """(outputs Parquet path, reused?) for every job, in order."""
    return [generate_task(**vars(j), store_root=store) for j in jobs]
