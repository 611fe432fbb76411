"""Where a dataset came from: a file written by `python -m flows.ingest` names its ingest (source, time window, rows
read and kept) from the folder's manifest, and says when the file no longer has the bytes the ingest wrote."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def _sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks (a dataset can be larger than memory wants)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_text(source: dict[str, Any]) -> str:
    """The ingest's source in a few words: the stored-completions API, or the log files it read."""
    if source.get("api"):
        return "OpenAI stored completions"
    files = source.get("files") or []
    return str(source.get("path") or "") + (f" ({len(files)} files)" if len(files) > 1 else "")


def _n(count: Any) -> str:
    """A count with thousands separators, '?' where the manifest lacks it."""
    return f"{count:,}" if isinstance(count, int) else "?"


def ingest_note(path: str | Path) -> str | None:
    """One line on the ingest that wrote the dataset file `path`, or None when no ingest manifest sits beside it."""
    p = Path(path)
    manifest = p.parent / "ingest.json"
    if not manifest.is_file():
        return None
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
        written = m["outputs"].get(p.name)
    except (ValueError, KeyError, AttributeError, TypeError):
        return f"{p.name}: beside {manifest}, which is not an ingest manifest"
    window, counts = m.get("window") or {}, m.get("counts") or {}
    when = f"{window.get('first') or '?'} to {window.get('last') or '?'}"
    line = (f"ingest of {_source_text(m.get('source') or {})}, requests {when}: {_n(counts.get('rows_read'))} read, "
            f"{_n(counts.get('rows'))} kept ({manifest})")
    if written is None:  # a relabeled file: relabel.json beside it holds its own record
        return line
    if p.is_file() and _sha256(p) != written.get("sha256"):
        line += f"; {p.name} changed since the ingest wrote it"
    return line


def source_lines(datasets: list[Any]) -> list[str]:
    """Markdown list items, one per dataset file an ingest wrote (`datasets`: DatasetSpec-like, name/train/test)."""
    lines = []
    for d in datasets:
        for role, path in (("train", d.train), ("test", d.test)):
            note = ingest_note(path)
            if note:
                lines.append(f"- `{d.name}` {role} ({Path(path).name}): {note}")
    return lines
