"""Check everything a search needs before any model is loaded, and compute every model's and dataset's fingerprint.

Checks run cheapest first, so that common mistakes print in a fraction of a second: datasets, then candidate
folders, then API endpoints and the work pool, then merge recipes (importing mergekit alone takes seconds).
Fingerprints, which hash every byte of the data and of local weights, come last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tasks.candidates.resolve import candidate_fingerprint, inspect_candidate, tokenizer_folder
from tasks.config.schema import DatasetSpec, LoadOptions, Merge, SearchConfig, recipe_models
from tasks.config.stages import FinetuneConfig
from tasks.core.errors import UserError
from tasks.data.devsplit import check_dev_split, fit_split, settings_split_warning
from tasks.data.load import (DatasetInfo, Example, check_lengths, check_test_size, dataset_fingerprint, infer_metric,
                             load_examples)
from tasks.data.overlap import check_leaks
from tasks.models.fingerprint import ModelInfo, check_mergeable
from tasks.store.guards import say
from tasks.store.results import merge_key

if TYPE_CHECKING:
    from tasks.store.store import Store


@dataclass(frozen=True)
class Prepared:
    """The checked search: models (candidates then merges, in dependency order), datasets, warnings to log, and
    notes: what the checks did (e.g. how many distinct prompt formats rendered the rows), lines to log as info."""

    models: dict[str, ModelInfo] = field(default_factory=dict)
    datasets: dict[str, DatasetInfo] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _checked_rows(spec: DatasetSpec, finetune: FinetuneConfig) -> tuple[list[Example], list[Example]]:
    """A dataset's train and test rows, with every row, length and size check passed."""
    train, test = load_examples(spec.train), load_examples(spec.test)
    check_lengths(train, spec.train, finetune.max_length, train=True)
    check_lengths(test, spec.test, finetune.max_length, train=False)
    check_test_size(test, spec.test)
    return train, test


def _dataset_info(spec: DatasetSpec, train: list[Example], test: list[Example]) -> DatasetInfo:
    """Checked rows with their files' fingerprints and the metric (given, or inferred from the test rows)."""
    metric = spec.metric or infer_metric(test)
    return DatasetInfo(spec, train, test, dataset_fingerprint(spec.train), dataset_fingerprint(spec.test), metric)


def no_expected_warning(spec: DatasetSpec, test: list[Example], cfg: SearchConfig) -> list[str]:
    """A warning when the metric judge would score test rows against the teacher's own answers."""
    missing = sum(e.expected is None for e in test)
    if all(j.kind != "metric" for j in cfg.judge_list()) or not missing:
        return []  # an LLM judge needs no ground truth
    return [f"dataset '{spec.name}': {missing} of {len(test)} test rows have no \"expected\", so the metric judge "
            "scores them against the teacher's own answer: there the teacher cannot lose and the others rank by how "
            "closely they copy it; add \"expected\" (the ground truth) or use judge.kind: openai"]


def load_dataset(spec: DatasetSpec, finetune: FinetuneConfig | None = None) -> DatasetInfo:
    """Read and check a dataset's train and test files, and fingerprint them."""
    return _dataset_info(spec, *_checked_rows(spec, finetune or FinetuneConfig()))


def check_dataset_files(spec: DatasetSpec, finetune: FinetuneConfig | None = None) -> None:
    """Check a dataset's files, keeping nothing of their content (used for the held-out set)."""
    _checked_rows(spec, finetune or FinetuneConfig())


_CHECKED: dict[str, Prepared] = {}  # config JSON -> its check, handed by the command line to the flow it starts


def hand_over(cfg: SearchConfig, prep: Prepared) -> None:
    """Keep a config's check for the flow this process starts next, so that the flow does not check it again."""
    _CHECKED[cfg.model_dump_json()] = prep


def prepared(cfg: SearchConfig) -> Prepared:
    """The check handed over for this config by the command line (taken once), else a fresh prepare()."""
    return _CHECKED.pop(cfg.model_dump_json(), None) or prepare(cfg)


