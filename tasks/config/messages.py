"""One line for a config that does not validate: the file, the YAML line and the key, with a did-you-mean hint."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

UNION_BRANCH = re.compile(r"^(float|int|str|bool|none|literal\[.*\]|list\[.*\]|dict\[.*\])$")


def hint(word: str, choices: list[str]) -> str:
    """`; did you mean 'x'?` for the closest choice, or nothing."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(choices)})" if choices else ""


def key_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """Line number (1-based) of the YAML node at a pydantic error location, if it can be found."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == part]
            if not match:
                return line
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class under `root` that owns the key at a pydantic error location."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        # Unwrap list[X] / X | None to the pydantic model inside.
        candidates = [ann, *getattr(ann, "__args__", ())]
        for c in list(candidates):
            candidates += list(getattr(c, "__args__", ()))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _without_branch(loc: tuple) -> tuple:
    """A validation error's location without the union branch pydantic appends to it ('float', "literal['auto']")."""
    return loc[:-1] if loc and isinstance(loc[-1], str) and UNION_BRANCH.match(loc[-1]) else loc


def format_error(root: type[BaseModel], path: Path, text: str, err: ValidationError) -> str:
    """One line naming the file, line and key of the first validation error."""
    e = err.errors()[0]
    loc = _without_branch(tuple(e["loc"]))
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = key_line(text, loc)
    where = f"{path}:{line}" if line else str(path)
    if e["type"] == "extra_forbidden":
        owner = model_at(root, loc)
        did_you_mean = hint(str(loc[-1]), list(owner.model_fields)) if owner else ""
        return f"{where}: unknown key '{key}'{did_you_mean}"
    if e["type"] == "missing":
        return f"{where}: missing key '{key}'"
    msg = e["msg"].removeprefix("Value error, ")
    # a field like `epochs: float | 'auto'` fails in each branch: name the other choices in the same line
    others = [o["msg"].removeprefix("Input should be ") for o in err.errors()[1:]
              if o["type"] == "literal_error" and _without_branch(tuple(o["loc"])) == loc]
    msg += "".join(f", or {o}" for o in others)
    return f"{where}: {msg}" if e["type"] == "value_error" and not loc else f"{where}: {key}: {msg}"
