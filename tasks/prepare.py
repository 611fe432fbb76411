"""Check everything a search needs before any model is loaded, and compute every model's and dataset's fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tasks.config import TEACHER, DatasetSpec, SearchConfig, recipe_models
from tasks.data import Example, dataset_fingerprint, infer_metric, load_examples
from tasks.errors import UserError
from tasks.merge import recipe_fingerprint, validate_recipe
from tasks.models import ModelInfo, check_mergeable, describe
from tasks.store import content_key


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's rows, fingerprints and metric."""

    spec: DatasetSpec
    train: list[Example]
    test: list[Example]
    train_fp: str
    test_fp: str
    metric: str


@dataclass(frozen=True)
class Prepared:
    """The checked search: models (candidates then merges, in dependency order) and datasets."""

    models: dict[str, ModelInfo] = field(default_factory=dict)
    datasets: dict[str, DatasetInfo] = field(default_factory=dict)


def load_dataset(spec: DatasetSpec) -> DatasetInfo:
    """Read and check a dataset's train and test files."""
    train, test = load_examples(spec.train), load_examples(spec.test)
    metric = spec.metric or infer_metric(test)
    return DatasetInfo(spec, train, test, dataset_fingerprint(spec.train), dataset_fingerprint(spec.test), metric)


def check_dataset_files(spec: DatasetSpec) -> None:
    """Check a dataset's files parse, keeping nothing of their content (used for the held-out set)."""
    load_examples(spec.train)
    load_examples(spec.test)


def prepare(cfg: SearchConfig) -> Prepared:
    """Validate datasets, candidates and merge recipes; fingerprint them all. Loads no model."""
    check_api_models(cfg)
    if cfg.compute.mode == "pool":
        from tasks.compute import check_pool  # imported here: it pulls in Prefect's client

        check_pool(cfg.compute, merges=bool(cfg.merges))  # server, pool, worker, stage deployments: seconds, no hang
    datasets = {d.name: load_dataset(d) for d in cfg.datasets}
    if cfg.validation:
        # The held-out rows are only parsed here, to fail fast on a broken file; they are read for real
        # after the winner is frozen.
        check_dataset_files(cfg.validation.dataset)
    models = {c.name: describe(c) for c in cfg.candidates}
    placeholder_paths = {name: f"/{name}" for name in models}
    for m in cfg.merges:
        infos = [models[n] for n in _recipe_names(m.recipe, models)]
        if not infos:
            raise UserError(f"merge '{m.name}': the recipe names no candidate")
        check_mergeable(m.name, infos)
        validate_recipe(m, placeholder_paths)
        fps = {n: i.fingerprint for n, i in models.items()}
        models[m.name] = ModelInfo(m.name, content_key("merge", recipe_fingerprint(m, fps)), infos[0].signature)
        placeholder_paths[m.name] = f"/{m.name}"
    if TEACHER in models:
        raise UserError(f"'{TEACHER}' is reserved for the datasets' own answers; rename that model")
    return Prepared(models, datasets)


def check_api_models(cfg: SearchConfig) -> None:
    """The LLM judge and the references: settings make sense, keys are there, endpoints answer (one free call each)."""
    from tasks.llm_judge import endpoint_of, preflight

    if cfg.judge.kind == "openai":
        if not cfg.judge.model:
            raise UserError("judge.model: the openai judge needs a model id (e.g. gpt-4o)")
        if cfg.budget.max_usd is not None and cfg.judge.model not in cfg.prices:
            raise UserError(f"budget.max_usd needs the judge's price: add prices.{cfg.judge.model}: "
                            "{input: USD per 1M tokens, output: USD per 1M tokens}")
        preflight(endpoint_of(cfg.judge), "judge")
    for i, ref in enumerate(cfg.references):
        preflight(endpoint_of(ref), f"references[{i}] ({ref.name})")


def _recipe_names(recipe: dict, known: dict[str, ModelInfo]) -> list[str]:
    """The known model names a recipe uses."""
    return [n for n in recipe_models(recipe) if n in known]


def held_out(cfg: SearchConfig) -> DatasetInfo:
    """The held-out dataset, read in full (call only after the winner is frozen)."""
    assert cfg.validation is not None
    return load_dataset(cfg.validation.dataset)
