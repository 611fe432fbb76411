"""A stage run's arguments made valid on a worker that shares no disk with the search (docs/scale-out.md).

A job's arguments name local paths: a model or adapter in this machine's cache of a remote store, a dataset file, a
local candidate folder. Before a stage run is sent to a work pool, `portable` rewrites each such path as
`store:<rel>`, uploading what the store does not hold yet (a dataset file as `inputs/<sha256>/<name>`, a folder as
`inputs/<key>/`, both keyed by content); on the worker, `localized` turns every `store:<rel>` back into a path on
its own disk (its cache, fetched and hashed). With a local store (one folder every worker mounts) nothing changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from tasks.store import cache
from tasks.store.guards import rm_local, sha256_file, tmp_name
from tasks.store.keys import content_key
from tasks.store.remote import get
from tasks.store.results import input_path, keyed_folder
from tasks.store.store import Store

PREFIX = "store:"
PATH_ARGS = {"model_dir", "adapter_dir", "train_path", "test_path", "dev_from", "paths"}  # the jobs' path arguments
INPUTS = input_path("")  # where uploaded inputs live (tasks/store/results.py)
_SENT: dict[tuple[str, str, int, int], str] = {}  # (store, file, size, mtime_ns) -> its rel, uploaded by this process


def portable(params: dict[str, Any], store: Store) -> dict[str, Any]:
    """`params` with every local path argument rewritten as `store:<rel>` (uploaded when missing); as is when local."""
    if store.local:
        return params
    out = dict(params)
    for name in PATH_ARGS & set(params):
        value = params[name]
        out[name] = {k: _portable_path(v, store) for k, v in value.items()} if isinstance(value, dict) \
            else _portable_path(value, store)
    return out


def _portable_path(value: Any, store: Store) -> Any:
    """One path as `store:<rel>`: a cached result by its key, a local file or folder uploaded by its content."""
    if not isinstance(value, str) or not value or value.startswith(PREFIX):
        return value
    path = Path(value)
    root = cache.cache_root().resolve()
    try:
        if path.is_absolute() and path.resolve().is_relative_to(root):
            return PREFIX + path.resolve().relative_to(root).as_posix()  # models/<key>, adapters/<key>
        if path.is_file():
            stat = path.stat()
            sent = (store.url, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            if sent not in _SENT:  # a batch's jobs name the same dataset file: hashed and asked for once
                rel = f"{input_path(sha256_file(path)[:16])}/{path.name}"
                if not store.exists(rel):
                    store.write_bytes(rel, path.read_bytes())
                _SENT[sent] = rel
            return PREFIX + _SENT[sent]
        if path.is_dir():
            return PREFIX + _upload_folder(path, store)
    except OSError:
        return value
    return value  # a hub id, a zoo name: valid anywhere


def _upload_folder(path: Path, store: Store) -> str:
    """Upload a local folder (a candidate's weights) once, keyed by its files' names, sizes and hashes."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    key = content_key("input-folder", [(p.relative_to(path).as_posix(), p.stat().st_size, sha256_file(p))
                                       for p in files])
    rel = input_path(key)
    if not store.exists(rel):
        with store.new_dir(rel) as tmp:
            shutil.copytree(path, tmp, dirs_exist_ok=True)
    return rel


def localized(params: dict[str, Any]) -> dict[str, Any]:
    """On a worker: `params` with every `store:<rel>` replaced by a path on this machine (fetched and checked)."""
    refs = [v for v in params.values() if isinstance(v, str) and v.startswith(PREFIX)] + \
        [v for d in params.values() if isinstance(d, dict) for v in d.values() if isinstance(v, str)
         and v.startswith(PREFIX)]
    if not refs:
        return params
    store = Store(params["store_root"])

    def local(value: Any) -> Any:
        """One argument on this machine."""
        if not isinstance(value, str) or not value.startswith(PREFIX):
            return value
        return str(local_path(store, value.removeprefix(PREFIX)))

    return {k: {n: local(v) for n, v in p.items()} if isinstance(p, dict) else local(p) for k, p in params.items()}


def local_path(store: Store, rel: str) -> Path:
    """A store result or input on this machine: a folder through the cache, a file downloaded once (its name holds
    its sha256, checked)."""
    if store.local:
        return store.local_dir(rel)
    target = cache.cache_root() / rel
    if rel.startswith(INPUTS) and target.is_file():  # fetched before, its sha256 checked then: no request
        return target
    if keyed_folder(rel) or store.fs.isdir(store.path(rel)):
        return store.local_dir(rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.parent / tmp_name()
    try:
        data = get(store.fs, store.path(rel))
        digest = rel.removeprefix(INPUTS).split("/", 1)[0]
        if rel.startswith(INPUTS) and hashlib.sha256(data).hexdigest()[:16] != digest:
            from tasks.core.errors import EnvironmentFailure

            raise EnvironmentFailure(f"store: {rel} arrived damaged from {store.root}; send the stage run again")
        part.write_bytes(data)
        os.replace(part, target)
    finally:
        rm_local(part)
    return target
