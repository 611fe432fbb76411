"""Customer datasets: load JSONL, Parquet or `datasets` folders in the OpenAI fine-tuning format, checked row by row."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tasks.config.base import not_utf8
from tasks.config.schema import DatasetSpec
from tasks.core.errors import UserError, first_line

# pandas, pyarrow and `datasets` are imported only where a Parquet file or a `datasets` folder is read: a dataset
# error in JSONL prints before they would have loaded.

ROLES = {"system", "user", "assistant"}
TEXT_PARTS = {"text", "input_text", "output_text"}  # content parts read as text (OpenAI's chat and Responses names)
MEDIA_PARTS = {"image_url", "input_image", "image", "input_audio", "audio", "file", "input_file"}
# An ingest folder's files whose rows every contender answers: its pruned static prompt is added back to them.
ANSWERED_FILES = ("test.jsonl", "held_out.jsonl", "test.relabeled.jsonl", "held_out.relabeled.jsonl")
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


def _text(m: dict[str, Any], i: int, at: str) -> str:
    """A message's text: a string, or text-only content parts joined by newlines; else one line naming what it is."""
    role, content = m.get("role"), m.get("content")
    what = f"{at}: message {i + 1} ({role})"
    if role == "assistant" and (m.get("tool_calls") or m.get("function_call")):
        raise UserError(f"{what} is a tool call (tool_calls), which the search cannot train on; python -m flows.ingest "
                        "writes tool calls as JSON text (or drops those rows with --drop-tool-calls)")
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        raise UserError(f"{what}: content is a JSON object, not text; write it as a JSON string (json.dumps)")
    if isinstance(content, (list, tuple)) or hasattr(content, "tolist"):
        parts = list(content.tolist() if hasattr(content, "tolist") else content)
        kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in parts]
        bad = next((k for k in kinds if k not in TEXT_PARTS), None)
        if bad in MEDIA_PARTS:
            raise UserError(f"{what}: a content part of type '{bad}'; a text model cannot learn from it (drop the row, "
                            "or run python -m flows.ingest, which drops and counts such rows)")
        if bad is not None or not parts:
            raise UserError(f"{what}: content parts must be text parts ({{\"type\": \"text\", \"text\": ...}}), "
                            f"found {bad or 'none'}")
        return "\n".join(str(p.get("text") or "") for p in parts)
    raise UserError(f"{what}: no text content" + (" (null)" if content is None else f" ({type(content).__name__})"))


def _messages(msgs: list[dict[str, Any]], at: str) -> list[dict[str, str]]:
    """The messages as {role, content} text turns; one line for a role or content the search cannot train on."""
    out = []
    for i, m in enumerate(msgs):
        role = m.get("role")
        if role in ("tool", "function"):
            raise UserError(f"{at}: message {i + 1} has role '{role}' (a tool's result), which the search cannot train "
                            "on; python -m flows.ingest writes it as a user turn (or drops the row)")
        if role not in ROLES:
            raise UserError(f"{at}: message {i + 1} has role {role!r}; each message needs a role "
                            f"({'/'.join(sorted(ROLES))}) and text content")
        out.append({"role": role, "content": _text(m, i, at)})
    return out


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
    if not all(isinstance(m, dict) or hasattr(m, "keys") for m in msgs):
        raise UserError(f"{where}:{line}: 'messages' must be a list of objects with a role and content")
    msgs = _messages([dict(m) for m in msgs], f"{where}:{line}")
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
        prompt=msgs[:-1],
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


def static_prompt(path: str | Path) -> str | None:
    """The static system prompt an ingest pruned from the folder `path` sits in, when `path` is a file of rows every
    contender answers (test.jsonl, held_out.jsonl, or their relabeled variants): added back to them, so references and the teacher get their
    instructions and the judge sees the request as production sent it; the training rows stay pruned."""
    p = Path(path)
    text, manifest = p.parent / "static_prompt.txt", p.parent / "ingest.json"
    if p.name not in ANSWERED_FILES or not text.is_file() or not manifest.is_file():
        return None
    try:
        pruned = (json.loads(manifest.read_text(encoding="utf-8")).get("static_prompt") or {}).get("pruned")
    except (ValueError, AttributeError):
        raise UserError(f"{manifest}: not an ingest manifest (broken JSON)") from None
    return text.read_text(encoding="utf-8") if pruned else None


def _missing(p: Path) -> str:
    """The one line for a dataset file that is not there (an ingest folder's says how to make it)."""
    if (p.parent / "ingest.json").is_file() and p.name == "held_out.jsonl":
        return f"{p}: this ingest has no held-out part; ingest again with --held-out-share (e.g. 0.1)"
    if p.name in ("train.jsonl", *ANSWERED_FILES[:2]) and p.parent.is_dir() and not (p.parent / "ingest.json").is_file():
        return f"{p}: dataset file not found ({p.parent} is not an ingest folder: write one with python -m flows.ingest)"
    return f"{p}: dataset file not found"


def _note_names(examples: list[Example], raw: list[tuple[int, Any]], path: str) -> None:
    """Say once per file how many rows had `name` fields on their messages, which the search drops."""
    named = [line for line, row in raw if isinstance(row, dict) and isinstance(row.get("messages"), list)
             and any(isinstance(m, dict) and m.get("name") for m in row["messages"])]
    if named:
        from tasks.store.guards import say

        say(logging.WARNING, f"{path}:{named[0]}: {len(named)} of {len(examples)} rows name a message's author "
                             "(`name`); the search drops the names (chat templates have no place for them)")


def load_examples(path: str) -> list[Example]:
    """Every row of a dataset file, checked; raise UserError on the first bad one."""
    p = Path(path)
    if not p.exists():
        raise UserError(_missing(p))
    raw = _raw_rows(p)
    examples = [_check_row(row, str(p), line) for line, row in raw]
    if not examples:
        raise UserError(f"{path}: dataset file is empty")
    _note_names(examples, raw, str(p))
    static = static_prompt(p)
    if static is not None:  # rows that kept a system message of their own keep it
        system = {"role": "system", "content": static}
        examples = [e if e.prompt[0]["role"] == "system" else replace(e, prompt=[system, *e.prompt])
                    for e in examples]
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
    """Content hash of a dataset file (or folder), and of the static prompt added back to its rows (if any)."""
    from tasks.store.keys import file_fingerprint

    fp = file_fingerprint(path)
    static = static_prompt(path)
    if static is None:
        return fp
    return hashlib.sha256(f"{fp}\0{static}".encode()).hexdigest()[:len(fp)]


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