def prepare(cfg: SearchConfig, cheap_checks_passed: Callable[[], None] | None = None) -> Prepared:
    """Validate datasets, candidates and merge recipes; fingerprint them all. Loads no model.

    `cheap_checks_passed` is called once the datasets and candidate folders are checked, before the checks that
    take seconds (endpoints, the work pool, mergekit): the command line starts Prefect's server there.
    """
    rows = {d.name: _checked_rows(d, cfg.finetune) for d in cfg.datasets}
    if cfg.search.rounds:  # the search's own merges train and rate on a share of the training rows
        for d in cfg.datasets:
            check_dev_split(d.name, rows[d.name][0], cfg.search.dev_share)
    warnings = [w for d in cfg.datasets for w in no_expected_warning(d, rows[d.name][1], cfg)]
    if cfg.finetune.search.enabled:  # each (model, dataset) chooses its settings on the same development rows
        warnings += [w for d in cfg.datasets for w in settings_split_warning(d.name, rows[d.name][0],
                                                                            cfg.search.dev_share)]
    rendered = {d.name: (d, *rows[d.name]) for d in cfg.datasets}
    if cfg.validation:
        # The held-out rows are only checked here (files, lengths, templates, leaks), to fail fast on a broken file;
        # they are read for real after the winner is frozen.
        held = cfg.validation.dataset
        rendered[held.name] = (held, *_checked_rows(held, cfg.finetune))
        if cfg.finetune.search.enabled:
            warnings += settings_split_warning(held.name, rendered[held.name][1], cfg.search.dev_share)
        warnings += no_expected_warning(held, rendered[held.name][2], cfg)
    # test prompts seen in training: refused over data.max_overlap, before anything costs
    warnings += check_leaks(cfg.data, rendered, cfg.validation.dataset.name if cfg.validation else None)
    sources = cfg.candidates + cfg.ingredients
    # folders and signatures; no hashing yet
    inspected = {c.name: inspect_candidate(c, sources) for c in sources}
    signatures = {name: sig for name, (_, sig) in inspected.items()}
    for m in cfg.merges:
        names = [n for n in recipe_models(m.recipe) if n in signatures]
        if not names:
            raise UserError(f"merge '{m.name}': the recipe names no candidate")
        source = m.recipe.get("tokenizer_source")
        check_mergeable(m.name, [ModelInfo(n, "", signatures[n]) for n in names], source)
        signatures[m.name] = _merged_signature([signatures[n] for n in names], source, signatures)
    if cfg.compute.mode == "local":  # generate.engine: vllm needs vLLM here (a pool's worker checks its own)
        from tasks.generate.vllm_engine import check_engine

        check_engine(cfg.generate)
    if cheap_checks_passed is not None:
        cheap_checks_passed()
    from tasks.models.format_check import (
        check_formats,  # transformers' tokenizers: after the checks that take no import
    )

    by_name = {c.name: c for c in sources}
    tok_folders = {n: tokenizer_folder(by_name[n], folder, sources) for n, (folder, _) in inspected.items()}
    loads, format_warnings, format_note = check_formats(cfg, tok_folders, rendered)
    warnings += format_warnings
    if format_note:
        say(logging.INFO, format_note)
    if cfg.llm_judges() or cfg.references:  # only then: its import of the API client costs time
        check_api_models(cfg)
    if cfg.compute.mode == "pool":
        from tasks.plan.pool import check_pool  # imported here: it pulls in Prefect's client

        check_pool(cfg.compute, merges=bool(cfg.merges))  # server, pool, worker, stage deployments: seconds, no hang
    if cfg.merges:
        from tasks.models.merge import validate_recipe  # mergekit: seconds of imports, so after every cheaper check

        placeholder_paths = {name: f"/{name}" for name in signatures}
        for m in cfg.merges:
            validate_recipe(m, placeholder_paths)
    return Prepared(_fingerprinted_models(cfg, inspected, signatures, loads),
                    {d.name: _dataset_info(d, *rows[d.name]) for d in cfg.datasets}, warnings,
                    [format_note] if format_note else [])


