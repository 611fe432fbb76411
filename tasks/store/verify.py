"""Whether a stored result is whole: the store's damage checks, at two depths (docs/scale-out.md, "Damage").

- Shallow (`exists`, what the plan counts): a Parquet file's magic bytes and footer; a folder's manifest and every
  file's size, and a file's sha256 when its time differs from the manifest's. Microseconds a result.
- Deep (`claim`, where a stage decides to reuse a result it is about to read): every byte. A Parquet file is read
  whole with its page checksums verified (written by `Store.write_parquet`; files written before checksums are
  decoded whole, which finds most damage but not all); a folder of at most DEEP_HASH_BYTES has every file hashed
  against its manifest once per process, whatever its times say (a flipped bit keeps a file's size and time).
  A larger folder (a 14 GB base model) is hashed only when its sizes or times changed: hashing it on every run
  would cost a minute.

A damaged result is one warning line naming it, is removed (under its lock) and recomputed; the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.store.guards import MANIFEST, parquet_damage, rm_local, say, sha256_file, tmp_name
from tasks.store.remote import get, head, listing
from tasks.store.results import RESULT_FOLDERS, keyed_folder

if TYPE_CHECKING:
    from filelock import FileLock

DEEP_HASH_BYTES = 1 << 30  # folders up to 1 GiB (LoRA adapters, the zoo) are hashed whole once per process

_GUARD = threading.Lock()
_VERIFIED: dict[str, tuple[int, int]] = {}  # file -> (size, mtime_ns) it was last verified at (shallow)
_DEEP: dict[str, tuple[int, int]] = {}  # file -> (size, stamp) whose every byte this process verified
_WARNED: set[tuple[str, str]] = set()  # (root, rel) already reported damaged by this process


# How every stored Parquet file is read (pyarrow's read_table arguments): its page checksums verified, in one
# thread: pyarrow 26 aborts the interpreter at exit (`terminate called without an active exception`) after a
# threaded read of a damaged file raised; a single-threaded read raises the same error and exits cleanly (and
# without pre-buffering no background IO thread is left either).
VERIFIED_READ = {"page_checksum_verification": True, "use_threads": False, "pre_buffer": False}


def read_verified(source: Any) -> Any:
    """A Parquet file (path or open file) read whole into a pyarrow Table, its page checksums verified."""
    import pyarrow.parquet as pq

    return pq.read_table(source, **VERIFIED_READ)


def forget(target: str, root: str, rel: str) -> None:
    """A result was just written whole at `target`: verify it again when next read, and warn again if damaged."""
    _VERIFIED.pop(target, None)
    _DEEP.pop(target, None)
    _WARNED.discard((root, rel))


class Checks:
    """The damage checks of a Store (mixed into tasks/store/store.py Store)."""

    fs: Any
    root: str
    local: bool

    if TYPE_CHECKING:  # Store's own (a stub here would shadow it: Store inherits this class first)
        def path(self, rel: str) -> str: ...  # Store's
        def _lock_dir(self) -> Path: ...  # Store's
        def _lock_of(self, rel: str) -> FileLock: ...  # Store's
        def fetch(self, rel: str, manifest: dict[str, Any] | None = None) -> tuple[Path | None, str | None]: ...
        def remote_manifest(self, rel: str) -> dict[str, Any] | None: ...  # Store's (tasks/store/remote.py)

    def exists(self, rel: str, deep: bool = False) -> bool:
        """True when a finished, whole result is at `rel` (every byte checked with `deep`); a damaged one is
        reported, removed, and is absent."""
        why = self.damage(rel, deep)
        if why is None:
            return True
        if why:
            self._discard(rel, why, deep)
        return False

    def damage(self, rel: str, deep: bool = False) -> str | None:
        """Why the result at `rel` cannot be used ('' when there is none), or None when it is whole."""
        target = self.path(rel)
        if not self.local and keyed_folder(rel):
            return self._remote_folder_damage(rel, deep)
        try:
            if self.local:
                st = os.stat(target)
                is_dir, size, stamp = stat.S_ISDIR(st.st_mode), st.st_size, st.st_mtime_ns
            else:
                is_dir, size, stamp = self._remote_stat(target, rel)
        except FileNotFoundError:
            return ""
        if is_dir and not self.local:  # a folder result at another depth (inputs/<sha>/<name>), or runs/<id>
            return self._remote_folder_damage(rel, deep) if rel.startswith(RESULT_FOLDERS) else None
        if is_dir:
            return self._folder_damage(target, rel.startswith(RESULT_FOLDERS), deep)
        if not rel.endswith(".parquet") or (_DEEP if deep else _VERIFIED).get(target) == (size, stamp):
            return None  # other files are written in one rename: present means whole
        why = self._parquet_file_damage(target, size) or (self._parquet_page_damage(target) if deep else None)
        if why is None:
            _VERIFIED[target] = (size, stamp)
            if deep:
                _DEEP[target] = (size, stamp)
        return why

    def _remote_stat(self, target: str, rel: str) -> tuple[bool, int, int]:
        """(is a folder, size, stamp) of `target` in a remote store; FileNotFoundError when absent. A file costs one
        request (a HEAD); a name that is no file, one more (a listing: a folder such as runs/<id>, or nothing)."""
        try:
            info = head(self.fs, target)
        except FileNotFoundError:
            if rel.endswith(".parquet") or not listing(self.fs, target):  # no stage writes a folder named .parquet
                raise
            return True, 0, 0
        return False, int(info.get("size") or 0), hash(str(info.get("ETag") or info.get("LastModified")))

    def _remote_folder_damage(self, rel: str, deep: bool) -> str | None:
        """damage() of folder result `rel` in a remote store: its manifest (one GET; when there is none, one listing
        tells absent from cut short), then its files' sizes (one listing), or with `deep` this machine's copy of
        every byte (downloaded and hashed once)."""
        target = self.path(rel)
        manifest = self.remote_manifest(rel)
        if manifest is None:
            return "it has no manifest: written before manifests existed, or cut short" \
                if listing(self.fs, target) else ""
        if manifest.get("damaged") or not isinstance(manifest.get("files"), dict):
            return "its manifest is damaged"
        if deep:
            return self.fetch(rel, manifest)[1]
        found = {i["name"].removeprefix(f"{target}/"): int(i.get("size") or 0)
                 for i in listing(self.fs, target, recursive=True)}
        for name, rec in manifest["files"].items():
            if found.get(name) != rec["size"]:
                return f"{name} is missing" if name not in found else \
                    f"{name} has {found[name]} bytes, its manifest says {rec['size']}"
        return None

    def _parquet_file_damage(self, target: str, size: int) -> str | None:
        """Why the Parquet file at `target` is not whole (magic bytes at both ends, footer parses), or None."""
        # Its size given, an object store's file opens without asking for it again.
        with (open(target, "rb") if self.local else self.fs.open(target, "rb", size=size)) as fh:
            first = fh.read(4)
            fh.seek(max(size - 8, 0))
            tail = fh.read(8)
            n = int.from_bytes(tail[:4], "little") if len(tail) == 8 else size
            footer = None
            if n + 12 <= size:
                fh.seek(size - 8 - n)
                footer = fh.read(n)
        return parquet_damage(first, tail, footer, size)

    def _parquet_page_damage(self, target: str) -> str | None:
        """Why the Parquet file at `target` does not read whole (a page fails its checksum or decoding), or None."""
        import pyarrow as pa

        try:
            if self.local:
                with open(target, "rb") as fh:
                    read_verified(fh)
            else:  # one GET, not a read-ahead file's range requests
                read_verified(pa.BufferReader(get(self.fs, target)))
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to decode means damage: the footer parsed
            return f"its data does not read back: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return None

    def _folder_damage(self, target: str, result: bool, deep: bool = False) -> str | None:
        """Why the folder at `target` of a local store is not a whole result (manifest missing, file missing or
        changed), or None.

        A folder of models/ or adapters/ without a manifest was written before manifests existed (or is half an
        upload): it counts as damaged, so an old store's results are recomputed once. Other folders (runs/<id>)
        have none and are present as they are.
        """
        try:
            with open(f"{target}/{MANIFEST}", "rb") as fh:
                files = json.loads(fh.read())["files"]
        except FileNotFoundError:
            return "it has no manifest: written before manifests existed, or cut short" if result else None
        except (ValueError, KeyError, TypeError):
            return "its manifest is damaged"
        every_byte = deep and sum(rec["size"] for rec in files.values()) <= DEEP_HASH_BYTES
        seen: dict[str, list[int]] | None = None  # read only when a file's time differs from the manifest's
        for name, rec in files.items():
            path = f"{target}/{name}"
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return f"{name} is missing"
            if st.st_size != rec["size"]:
                return f"{name} has {st.st_size} bytes, its manifest says {rec['size']}"
            stamp = (st.st_size, st.st_mtime_ns)
            if every_byte:
                if _DEEP.get(path) != stamp:
                    if sha256_file(path) != rec["sha256"]:
                        return f"{name} differs from its manifest's sha256"
                    _DEEP[path] = _VERIFIED[path] = stamp
                continue
            # Hash again only a file touched since it was written or last verified (a copy, an edit): a
            # 14 GB model is hashed in about a minute, its sizes and times checked in microseconds.
            if st.st_mtime_ns == rec["mtime_ns"] or _VERIFIED.get(path) == stamp:
                continue
            seen = self._seen(target) if seen is None else seen
            if seen.get(name) == list(stamp):
                _VERIFIED[path] = stamp
                continue
            if sha256_file(path) != rec["sha256"]:
                return f"{name} differs from its manifest's sha256"
            _VERIFIED[path] = stamp
            self._remember(target, name, stamp)
        return None

    def _seen_path(self, target: str) -> Path:
        """The side file recording when each file of folder `target` was last verified (local stores only)."""
        return self._lock_dir() / f"{target.removeprefix(self.root + '/')}.verified"

    def _seen(self, target: str) -> dict[str, list[int]]:
        """{file: [size, mtime_ns]} verified by hashing since the folder was written (another run's too)."""
        try:
            return json.loads(self._seen_path(target).read_text())
        except (OSError, ValueError):
            return {}

    def _remember(self, target: str, name: str, stamp: tuple[int, int]) -> None:
        """Record that `name` hashed right at this (size, mtime_ns), so no later run hashes it again."""
        side = self._seen_path(target)
        try:
            side.parent.mkdir(parents=True, exist_ok=True)
            tmp = side.parent / tmp_name()
            tmp.write_text(json.dumps(self._seen(target) | {name: list(stamp)}))
            os.replace(tmp, side)
        except OSError:  # only a cache: the file is hashed again next time
            pass

    def warn_damaged(self, rel: str, why: str) -> None:
        """The one warning line for a damaged result (once per process and result)."""
        with _GUARD:
            first = (self.root, rel) not in _WARNED
            _WARNED.add((self.root, rel))
        if first:
            say(logging.WARNING, f"store: {rel} is damaged ({why}); it will be removed and recomputed")

    def _discard(self, rel: str, why: str, deep: bool = False) -> None:
        """Warn once that `rel` is damaged; remove it unless another run holds its lock (it recomputes it)."""
        from filelock import Timeout

        self.warn_damaged(rel, why)
        if not self.local:  # another machine may be uploading it: a new result replaces it under the lock
            return
        lk = self._lock_of(rel)
        try:
            lk.acquire(timeout=0)
        except Timeout:
            return
        try:
            if self.damage(rel, deep):  # still damaged now that no one else can be writing it
                aside = f"{self.path(rel).rsplit('/', 1)[0]}/{tmp_name()}"
                os.replace(self.path(rel), aside)  # gone in one step; the rest is removed at leisure
                rm_local(aside)
        finally:
            lk.release()
