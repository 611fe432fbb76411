"""Content keys: every result in the store is named by a hash of what determines it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def content_key(*parts: Any) -> str:
    """A 16-hex-digit key from JSON-able parts (64 bits: collisions need ~4e9 results)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, or of every file in a folder (names and bytes)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
