"""A machine's local copies of a remote store's folder results (models, adapters), keyed by content key.

A worker that shares no disk with the others (docs/scale-out.md) fetches what a job needs from the store into this
cache, and keeps there what it made and uploaded, so the next job on the same machine reads it from disk. A key names
the same bytes in every store (it hashes what determines them), so one cache serves every store a machine uses.

Every fetched file is hashed against the result's manifest before the copy counts; a copy is used only while its
manifest equals the store's (a result recomputed after damage replaces it). The cache is bounded
(`compute.cache_gb`, $BASESEARCH_CACHE_GB): after a fetch the least recently used copies are removed until it fits.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.core.errors import EnvironmentFailure
from tasks.store.guards import MANIFEST, rm_local, sha256_file, tmp_name

DEFAULT_CACHE = "~/.cache/basesearch/store"
DEFAULT_CACHE_GB = 100.0
USED = ".used"  # touched on every use: the cache's eviction order (file times, so other processes' uses count)


def cache_root() -> Path:
    """The cache's folder: $BASESEARCH_CACHE_DIR (compute.cache_dir sets it), else ~/.cache/basesearch/store."""
    return Path(os.environ.get("BASESEARCH_CACHE_DIR") or DEFAULT_CACHE).expanduser()


def cache_limit() -> int:
    """The cache's bound in bytes: $BASESEARCH_CACHE_GB (compute.cache_gb sets it), else 100 GB."""
    try:
        return int(float(os.environ.get("BASESEARCH_CACHE_GB") or DEFAULT_CACHE_GB) * 1e9)
    except ValueError:
        raise EnvironmentFailure(f"BASESEARCH_CACHE_GB={os.environ['BASESEARCH_CACHE_GB']!r} is not a number of "
                                 "gigabytes; hint: BASESEARCH_CACHE_GB=100") from None


def configure(cache_dir: str | None, cache_gb: float | None) -> None:
    """Apply a config's compute.cache_dir and cache_gb to this process (and the worker processes it starts)."""
    if cache_dir:
        os.environ["BASESEARCH_CACHE_DIR"] = str(Path(cache_dir).expanduser())
    if cache_gb is not None:
        os.environ["BASESEARCH_CACHE_GB"] = str(cache_gb)


def cached(rel: str, manifest: dict[str, Any]) -> Path | None:
    """The cached copy of folder result `rel` when it holds exactly `manifest`'s files, else None (touched as used)."""
    folder = cache_root() / rel
    try:
        if json.loads((folder / MANIFEST).read_text())["files"] != manifest["files"]:
            return None
        (folder / USED).touch()
    except (OSError, ValueError, KeyError):
        return None
    return folder


def add(rel: str, part: Path, manifest: dict[str, Any]) -> Path:
    """Make the finished local folder `part` (every file checked against `manifest`) the cached copy of `rel`."""
    folder = cache_root() / rel
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not (part / MANIFEST).is_file():
        (part / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    (part / USED).touch()
    if folder.exists():  # an older copy (another manifest) or one another process just added
        aside = folder.parent / tmp_name()
        try:
            os.replace(folder, aside)
        except OSError:
            pass
        rm_local(aside)
    try:
        os.replace(part, folder)
    except OSError:  # another process put the same result there first: as good
        rm_local(part)
    evict(keep=folder)
    return folder


def check_files(part: Path, manifest: dict[str, Any]) -> str | None:
    """Why the downloaded folder `part` is not `manifest`'s files (missing, size, sha256), or None."""
    for name, rec in manifest["files"].items():
        path = part / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != rec["size"]:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {rec['size']}"
        if sha256_file(path) != rec["sha256"]:
            return f"{name} differs from its manifest's sha256"
    return None


def new_part() -> Path:
    """A fresh temp folder inside the cache (same file system: it becomes an entry by one rename)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    part = root / tmp_name()
    part.mkdir()
    return part


def entries() -> list[tuple[float, int, Path]]:
    """(last use, bytes, folder) of every cached result."""
    out = []
    root = cache_root()
    for kind in (root.iterdir() if root.is_dir() else []):
        if not kind.is_dir() or kind.name.startswith("."):
            continue
        for entry in kind.iterdir():
            used = entry / USED
            if entry.name.startswith(".") or not used.exists():
                continue
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            out.append((used.stat().st_mtime, size, entry))
    return out


def evict(keep: Path | None = None) -> list[Path]:
    """Remove the least recently used cached results until the cache fits its bound; return what was removed."""
    limit, found = cache_limit(), sorted(entries(), key=lambda e: e[0])
    total, removed = sum(size for _, size, _ in found), []
    for _, size, folder in found:
        if total <= limit:
            break
        if folder == keep:
            continue
        aside = folder.parent / tmp_name()
        try:
            os.replace(folder, aside)  # out of sight at once; a process holding it open keeps reading its files
        except OSError:
            continue
        shutil.rmtree(aside, ignore_errors=True)
        total -= size
        removed.append(folder)
    return removed


def sweep(max_age_s: float = 3600.0) -> None:
    """Remove temp folders of fetches that died (older than an hour) from the cache's top level."""
    root = cache_root()
    for p in root.glob(".tmp-*") if root.is_dir() else []:
        try:
            if time.time() - p.stat().st_mtime > max_age_s:
                rm_local(p)
        except OSError:
            pass