def _merged_signature(sigs: list[dict[str, Any]], source: Any, named: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The signature of a merge: its base's shape, with the vocabulary its tokenizer_source gives it."""
    if source == "union":
        added = {i: t for sig in sigs for i, t in (sig.get("added_tokens") or {}).items()}
        size = max((s.get("vocab_size") or 0) for s in sigs) or None
        return sigs[0] | {"added_tokens": added, "vocab_size": size, "vocabulary": f"union-{sigs[0]['vocabulary']}"}
    if isinstance(source, str) and source in named:
        return sigs[0] | {k: named[source].get(k) for k in ("vocab_size", "vocabulary", "added_tokens")}
    return sigs[0]


def _merge_load(m: Merge, models: dict[str, ModelInfo]) -> tuple[LoadOptions, str]:
    """How a merge is loaded: the recipe's chat_template (written by mergekit), else its tokenizer source's format."""
    names = [n for n in recipe_models(m.recipe) if n in models]
    source = m.recipe.get("tokenizer_source")
    donor = models[source] if isinstance(source, str) and source in models else models[names[0]]
    remote = any(models[n].load.trust_remote_code for n in names)
    tokenizer = f"tokenizer_source {source}" if source else f"the tokenizer of {donor.name}"
    if m.recipe.get("chat_template"):
        return LoadOptions(trust_remote_code=remote), f"{tokenizer}; recipe chat_template {m.recipe['chat_template']}"
    return (LoadOptions(chat_template=donor.load.chat_template, trust_remote_code=remote),
            f"{tokenizer}; the template of {donor.name} ({donor.template})")


def _fingerprinted_models(
    cfg: SearchConfig, inspected: dict[str, tuple[Path | None, Any]], signatures: dict[str, dict[str, Any]],
    loads: dict[str, tuple[LoadOptions, str]],
) -> dict[str, ModelInfo]:
    """Every checked model with its fingerprint: candidates, ingredients, then merges in dependency order."""
    sources = cfg.candidates + cfg.ingredients
    ingredients = {c.name for c in cfg.ingredients}
    models = {c.name: ModelInfo(c.name, candidate_fingerprint(c, inspected[c.name][0], sources), signatures[c.name],
                                role="ingredient" if c.name in ingredients else "candidate",
                                load=loads[c.name][0], template=loads[c.name][1])
              for c in sources}
    for m in cfg.merges:
        models[m.name] = merge_info(m, models, signatures[m.name])
    return models


def merge_info(m: Merge, models: dict[str, ModelInfo], signature: dict[str, Any]) -> ModelInfo:
    """A merge as the search sees it: the key of its recipe over its parents' fingerprints, its shape, how it loads."""
    from tasks.models.merge import recipe_fingerprint  # mergekit's version is part of the key

    fps = {n: i.fingerprint for n, i in models.items()}
    load, template = _merge_load(m, models)
    return ModelInfo(m.name, merge_key(recipe_fingerprint(m, fps)), signature, role="merge", load=load,
                     template=template)


def check_api_models(cfg: SearchConfig) -> None:
    """The LLM judge and the references: settings make sense, keys are there, endpoints answer (preflight)."""
    from tasks.api.client import endpoint_of, preflight

    for i, judge in enumerate(cfg.judge_list()):
        if judge.kind == "metric":
            continue
        where = f"judges[{i}]" if cfg.judges else "judge"
        if cfg.budget.max_usd is not None and judge.model not in cfg.prices:
            raise UserError(f"budget.max_usd needs the price of {where}.model: add prices.{judge.model}: "
                            "{input: USD per 1M tokens, output: USD per 1M tokens}")
        preflight(endpoint_of(judge), where)
    for i, ref in enumerate(cfg.references):
        preflight(endpoint_of(ref), f"references[{i}] ({ref.name})")


def held_out(cfg: SearchConfig) -> DatasetInfo:
    """The held-out dataset, read in full (call only after the winner is frozen)."""
    assert cfg.validation is not None
    return load_dataset(cfg.validation.dataset, cfg.finetune)


def fit_datasets(cfg: SearchConfig, prep: Prepared, store: Store) -> Prepared:
    """The search's datasets as its fine-tunes see them: with search.rounds on and search.refit off, each trains on
    its training rows minus its development rows (the loop's first rating then reuses the search's fine-tunes);
    otherwise unchanged. Idempotent; writes the splits to the store (also on --dry-run, so the plan keys as the run)."""
    if not cfg.search.rounds or cfg.search.refit:
        return prep
    return replace(prep, datasets={n: fit_split(d, cfg.search.dev_share, store) for n, d in prep.datasets.items()})
