"""The content-addressed store: every stage's result lives under a key hashed from what determines it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import fsspec
import pandas as pd
from fsspec.implementations.local import LocalFileSystem

DEFAULT_STORE = "./store"


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


def resolve_store(arg: str | None) -> str:
    """The store root: --store, else $BASESEARCH_STORE, else ./store."""
    return arg or os.environ.get("BASESEARCH_STORE") or DEFAULT_STORE


class Store:
    """A folder (local, or any fsspec URL) holding models, adapters, outputs, judgments and runs."""

    def __init__(self, root: str) -> None:
        """Open (and create) the store at `root`."""
        self.fs, path = fsspec.core.url_to_fs(root)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = str(Path(path).resolve()) if self.local else path.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, rel: str) -> str:
        """Absolute path (in the store's filesystem) of a relative store path."""
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        """True when a finished result is at `rel`."""
        return self.fs.exists(self.path(rel))

    def _atomic_write(self, rel: str, data: bytes) -> str:
        """Write bytes to a temp file beside the target, then rename: a crash never leaves half a file."""
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open(tmp, "wb") as fh:
            fh.write(data)
        if self.local:
            os.replace(tmp, target)  # atomic on POSIX
        else:
            self.fs.mv(tmp, target)
        return target

    def write_text(self, rel: str, text: str) -> str:
        """Atomically write a text file."""
        return self._atomic_write(rel, text.encode("utf-8"))

    def read_text(self, rel: str) -> str:
        """Read a text file."""
        with self.fs.open(self.path(rel), "rb") as fh:
            return fh.read().decode("utf-8")

    def write_json(self, rel: str, obj: Any) -> str:
        """Atomically write JSON (indented, for people)."""
        return self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def read_json(self, rel: str) -> Any:
        """Read a JSON file."""
        return json.loads(self.read_text(rel))

    def write_parquet(self, rel: str, df: pd.DataFrame) -> str:
        """Atomically write a DataFrame as Parquet."""
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return self._atomic_write(rel, buf.getvalue())

    def read_parquet(self, rel: str) -> pd.DataFrame:
        """Read a Parquet file."""
        with self.fs.open(self.path(rel), "rb") as fh:
            return pd.read_parquet(fh)

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Atomically write raw bytes (plots)."""
        return self._atomic_write(rel, data)

    @contextmanager
    def new_dir(self, rel: str) -> Iterator[Path]:
        """Yield a local temp folder to fill; on success it becomes `rel` in one rename (or upload)."""
        target = self.path(rel)
        if self.local:
            parent = Path(target).parent
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
        else:
            tmp = Path(tempfile.mkdtemp(prefix="basesearch-"))
        try:
            yield tmp
            if self.local:
                if Path(target).exists():  # a concurrent run finished first; its result is as good
                    shutil.rmtree(tmp)
                else:
                    os.replace(tmp, target)
            else:
                self.fs.put(str(tmp), target, recursive=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def local_dir(self, rel: str) -> Path:
        """A local folder holding `rel` (the store itself when local, else a download cache)."""
        if self.local:
            return Path(self.path(rel))
        cache = Path(tempfile.gettempdir()) / "basesearch-cache" / content_key(self.root, rel)
        if not cache.exists():
            self.fs.get(self.path(rel), str(cache), recursive=True)
        return cache
