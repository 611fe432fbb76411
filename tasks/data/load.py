"""Customer datasets: load JSONL, Parquet or `datasets` folders in the OpenAI fine-tuning format, checked row by row."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.config.base import not_utf8
from tasks.config.schema import DatasetSpec
from tasks.core.errors import UserError, first_line

# pandas, pyarrow and `datasets` are imported only where a Parquet file or a `datasets` folder is read: a dataset
# error in JSONL prints before they would have loaded.

ROLES = {"system", "user", "assistant"}
# Without the model's tokenizer a row's tokens can only be bounded. Whole prompts average 3.5-4.5 UTF-8 bytes a
# token with the Mistral, Llama and GPT tokenizers on English prose (code, JSON and other scripts take more
# tokens), so bytes / 6 is a lower bound no real prompt goes below: a row refused with it is surely too long.
MAX_BYTES_PER_TOKEN = 6
# A row over this many times finetune.max_length is a broken row (a pasted file), not a long one: a 1 MB test
# prompt once made generation try to allocate 176 GB.
ABSURD_FACTOR = 8
# Ratings' confidence intervals resample the test rows: with one row they have zero width and "separate" anyone.
MIN_TEST_ROWS = 5


@dataclass(frozen=True)
class Example:
    """One row: the conversation up to the answer, the teacher's answer, and an optional ground truth."""

    id: str
    prompt: list[dict[str, str]]
    answer: str
    expected: Any = None
    line: int = field(default=0, compare=False)  # where the row is in its file (row number for Parquet/datasets)

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
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}:{line}: 'messages' is text but not JSON ({e.msg})") from None
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
    if not any(m["role"] == "user" for m in msgs[:-1]):
        raise UserError(f"{where}:{line}: no user message before the assistant answer (the prompt needs a user turn)")
    if not msgs[-1]["content"].strip():
        raise UserError(f"{where}:{line}: the assistant answer (the last message) is empty; there is nothing to learn")
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
        line=line,
    )


def _folder_rows(path: Path) -> list[tuple[int, Any]]:
    """(row number, raw row) pairs from a Hugging Face `datasets` folder saved with save_to_disk."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (ValueError, KeyError, TypeError):
            splits = ["train"]
        raise UserError(f"{path}: a `datasets` DatasetDict with splits {', '.join(map(str, splits))}; point train "
                        f"and test at one split's folder, e.g. {path / str(splits[0])}")
    if not (path / "state.json").is_file():  # checked first: importing `datasets` alone costs seconds
        raise UserError(f"{path}: a folder, but not a Hugging Face `datasets` folder (no state.json; write one with "
                        "Dataset.save_to_disk, or give the rows as JSONL or Parquet)")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any load failure is the user's folder
        raise UserError(f"{path}: not a readable Hugging Face `datasets` folder ({first_line(e)})") from None
    return [(i + 1, r) for i, r in enumerate(ds)]


def _parquet_rows(path: Path) -> list[tuple[int, Any]]:
    """(row number, raw row) pairs from a Parquet file."""
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - 4))
        tail = fh.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":  # checked first: a text file would drown pyarrow
        raise UserError(f"{path}: not a Parquet file (it does not start and end with the bytes PAR1); write it "
                        "with DataFrame.to_parquet, or give the rows as JSONL")
    import pandas as pd

    try:
        records = pd.read_parquet(path).to_dict("records")
    except Exception as e:  # noqa: BLE001 - a damaged file is the user's
        raise UserError(f"{path}: cannot read this Parquet file ({first_line(e)})") from None
    return [(i + 1, r) for i, r in enumerate(records)]


def _jsonl_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, raw row) pairs from a JSONL file (UTF-8)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is still UTF-8
    except UnicodeDecodeError as e:
        raise UserError(not_utf8(str(path), raw, e)) from None
    rows = []
    # Split on newlines only: JSON strings may hold U+2028 and other characters str.splitlines() breaks at.
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: broken JSON line ({e.msg})") from None
    return rows


def _raw_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, raw row) pairs from a JSONL file, a Parquet file or a `datasets` folder."""
    if path.is_dir():
        return _folder_rows(path)
    return _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)


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


def min_tokens(text: str) -> int:
    """A lower bound on the tokens of `text` under any common tokenizer (see MAX_BYTES_PER_TOKEN)."""
    return -(-len(text.encode("utf-8")) // MAX_BYTES_PER_TOKEN)


def check_lengths(examples: list[Example], path: str, max_length: int, train: bool) -> None:
    """Refuse a training row whose prompt alone surely fills max_length, and any absurdly long row."""
    for e in examples:
        prompt = sum(min_tokens(m["content"]) for m in e.prompt)
        total = prompt + min_tokens(e.answer)
        if train and prompt >= max_length:
            raise UserError(
                f"{path}:{e.line}: the prompt alone is at least {prompt} tokens, but finetune.max_length is "
                f"{max_length}: no token of the answer would be trained; raise finetune.max_length or shorten "
                "the prompt"
            )
        if total > ABSURD_FACTOR * max_length:
            raise UserError(
                f"{path}:{e.line}: the row is at least {total} tokens, over {ABSURD_FACTOR}x finetune.max_length "
                f"({max_length}); it looks broken (fix or drop it), or raise finetune.max_length"
            )


def check_test_size(examples: list[Example], path: str) -> None:
    """Refuse a test split too small for the ratings' confidence intervals to mean anything."""
    if len(examples) < MIN_TEST_ROWS:
        raise UserError(
            f"{path}: the test split has {len(examples)} row(s), fewer than {MIN_TEST_ROWS}: ratings' confidence "
            "intervals resample the test rows, and with so few they collapse to zero width and \"separate\" "
            "contenders on no evidence; add test rows"
        )


def dataset_fingerprint(path: str) -> str:
    """Content hash of a dataset file (or folder)."""
    from tasks.store.keys import file_fingerprint

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


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's rows, fingerprints and metric."""

    spec: DatasetSpec
    train: list[Example]
    test: list[Example]
    train_fp: str
    test_fp: str
    metric: str
    source: DatasetInfo | None = None  # the dataset as configured, when this one trains on a share of its rows
