"""The config's building blocks: reserved names, name and path checks, and the frozen base model (a leaf module)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

ZOO_PREFIX = "zoo:"
TEACHER = "teacher"  # the contender made of each dataset's own assistant answers
TRIVIAL = "trivial answer"  # a floor made of a dataset's trivial answers (no config name can take it: no spaces)
UNTUNED = " untuned"  # appended to a model's name for its base answering zero-shot, another floor: "hermes untuned"
MODEL_KINDS = ("candidate", "merge")  # what is fine-tuned and can win: a base model, not a reference
NAME_MAX = 64


def untuned_name(model: str) -> str:
    """The contender name of a model's untuned base answering zero-shot."""
    return model + UNTUNED


def name_problem(name: str) -> str | None:
    """Why a name cannot be part of a file path or store key, or None when it can."""
    if not name:
        return "is empty"
    if len(name) > NAME_MAX:
        return f"is {len(name)} characters long"
    bad = next((ch for ch in name if not (ch.isascii() and (ch.isalnum() or ch in "._-"))), None)
    if bad is not None:
        return f"contains {bad!r}"  # repr makes '/', '\\' and control characters visible
    if not name[0].isalnum():
        return f"starts with {name[0]!r}"
    return "contains '..'" if ".." in name else None


def _valid_name(name: str) -> str:
    """The name, unchanged, or a ValueError saying what is wrong with it."""
    why = name_problem(name)
    if why:
        raise ValueError(f"{name!r} {why}: names become parts of file paths and store keys, so use 1-{NAME_MAX} "
                         "letters, digits, '-', '_' or '.', starting with a letter or digit")
    return name


def _valid_path(path: str) -> str:
    """The path, unchanged, or a ValueError when it is empty or holds a control character."""
    if not path.strip():
        raise ValueError("is empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        raise ValueError(f"{path!r} contains a control character")
    return path


Name = Annotated[str, AfterValidator(_valid_name)]
PathText = Annotated[str, AfterValidator(_valid_path)]


def not_utf8(where: str, raw: bytes, err: UnicodeDecodeError) -> str:
    """One line naming the line and column of the first byte that is not UTF-8 in `raw` (read from `where`)."""
    line = raw.count(b"\n", 0, err.start) + 1
    column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
    return f"{where}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}); save the file as UTF-8"


class Frozen(BaseModel):
    """Base of every config model: immutable, unknown keys are errors, and floats are finite (no .inf or .nan)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
