"""Reading a source one row at a time: JSONL (logged requests or fine-tuning rows) and Parquet, each row turned into
a Record or said unreadable in one counted reason (never a traceback)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.core.errors import UserError, first_line
from tasks.ingest.config import utc
from tasks.ingest.normalize import Unreadable, answer_of, normalize_messages

SUFFIXES = (".jsonl", ".json", ".parquet")  # .json: some loggers name their JSON-lines files so
# Epoch times above this are milliseconds (1e11 s is the year 5138; 1e11 ms is 1973).
MS_EPOCH = 1e11


@dataclass
class Record:
    """One logged request (or fine-tuning row) as read: the conversation, the answer last, and what filters look at."""

    where: str  # file:line, for errors and the report
    source_id: str  # the log's own id (the row's, or the response's), else `where`
    messages: list[dict[str, str]]  # normalised: system/user/assistant with text, the answer last
    model: str | None = None  # the model the request named
    served_by: str | None = None  # the response's model (a dated snapshot, e.g. gpt-4o-2024-08-06)
    time: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None
    refused: bool = False  # the response's own `refusal` field was set
    defect: str | None = None  # why the row cannot be a training row (error, image, tool call, empty answer...)
    changes: set[str] = field(default_factory=set)  # what normalising changed (text parts joined, tool calls...)
    group: str | None = None  # the value at IngestConfig.group_by, as text
    expected: Any = None  # a fine-tuning row's ground truth, passed through


def source_files(source: str) -> list[Path]:
    """The files of a source: the file itself, or a folder's JSONL and Parquet files in name order."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise UserError(f"{source}: folder holds no {', '.join(SUFFIXES)} files")
        return files
    raise UserError(f"{source}: no such file or folder")


def _jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or Unreadable) for each non-blank line of a JSONL file, streamed."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, Unreadable("not UTF-8")
                continue
            try:
                yield number, json.loads(text.removeprefix("\ufeff") if number == 1 else text)
            except json.JSONDecodeError:
                yield number, Unreadable("broken JSON")


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number, row dict) for each row of a Parquet file, read a batch at a time."""
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file is the user's
        raise UserError(f"{path}: cannot read this Parquet file ({first_line(e)})") from None
    number = 0
    for batch in reader.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def raw_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, raw row or Unreadable) of one source file."""
    return _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_lines(path)


def lookup(row: Any, dotted: str) -> Any:
    """The value at a dotted path in nested dicts (None when any step is missing)."""
    for key in dotted.split("."):
        if not isinstance(row, dict):
            return None
        row = row.get(key)
    return row


def parse_time(value: Any) -> datetime | None:
    """A log's time: ISO text, or epoch seconds (or milliseconds); None when absent or unreadable."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, datetime):
        return utc(value)
    if isinstance(value, (int, float)):
        seconds = value / 1000 if value > MS_EPOCH else value
        try:
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            return utc(datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def _json_field(value: Any, name: str) -> Any:
    """A field some loggers write as a JSON string, parsed; a string that is not JSON is unreadable."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise Unreadable(f"'{name}' is text but not JSON") from None
    return value


def _group(row: dict[str, Any], group_by: str | None) -> str | None:
    """The row's group value as text, or None."""
    if not group_by:
        return None
    value = lookup(row, group_by)
    return None if value is None or value == "" else str(value)


def _metadata(*parts: Any) -> dict[str, Any]:
    """The metadata dicts merged, later ones winning (the request's own, then the logger's); non-dicts ignored."""
    merged: dict[str, Any] = {}
    for part in parts:
        if isinstance(part, dict):
            merged.update(part)
    return merged


def _logged(row: dict[str, Any], where: str, tool_calls: str, group_by: str | None) -> Record:
    """A logged request/response pair (an SDK wrapper's or a proxy's line) as a Record."""
    request = _json_field(row.get("request"), "request")
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        raise Unreadable("request without messages")
    response = _json_field(row.get("response"), "response")
    answered = response if isinstance(response, dict) else {}
    rec = Record(where=where, source_id=str(row.get("id") or answered.get("id") or where), messages=[],
                 model=request.get("model"), metadata=_metadata(request.get("metadata"), row.get("metadata")),
                 group=_group(row, group_by),
                 time=parse_time(row.get("timestamp") or row.get("created_at") or answered.get("created")))
    prompt, defect = normalize_messages(request["messages"], tool_calls, rec.changes)
    choices = answered.get("choices")
    if row.get("error") or not answered or answered.get("error") or not isinstance(choices, list) or not choices:
        rec.defect = defect or "error"
        rec.messages = prompt
        return rec
    choice = choices[0] if isinstance(choices[0], dict) else {}
    rec.served_by = answered.get("model")
    rec.finish_reason = choice.get("finish_reason")
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    rec.refused = bool(message.get("refusal"))
    answer, answer_defect = answer_of(message, tool_calls, rec.changes)
    rec.messages = [*prompt, {"role": "assistant", "content": answer}]
    rec.defect = defect or answer_defect
    return rec


def _finetune(row: dict[str, Any], where: str, tool_calls: str, group_by: str | None) -> Record:
    """A fine-tuning row ({"messages": [...], "id", "expected"}) as a Record: its last message is the answer."""
    messages = _json_field(row["messages"], "messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        raise Unreadable("'messages' is not a non-empty list of messages")
    if messages[-1].get("role") != "assistant":
        raise Unreadable("no assistant message at the end (the answer)")
    rec = Record(where=where, source_id=str(row["id"]) if row.get("id") not in (None, "") else where, messages=[],
                 model=row.get("model"), metadata=_metadata(row.get("metadata")),
                 time=parse_time(row.get("timestamp") or row.get("created_at")), group=_group(row, group_by),
                 expected=row.get("expected"))
    prompt, defect = normalize_messages(messages[:-1], tool_calls, rec.changes)
    answer, answer_defect = answer_of(messages[-1], tool_calls, rec.changes)
    rec.messages = [*prompt, {"role": "assistant", "content": answer}]
    rec.defect = defect or answer_defect
    return rec


def to_record(raw: Any, where: str, tool_calls: str, group_by: str | None) -> Record:
    """A raw row as a Record; Unreadable (one reason) when it is neither a logged request nor a fine-tuning row."""
    if isinstance(raw, Unreadable):
        raise raw
    if not isinstance(raw, dict):
        raise Unreadable("not a JSON object")
    if raw.get("request") is not None:
        return _logged(raw, where, tool_calls, group_by)
    if raw.get("messages") is not None:
        return _finetune(raw, where, tool_calls, group_by)
    raise Unreadable("neither a logged request (request/response) nor a fine-tuning row (messages)")
