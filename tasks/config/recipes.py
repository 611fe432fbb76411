"""The shape of a mergekit recipe as the search reads it (mergekit's own full check runs later, in tasks/models/merge.py)."""

from __future__ import annotations

from typing import Any


def _entries_problem(value: Any, where: str, key: str, example: str) -> str | None:
    """Why `value` (at `where` in a recipe) is not a list of mappings that each have `key`, or None."""
    if not isinstance(value, list):
        return f"{where}: should be a list of {example} entries, not {type(value).__name__} {value!r:.40}"
    bad = next((i for i, entry in enumerate(value) if not isinstance(entry, dict) or key not in entry), None)
    return None if bad is None else f"{where}[{bad}]: should be a mapping like {example}, not {value[bad]!r:.40}"


def recipe_problem(recipe: dict[str, Any]) -> str | None:
    """What makes a mergekit recipe's shape unusable (a string where a list belongs, ...), or None."""
    method = recipe.get("merge_method")
    if not isinstance(method, str) or not method.strip():
        return "merge_method: missing (a mergekit method name, e.g. slerp, ties or linear)"
    if "modules" in recipe:  # model names are swapped for folders in models/slices only
        return "modules: not supported here; list the inputs under `models:` or `slices:`"
    if not isinstance(recipe.get("base_model", ""), (str, dict)):
        return f"base_model: should be a model name, not {recipe['base_model']!r:.40}"
    if "models" in recipe and (why := _entries_problem(recipe["models"], "models", "model", "{model: NAME}")):
        return why
    if "slices" in recipe and (why := _entries_problem(recipe["slices"], "slices", "sources", "{sources: [...]}")):
        return why
    for i, sl in enumerate(recipe.get("slices") or []):
        example = "{model: NAME, layer_range: [0, N]}"
        if why := _entries_problem(sl["sources"], f"slices[{i}].sources", "model", example):
            return why
    return None


def recipe_models(recipe: dict[str, Any]) -> list[str]:
    """Every model a mergekit recipe names (models, base_model, slices' sources); misshapen parts are skipped."""

    def listed(value: Any) -> list[Any]:
        """The value when it is a list, else nothing (a string here is recipe_problem's to report)."""
        return value if isinstance(value, list) else []

    slices = [sl for sl in listed(recipe.get("slices")) if isinstance(sl, dict)]
    entries = listed(recipe.get("models")) + [src for sl in slices for src in listed(sl.get("sources"))]
    names = [recipe["base_model"]] if isinstance(recipe.get("base_model"), str) else []
    names += [e["model"] for e in entries if isinstance(e, dict) and isinstance(e.get("model"), str)]
    source = recipe.get("tokenizer_source")  # union | base | a model whose tokenizer the merge takes
    names += [source] if isinstance(source, str) and source not in ("union", "base") else []
    return list(dict.fromkeys(names))
