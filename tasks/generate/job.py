"""A generation job: one fine-tune (or base, untuned) answering one test file. The plan makes them
(tasks/plan/jobs.py); both engines read them (tasks/generate/outputs.py, tasks/generate/vllm_engine.py)."""

from __future__ import annotations

from dataclasses import dataclass

from tasks.config.schema import LoadOptions
from tasks.config.stages import GenerateConfig  # at run time: a pool flow validates jobs by type


@dataclass(frozen=True)
class GenerateJob:
    """One fine-tune answering one test file."""

    model: str
    dataset: str
    model_dir: str
    adapter_dir: str  # '' : the base untuned
    test_path: str
    cfg: GenerateConfig
    key: str
    load: LoadOptions = LoadOptions()  # as FinetuneJob's: the same format in training and generation
