"""The content-addressed store: every stage's result lives under a key hashed from what determines it.

What several runs sharing one store can count on (docs/architecture.md, "Store layout"):
- A folder result (models/<key>/, adapters/<key>/) counts as present only when its manifest `.manifest.json`
  (every file's name, size, sha256), written last, is there and matches; a Parquet result only when its magic
  bytes and footer are whole. A damaged result is reported in one warning line, removed and recomputed. Folders
  written before manifests existed count as absent and are recomputed once.
- `claim(rel)` / `lock(rel)`: a per-key flock() under <root>/.locks/, released by the OS when its run dies, so two
  runs never compute one result at once; the second waits (one line saying for whom) and reuses the result. For a
  remote fsspec store the locks are local files: they exclude runs on this machine only.
- Temp files and folders (`.tmp-<pid>-<host>-...`) of runs that died are removed by the next run on the host.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import fsspec
from filelock import FileLock, Timeout
from fsspec.implementations.local import LocalFileSystem

from tasks.core.errors import EnvironmentFailure, UserError
from tasks.store.guards import (MANIFEST, TMP, disk_failure, file_lock, owner_line, rm_local, say,
                                temp_is_dead, tmp_name, write_manifest, write_owner)
from tasks.store.keys import content_key
from tasks.store.lease import LEASES, Lease, conditional_writes
from tasks.store.remote import Remote, get, listing
from tasks.store.verify import VERIFIED_READ, Checks, forget

T = TypeVar("T")
U = TypeVar("U")
__all__ = ["MANIFEST", "Store", "resolve_store", "tmp_name"]  # MANIFEST, tmp_name: imported from here by callers

if TYPE_CHECKING:
    import pandas as pd  # imported where Parquet is read or written: the command line checks a config without it

DEFAULT_STORE = "./store"
LOCKS = ".locks"
OWNER_WAIT_S = 1.0  # how long a waiting run gives a new holder to say who it is, for the waiting line
LOCK_POLL_S = 0.5  # how often a waiting run retries a held lock; it waits as long as the owner lives (hours)
# Store calls a stage makes at once on an object store: each waits on a request (5-50 ms, S3 or moto on a busy
# machine), not on this machine's CPU, so 8 in flight make a judge stage's ~2,000 requests (8 a judged pair: checks,
# lease, reads, write) cost about an eighth of their sum. A local store is asked in microseconds: one at a time.
REMOTE_CALLS = 8

_GUARD = threading.Lock()
_OPENED: set[tuple[str, str]] = set()  # (filesystem, root) probed and swept by this process
_LEASING: dict[tuple[str, str], bool] = {}  # (filesystem, root) -> whether its results are leased across machines
_LOCKS: dict[str, FileLock] = {}  # one object per lock file: reentrant per thread, exclusive between threads


def resolve_store(arg: str | None) -> str:
    """The store root: --store, else $BASESEARCH_STORE, else ./store."""
    return arg or os.environ.get("BASESEARCH_STORE") or DEFAULT_STORE


class Store(Checks, Remote):
    """A folder (local, or any fsspec URL) holding models, adapters, outputs, judgments and runs."""

    def __init__(self, root: str) -> None:
        """Open the store at `root`: created, checked writable and swept of dead runs' temps once per process."""
        # No listings cache for a remote store: other machines add results while this process runs. No instance
        # cache either: fsspec keys it on the arguments, not on the environment the client reads its endpoint and
        # credentials from (AWS_ENDPOINT_URL, AWS_*), so a changed environment would get the old endpoint's client.
        local_url = fsspec.utils.get_protocol(root) in ("file", "local")
        remote = {"use_listings_cache": False, "skip_instance_cache": True}
        try:
            self.fs, path = fsspec.core.url_to_fs(root, **({} if local_url else remote))
        except ImportError as e:  # s3fs, gcsfs...: fsspec names the package
            raise UserError(f"store {root}: {e}; hint: pip install s3fs (s3://) or gcsfs (gs://)") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = str(Path(path).resolve()) if self.local else path.rstrip("/")
        self.url = self.root if self.local else root  # what another process (a worker) opens the same store by
        opened = (type(self.fs).__name__, self.root)
        if opened not in _OPENED:
            self._probe()
            self.sweep_temps()
            with _GUARD:
                _OPENED.add(opened)
                # Exclusion across machines needs conditional writes (tasks/store/lease.py): probed once.
                _LEASING[opened] = not self.local and conditional_writes(self.fs, f"{self.root}/{tmp_name()}-lease")
        self.leasing = _LEASING.get(opened, False)

    def _probe(self) -> None:
        """UserError when the root is a file; EnvironmentFailure when a temp file cannot be written in it."""
        if self.fs.isfile(self.root):
            raise UserError(f"store {self.root}: is a file, not a folder; hint: --store DIR")
        probe = f"{self.root}/{tmp_name()}-probe"
        try:
            if not self.whole_put():  # an object store has no folders; s3fs would create a missing bucket
                self.fs.makedirs(self.root, exist_ok=True)
            self._put_bytes(probe, b"")
            self.fs.rm(probe)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"store {self.root}: a part of this path is a file; hint: --store DIR") from None
        except OSError as e:
            hint = "check the path, or choose another with --store DIR" if self.local else \
                "check the bucket and the credentials (AWS_* variables, ~/.aws; docs/scale-out.md)"
            raise disk_failure(e, self.root) or EnvironmentFailure(
                f"store {self.url}: cannot write in it ({e.strerror or type(e).__name__}); hint: {hint}") from None
        except Exception as e:  # noqa: BLE001 - an object store's client: no credentials, no endpoint, no bucket
            if self.local:
                raise
            raise EnvironmentFailure(f"store {self.url}: cannot write in it ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:160] if str(e) else ''}); hint: check the bucket and "
                                     "the credentials (AWS_* variables, ~/.aws; docs/scale-out.md)") from None

    def path(self, rel: str) -> str:
        """Absolute path (in the store's filesystem) of a relative store path; UserError if it leaves the store."""
        if not rel or rel.startswith(("/", "\\", "~")) or "://" in rel or re.match(r"^[A-Za-z]:", rel) \
                or ".." in PurePosixPath(rel.replace("\\", "/")).parts:
            raise UserError(f"store path '{rel}': must be relative and stay inside the store {self.root}")
        return f"{self.root}/{rel}"

    # ------------------------------------------------------------------------------------------ locks

    def _lock_dir(self) -> Path:
        """Where lock files live: in the store, or for a remote store in a local folder (per machine)."""
        if self.local:
            return Path(self.root) / LOCKS
        return Path(tempfile.gettempdir()) / "basesearch-locks" / content_key(str(self.fs.protocol), self.root)

    def _lock_of(self, rel: str) -> FileLock:
        """The lock of result `rel` (its folder created)."""
        self.path(rel)  # checks that rel stays inside the store
        path = self._lock_dir() / f"{rel}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise disk_failure(e, self.root) or e from None
        return file_lock(path)

    @contextmanager
    def lock(self, rel: str, wait: bool = True) -> Iterator[bool]:
        """Hold `rel`'s lock (reentrant in one thread) and yield True; when another run or thread holds it, say for
        whom and wait, or with `wait=False` yield False at once, without it."""
        lk = self._lock_of(rel)
        owner = Path(lk.lock_file).with_suffix(".owner")
        try:
            lk.acquire(timeout=0)
        except Timeout:
            if not wait:
                yield False
                return
            deadline = time.monotonic() + OWNER_WAIT_S
            while not owner.exists() and time.monotonic() < deadline:  # its holder writes it just after taking it
                time.sleep(0.05)
            say(logging.INFO, f"store: waiting for {owner_line(owner)} computing {rel}")
            lk.acquire(timeout=-1, poll_interval=LOCK_POLL_S)
        outer = lk.lock_counter == 1
        lease = Lease(self.fs, self.path(f"{LEASES}/{rel}.lease"), rel) if outer and self.leasing else None
        try:
            if outer:
                write_owner(owner)
            if lease is not None:  # other machines: after this machine's lock, so one run per machine asks
                if wait:
                    lease.acquire()
                elif not lease.try_acquire():
                    lease = None  # another machine's: nothing of it to release
                    yield False
                    return
            yield True
        finally:
            if lease is not None:
                lease.release()
            if outer:
                owner.unlink(missing_ok=True)
            lk.release()

    @contextmanager
    def claim(self, rel: str) -> Iterator[bool]:
        """`with store.claim(rel) as todo:` True: compute `rel` now, holding its lock; False: a whole result is
        there (found at once, or left by the run this one waited for)."""
        # Every byte: the stage reads what it reuses next. Not first when this thread holds the lock already (a pool
        # run's batch takes it before the stage's claim): the check under the lock below is the one that counts.
        if not self._lock_of(rel).is_locked and self.exists(rel, deep=True):
            yield False
            return
        with self.lock(rel):
            yield not self.exists(rel, deep=True)

    def compute_once(self, rel: str, compute: Callable[[], T]) -> tuple[T | None, bool]:
        """Every stage's skeleton: (compute's return, False) when this call computes `rel` (which compute writes),
        holding its lock; (None, True) when a whole result is there, found at once or left by a run waited for."""
        with self.claim(rel) as todo:
            return (compute(), False) if todo else (None, True)

    def folder_once(self, rel: str, fill: Callable[[Path], T]) -> tuple[T | None, bool]:
        """compute_once for a folder result: `fill` writes a temp folder that becomes `rel` whole (new_dir)."""
        def make() -> T:
            with self.new_dir(rel) as tmp:
                return fill(tmp)
        return self.compute_once(rel, make)

    # ------------------------------------------------------------------------------------------ temps

    def sweep_temps(self) -> list[str]:
        """Remove temp files and folders of dead runs from the store's folders; return what was removed."""
        removed = []
        dirs = [self.root]
        for d in (self.root, f"{self.root}/runs"):
            dirs += [p for p, t, _ in self._children(d) if t and not p.endswith(f"/{LOCKS}")
                     and not p.rsplit("/", 1)[-1].startswith(TMP)]
        for d in dict.fromkeys(dirs):
            for p, is_dir, mtime in self._children(d):
                name = p.rsplit("/", 1)[-1]
                if name.startswith(TMP) and temp_is_dead(name, mtime):
                    try:
                        rm_local(p) if self.local else self.fs.rm(p, recursive=is_dir)
                        removed.append(p)
                    except OSError:  # another run removed it first, or it cannot be removed: not ours to fix
                        pass
        if removed:
            say(logging.INFO, f"store: removed {len(removed)} temp file(s) left by runs that died")
        return removed

    def names(self, rel: str) -> set[str]:
        """The names of the entries of store folder `rel` (none when it is not there), a temp being written not among
        them (it is renamed to its name when whole): one listing of a bucket."""
        names = (p.rsplit("/", 1)[-1] for p, _, _ in self._children(self.path(rel)))
        return {name for name in names if not name.startswith(TMP)}

    def tree(self, rel: str) -> set[str]:
        """The paths of every file below store folder `rel` (none when it is not there), temps being written not
        among them: one listing of a bucket however deep it goes."""
        top = self.path(rel)
        if self.local:  # os.walk skips a folder removed while it walks (a queue its search closes meanwhile)
            found = (os.path.join(d, f) for d, _, files in os.walk(top) for f in files)
        else:
            found = (i["name"] for i in listing(self.fs, top, recursive=True))
        return {p for p in found if not any(part.startswith(TMP) for part in p.removeprefix(top).split("/"))}

    def _children(self, d: str) -> list[tuple[str, bool, float | None]]:
        """(path, is folder, mtime in s or None) of each entry of folder `d` ([] when it is not there)."""
        try:
            if self.local:
                return [(e.path, e.is_dir(follow_symlinks=False), e.stat(follow_symlinks=False).st_mtime)
                        for e in os.scandir(d)]
            out = []
            for i in listing(self.fs, d):
                t = i.get("mtime") or i.get("LastModified") or i.get("created")
                out.append((i["name"].rstrip("/"), i["type"] == "directory", t.timestamp() if hasattr(
                    t, "timestamp") else t if isinstance(t, (int, float)) else None))
            return out
        except (FileNotFoundError, NotADirectoryError):
            return []

    # ----------------------------------------------------------------------------------------- writes

    def _put_bytes(self, path: str, data: bytes) -> None:
        """Write bytes to `path` (tests patch this to simulate a full disk)."""
        with self.fs.open(path, "wb") as fh:
            fh.write(data)

    def _atomic_write(self, rel: str, data: bytes) -> str:
        """Write bytes to a temp file beside the target, then rename: a crash never leaves half a file."""
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        tmp = target if self.whole_put() else f"{parent}/{tmp_name()}"
        try:
            if not self.whole_put():  # an object store has no folders to make (s3fs would ask for the bucket)
                self.fs.makedirs(parent, exist_ok=True)
            self._put_bytes(tmp, data)
            if self.local:
                os.replace(tmp, target)  # atomic on POSIX
            elif tmp != target:
                self.fs.mv(tmp, target)
        except BaseException as e:
            if tmp != target:  # a failed PUT replaced nothing: the target (if any) is the whole older result
                self._rm_quiet(tmp)
            failure = disk_failure(e, self.root) if isinstance(e, Exception) else None
            if failure:
                raise failure from None
            raise
        forget(target, self.root, rel)  # whole again: a later damage is reported again
        return target

    def _rm_quiet(self, path: str) -> None:
        """Remove a file of the store if there, never raising (cleanup after a failed write)."""
        try:
            rm_local(path) if self.local else self.fs.rm(path)
        except Exception:  # noqa: BLE001 - a temp that cannot be removed is swept by a later run
            pass

    def write_text(self, rel: str, text: str) -> str:
        """Atomically write a text file."""
        return self._atomic_write(rel, text.encode("utf-8"))

    def read_text(self, rel: str) -> str:
        """Read a text file (on an object store one GET: opening a file would ask for its size first)."""
        return get(self.fs, self.path(rel)).decode("utf-8")

    def write_json(self, rel: str, obj: Any) -> str:
        """Atomically write JSON (indented, for people)."""
        return self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def read_json(self, rel: str) -> Any:
        """Read a JSON file."""
        return json.loads(self.read_text(rel))

    def write_parquet(self, rel: str, df: pd.DataFrame) -> str:
        """Atomically write a DataFrame as Parquet, with a CRC32 checksum on every page (checked when read)."""
        buf = io.BytesIO()
        df.to_parquet(buf, index=False, write_page_checksum=True)
        return self._atomic_write(rel, buf.getvalue())

    def read_parquet(self, rel: str) -> pd.DataFrame:
        """Read a Parquet file, its page checksums verified; a damaged one is removed, and EnvironmentFailure says to
        run again (a stage's claim checks every byte first, so this happens only to damage done since)."""
        try:
            import pandas as pd
            import pyarrow as pa

            if not self.local:  # one GET, not a read-ahead file's range requests
                return pd.read_parquet(pa.BufferReader(get(self.fs, self.path(rel))), **VERIFIED_READ)
            with self.fs.open(self.path(rel), "rb") as fh:
                return pd.read_parquet(fh, **VERIFIED_READ)
        except FileNotFoundError:
            raise
        except Exception:
            why = self.damage(rel, deep=True)
            if not why:
                raise
            self._discard(rel, why, deep=True)
            raise EnvironmentFailure(f"store: {rel} is damaged ({why}) and was removed; run the same command "
                                     "again to recompute it") from None

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Atomically write raw bytes (plots)."""
        return self._atomic_write(rel, data)

    @contextmanager
    def new_dir(self, rel: str) -> Iterator[Path]:
        """Yield a local temp folder to fill; on success it gets its manifest (last) and becomes `rel` in one
        rename, or is uploaded (files first, manifest last)."""
        target = self.path(rel)
        tmp: Path | None = None
        try:
            if self.local:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(target).parent / tmp_name()
                tmp.mkdir()
            else:
                tmp = self.new_part()
        except OSError as e:
            raise disk_failure(e, self.root) or e from None
        try:
            try:
                yield tmp
            except Exception as e:
                raise disk_failure(e, str(tmp.parent) if not self.local else self.root, full_only=True) or e
            try:
                manifest = write_manifest(tmp)
                self._install(tmp, rel) if self.local else self.upload(tmp, rel, manifest)
            except OSError as e:
                raise disk_failure(e, self.root) or e from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _install(self, tmp: Path, rel: str) -> None:
        """Rename a finished local folder to `rel`, replacing a damaged or manifest-less one there."""
        target = self.path(rel)
        if os.path.isdir(target):
            if self.damage(rel) is None:  # a run that took no lock finished first; its result is as good
                return
            aside = f"{tmp.parent}/{tmp_name()}"
            os.replace(target, aside)
            rm_local(aside)
        os.replace(tmp, target)
        self._seen_path(target).unlink(missing_ok=True)  # times verified of the files it replaced
        forget(target, self.root, rel)

    def each(self, fn: Callable[[U], T], items: Iterable[U]) -> list[T]:
        """[fn(item) for item in items], in order; on an object store REMOTE_CALLS at once (their requests wait on the
        network). fn must be safe to run in threads: a result's lock excludes the other threads too."""
        items = list(items)
        if self.local or len(items) < 2:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(min(REMOTE_CALLS, len(items)), thread_name_prefix="store") as pool:
            return list(pool.map(fn, items))

    def local_dir(self, rel: str) -> Path:
        """A local folder holding `rel` (the store itself when local, else this machine's cached copy, hashed)."""
        return Path(self.path(rel)) if self.local else self.remote_local_dir(rel)
