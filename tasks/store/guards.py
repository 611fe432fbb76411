"""What keeps a store shared by several runs correct: manifests, Parquet checks, temp names of live and dead runs,
lock owners, and one-line messages for a full or read-only disk. Used by tasks/store/store.py only."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from filelock import FileLock

from tasks.core.errors import EnvironmentFailure

MANIFEST = ".manifest.json"  # a leading dot: Hugging Face, peft and mergekit load by name and never see it
TMP = ".tmp-"
STALE_TMP_S = 24 * 3600.0  # a temp whose owner cannot be checked (other host, old name) is dead after a day
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # hex: any host name fits a file name
_TMP_RE = re.compile(r"^\.tmp-(\d+)-([0-9a-f]{8})-")
_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_LOG = logging.getLogger("basesearch")
_GUARD = threading.Lock()
_LOCKS: dict[str, FileLock] = {}  # one object per lock file: reentrant per thread, exclusive between threads


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Full sha256 hex digest of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tmp_name(pid: int | None = None) -> str:
    """A temp name that says which process on which host owns it, so a later run can tell a dead one's."""
    return f"{TMP}{os.getpid() if pid is None else pid}-{_HOST_TAG}-{uuid.uuid4().hex[:12]}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def temp_is_dead(name: str, mtime: float | None) -> bool:
    """A temp of a dead run: its pid is gone on this host, or (owner unknown) it is older than a day."""
    m = _TMP_RE.match(name)
    if m and m.group(2) == _HOST_TAG:
        return not pid_alive(int(m.group(1)))
    return mtime is not None and time.time() - mtime > STALE_TMP_S


def say(level: int, msg: str) -> None:
    """One log line: into the Prefect run's log inside a flow or task run, else to the `basesearch` logger."""
    try:
        if "prefect" not in sys.modules:  # no Prefect, no run: spare importing it (seconds)
            raise LookupError
        from prefect import get_run_logger

        logger: Any = get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run (tests, tools): plain logging
        logger = _LOG
    logger.log(level, msg)


def disk_failure(exc: BaseException, where: str, full_only: bool = False) -> EnvironmentFailure | None:
    """One line for a write that failed because the disk is full (or read-only, unless full_only), else None."""
    no = getattr(exc, "errno", None)
    again = "then run the same command again: finished results are kept"
    if no in _FULL or "No space left on device" in str(exc):  # safetensors reports it in its message only
        return EnvironmentFailure(f"the disk holding {where} is full; free space and run the same command again: "
                                  "finished results are kept")
    if not full_only and no in _READ_ONLY:
        return EnvironmentFailure(f"store {where} is not writable ({os.strerror(no)}); make it writable or choose "
                                  f"another folder with --store DIR, {again}")
    return None


def rm_local(path: str | os.PathLike[str]) -> None:
    """Remove a local file or folder, if there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def file_lock(path: Path) -> FileLock:
    """The process's one FileLock object for `path` (a second object would deadlock its own thread)."""
    with _GUARD:
        if str(path) not in _LOCKS:
            _LOCKS[str(path)] = FileLock(str(path), thread_local=True)
        return _LOCKS[str(path)]


def write_manifest(folder: Path) -> dict[str, Any]:
    """Record every file of `folder` (size, mtime_ns, sha256) in its manifest; return the manifest."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        st = f.stat()
        files[f.relative_to(folder).as_posix()] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                   "sha256": sha256_file(f)}
    manifest = {"version": 1, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def parquet_damage(head: bytes, tail: bytes, footer: bytes | None, size: int) -> str | None:
    """Why a Parquet file with these first 4 / last 8 bytes and footer is not whole, or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if size < 12 or head != b"PAR1" or tail[4:] != b"PAR1":
        return f"truncated: {size} bytes without Parquet's end marker"
    if footer is None:
        return "its Parquet footer is cut off"
    try:
        pq.read_metadata(pa.BufferReader(b"PAR1" + footer + tail))
    except Exception as e:  # noqa: BLE001 - any parse failure means the footer is not whole
        return f"its Parquet footer does not parse ({type(e).__name__})"
    return None


def write_owner(owner: Path) -> None:
    """Say who holds a lock (pid, host, command, start time), for the line of a run that waits for it."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "thread": threading.current_thread().name,
            "command": " ".join([Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]])[:200],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        tmp = owner.parent / tmp_name()
        tmp.write_text(json.dumps(info))
        os.replace(tmp, owner)
    except OSError:  # only for the waiting line
        pass


def owner_line(owner: Path) -> str:
    """`pid 1234 (started 05:40, search cfg.yaml)`: who holds a lock, as its owner file says."""
    try:
        o = json.loads(owner.read_text())
    except (OSError, ValueError):
        return "another run"
    who = "another task of this run" if o.get("pid") == os.getpid() else f"pid {o.get('pid')}"
    host = "" if o.get("host") == socket.gethostname() else f" on {o.get('host')}"
    return f"{who}{host} (started {o.get('started')}, {o.get('command')})"
