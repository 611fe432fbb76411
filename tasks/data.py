"""Customer datasets: load JSONL, Parquet or `datasets` folders in the OpenAI fine-tuning format, checked row by row."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import UserError
from tasks.store import file_fingerprint

ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class Example:
    """One row: the conversation up to the answer, the teacher's answer, and an optional ground truth."""

    id: str
    prompt: list[dict[str, str]]
    answer: str
    expected: Any = None

    @property
    def truth(self) -> Any:
        """What the metric judge scores against: `expected` when present, else the teacher's answer."""
        return self.answer if self.expected is None else self.expected


def _check_row(row: Any, where: str, line: int) -> Example:
    """Turn one raw row into an Example, or raise a one-line error naming the file and line."""
    if not isinstance(row, dict):
        raise UserError(f"{where}:{line}: expected a JSON object with 'messages'")
    msgs = row.get("messages")
    if isinstance(msgs, str):  # Parquet files sometimes hold messages as a JSON string
        msgs = json.loads(msgs)
    if hasattr(msgs, "tolist"):  # Parquet hands back a numpy array of dicts
        msgs = msgs.tolist()
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise UserError(f"{where}:{line}: 'messages' must be a non-empty list")
    msgs = [dict(m) if not isinstance(m, dict) else m for m in msgs]
    for m in msgs:
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}:{line}: each message needs a role ({'/'.join(sorted(ROLES))}) and text content")
    if msgs[-1]["role"] != "assistant":
        raise UserError(f"{where}:{line}: no assistant message at the end (the teacher's answer)")
    if len(msgs) < 2:
        raise UserError(f"{where}:{line}: the assistant answer needs a prompt before it")
    rid = row.get("id")
    expected = row.get("expected")
    if isinstance(expected, str) and expected[:1] in "{[":
        try:  # Parquet stores a JSON ground truth as text
            expected = json.loads(expected)
        except json.JSONDecodeError:
            pass
    return Example(
        id=str(rid) if rid is not None else str(line),
        prompt=[{"role": m["role"], "content": m["content"]} for m in msgs[:-1]],
        answer=msgs[-1]["content"],
        expected=expected,
    )


def _raw_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, raw row) pairs from a JSONL file, a Parquet file or a `datasets` folder."""
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - any load failure is the user's folder
            raise UserError(f"{path}: not a Hugging Face `datasets` folder ({e})") from None
        return [(i + 1, r) for i, r in enumerate(ds)]
    if path.suffix == ".parquet":
        import pandas as pd

        return [(i + 1, r) for i, r in enumerate(pd.read_parquet(path).to_dict("records"))]
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                rows.append((i, json.loads(text)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: broken JSON line ({e.msg})") from None
    return rows


def load_examples(path: str) -> list[Example]:
    """Every row of a dataset file, checked; raise UserError on the first bad one."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: dataset file not found")
    examples = [_check_row(row, str(p), line) for line, row in _raw_rows(p)]
    if not examples:
        raise UserError(f"{path}: dataset file is empty")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{path}: id '{dup}' appears twice")
    return examples


def dataset_fingerprint(path: str) -> str:
    """Content hash of a dataset file (or folder)."""
    return file_fingerprint(path)


def infer_metric(examples: list[Example]) -> str:
    """json when the truths are JSON objects, exact when they are a few short labels, else rouge."""
    truths = [e.truth for e in examples]
    if all(isinstance(t, (dict, list)) or _is_json_object(t) for t in truths):
        return "json"
    texts = [str(t) for t in truths]
    # A label set: short answers, many repeats (at most half as many distinct values as rows, and <= 50).
    if all(len(t.split()) <= 3 for t in texts) and len(set(texts)) <= min(50, max(2, len(texts) // 2)):
        return "exact"
    return "rouge"


def _is_json_object(text: Any) -> bool:
    """True when a string parses as a JSON object."""
    if not isinstance(text, str) or not text.strip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False
