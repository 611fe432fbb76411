"""Merges: run a mergekit recipe over candidate folders through mergekit's Python API."""

from __future__ import annotations

import copy
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.compute.workers import threads_for, torch_threads
from tasks.config.schema import Merge
from tasks.core.errors import UserError, first_line
from tasks.store.results import MERGE_VERSION, model_path
from tasks.store.store import Store


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
    if out.get("tokenizer_source") not in (None, "union", "base"):  # a model whose tokenizer the merge takes
        out["tokenizer_source"] = swap(out["tokenizer_source"])
    return out


def _tokenizer_note(recipe: dict[str, Any], out_dir: Path) -> str:
    """Which tokenizer and chat template the merged folder got, as comment lines for mergekit_config.yml."""
    import json

    conf = out_dir / "tokenizer_config.json"
    template = (out_dir / "chat_template.jinja").read_text() if (out_dir / "chat_template.jinja").is_file() else \
        (json.loads(conf.read_text()).get("chat_template") if conf.is_file() else None)
    vocab = len((json.loads((out_dir / "tokenizer.json").read_text()).get("model") or {}).get("vocab") or {}) \
        if (out_dir / "tokenizer.json").is_file() else None
    first = template.strip().splitlines()[0][:100] if isinstance(template, str) and template.strip() else None
    source = recipe.get("tokenizer_source") or "the base model's"
    return (f"# tokenizer: {source}"
            + (f" ({vocab} vocabulary entries)" if vocab else "") + "\n"
            + f"# chat template: {recipe.get('chat_template') or 'as the tokenizer source has it'}"
            + (f", starting {first!r}" if first else ", none (the search's default template applies)") + "\n")


def _method_problem(cfg: Any, names: dict[str, str]) -> str | None:
    """What mergekit's method registry finds wrong in a parsed recipe (method, inputs, required parameters), or None."""
    import difflib

    from mergekit.config import ConfigReader, InputSliceDefinition, OutputSliceDefinition
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import ParameterScope

    try:
        method = registry.get(cfg.merge_method)
    except RuntimeError:  # mergekit's own "Unimplemented merge method", which it raises only mid-merge
        known = sorted(m.spec.name for m in registry.registered_methods())
        close = difflib.get_close_matches(cfg.merge_method, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"merge_method: mergekit has no method '{cfg.merge_method}' ({hint}it has: {', '.join(known)})"
    spec = method.spec
    if cfg.models:  # mergekit turns `models` into one slice per module, adding the base model when not listed
        sources = [InputSliceDefinition(model=m.model, layer_range=(0, 1), parameters=m.parameters) for m in cfg.models]
        if cfg.base_model and cfg.base_model not in [s.model for s in sources]:
            sources.append(InputSliceDefinition(model=cfg.base_model, layer_range=(0, 1)))
        groups = [("models", OutputSliceDefinition(sources=sources))]
    else:
        groups = [(f"slices[{i}]", sl) for i, sl in enumerate(cfg.slices or [])]
    for where, sl in groups:
        reader = ConfigReader(config=cfg, t=0.0, slice_out=sl)
        inputs, base = [s.model for s in sl.sources], reader.base_model
        try:
            method.validate_inputs(inputs, base)
        except ValueError as e:
            return f"{where}: merge method '{spec.name}': {e}"
        for p in (p for p in spec.parameters if p.required):
            # The places mergekit's parameter resolver looks, in its order: source, slice, recipe.
            if p.scope == ParameterScope.SHARED:
                if not any(s and p.name in s for s in reader.parameter_sources(None)):
                    return (f"parameters.{p.name}: merge method '{spec.name}' needs it "
                            f"(e.g. parameters: {{{p.name}: ...}})")
                continue
            for m in inputs:
                skip = m == base and p.scope == ParameterScope.NON_BASE
                if not skip and not any(s and p.name in s for s in reader.parameter_sources(m)):
                    name = names.get(str(m), str(m))
                    return (f"{where}: merge method '{spec.name}' needs parameter '{p.name}' for model '{name}' "
                            "(in its entry's parameters, or in the recipe's parameters for all)")
    return None


def validate_recipe(merge: Merge, paths: dict[str, str]) -> None:
    """Raise a one-line UserError when mergekit rejects the recipe: its config model, then its method registry."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    from tasks.config.schema import recipe_problem

    where = f"merge '{merge.name}': recipe"
    problem = recipe_problem(merge.recipe)  # the config checked this already; a Merge made in code may not be
    if problem:
        raise UserError(f"{where}.{problem}")
    try:
        cfg = MergeConfiguration.model_validate(_swap_models(merge.recipe, paths))
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{where}.{key}: {err['msg']}") from None
    except (RuntimeError, ValueError, TypeError) as e:  # mergekit's validators raise RuntimeError, unwrapped
        raise UserError(f"{where}: {first_line(e)}") from None
    problem = _method_problem(cfg, {path: name for name, path in paths.items()})
    if problem:
        raise UserError(f"{where}.{problem}")


def recipe_fingerprint(merge: Merge, fingerprints: dict[str, str]) -> dict[str, Any]:
    """The recipe with model names replaced by fingerprints: what the merged weights depend on."""
    return _swap_models(merge.recipe, fingerprints) | {"mergekit": version("mergekit"), "stage": MERGE_VERSION}


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
    # The thread count of the search's own fine-tunes and answers (1 for a small model), in local and pool mode
    # alike: a sum split over 2 threads rounds differently than over 1, and the embeddings of the demo's merges came
    # out 3e-8 apart between the two modes (BENCHMARKS.md), so did every adapter trained on them.
    with torch_threads(threads_for(_weights_params(cfg))):
        mergekit_run(cfg, str(out_dir), options=options)
    (out_dir / "mergekit_config.yml").write_text(
        f"# {merge.name}: the recipe as written in the search config\n"
        + yaml.safe_dump(merge.recipe, sort_keys=False)
        + "# resolved to local folders:\n"
        + "\n".join(f"# {line}" for line in cfg.to_yaml().splitlines())
        + "\n"
        + _tokenizer_note(merge.recipe, out_dir)
    )


def _weights_params(cfg: Any) -> int:
    """At least the parameters of the largest local model a merge reads (weight bytes / 2: exact for 16-bit weights,
    twice the count for 32-bit); a hub id counts as large."""
    sizes = []
    for ref in cfg.referenced_models():
        folder = Path(str(ref.model.path))
        if not folder.is_dir():
            return 2**62
        sizes.append(sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin")) // 2)
    return max(sizes, default=0)


@task(name="merge", task_run_name="merge-{merge.name}", cache_policy=NO_CACHE)
def merge_task(merge: Merge, paths: dict[str, str], key: str, store_root: str) -> tuple[str, bool]:
    """Prefect task: (local folder of the merged model, whether it was already in the store)."""
    store, rel = Store(store_root), model_path(key)
    _, reused = store.folder_once(rel, lambda tmp: run_merge(merge, paths, tmp))
    return str(store.local_dir(rel)), reused
