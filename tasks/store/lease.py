"""Exclusion across machines for a remote store: a lease object per result, created by a conditional write.

A run about to compute a result creates `.leases/<rel>.lease` with a write that succeeds only if no such object
exists (S3's `If-None-Match: *`, s3fs `mode="create"`). While it computes, a thread rewrites the lease every third of
`BASESEARCH_LEASE_SECONDS` (60 s), each time on condition that it is still the lease this run wrote (`If-Match`
on its ETag). A run that finds a lease says whom it waits for, and waits; a lease whose ETag has not changed for
the lease time, as the waiting run's own clock measures it (no clock is compared with another machine's), belongs
to a dead run: the waiting run replaces it, again on condition of that ETag, so of several waiting runs one wins.
Released by deleting it. Chosen over Prefect's global concurrency limits because it needs nothing but the bucket:
it holds for runs started from a laptop, a work pool, or two Prefect servers alike (docs/scale-out.md).

A file system without conditional writes gets no lease (the per-machine locks still hold): a store path whose
`pipe_file(mode="create")` does not refuse an existing object is detected once and said in one line.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tasks.store.guards import say
from tasks.store.remote import get, head

LEASES = ".leases"
POLL_S = 0.5  # how often a waiting run looks at the lease again


def lease_seconds() -> float:
    """How long a lease lives without being renewed: $BASESEARCH_LEASE_SECONDS, else 60."""
    try:
        return max(0.5, float(os.environ.get("BASESEARCH_LEASE_SECONDS") or 60))
    except ValueError:
        return 60.0


def owner_info() -> dict[str, Any]:
    """Who holds a lease: process, host, command, start time (for the waiting side's line)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "thread": threading.current_thread().name,
            "command": " ".join([Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]])[:200],
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}


def describe(info: dict[str, Any]) -> str:
    """`pid 1234 on host-b (started ..., command)`: a lease's holder, for the waiting line."""
    if not info:
        return "another run"
    who = "another task of this run" if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname() \
        else f"pid {info.get('pid')}" + ("" if info.get("host") == socket.gethostname() else f" on {info.get('host')}")
    return f"{who} (started {info.get('started')}, {info.get('command')})"


def _precondition_failed(e: Exception) -> bool:
    """Whether a write failed because its condition did not hold (s3fs: FileExistsError, or an OSError saying so)."""
    return isinstance(e, FileExistsError) or "pre-condition" in str(e) or "PreconditionFailed" in str(e)


class Lease:
    """One result's lease in a remote store: `acquire()` (waiting, taking over a dead holder's), `release()`."""

    def __init__(self, fs: Any, path: str, rel: str) -> None:
        """The lease object at `path` (in `fs`) for result `rel`."""
        self.fs, self.path, self.rel = fs, path, rel
        self.ttl = lease_seconds()
        self.info = owner_info() | {"ttl_s": self.ttl}
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        """The lease's content: who holds it, and when it was last renewed (for people reading the bucket)."""
        return json.dumps(self.info | {"renewed": time.time()}).encode()

    def _put(self, **condition: Any) -> str:
        """Write the lease on `condition` (mode="create", or IfMatch=etag); its new ETag."""
        out = self.fs.pipe_file(self.path, self._body(), **condition)
        etag = out.get("ETag") if isinstance(out, dict) else None
        return etag or str(head(self.fs, self.path).get("ETag") or uuid.uuid4().hex)

    def _look(self) -> tuple[str | None, dict[str, Any]]:
        """(ETag, content) of the lease now; (None, {}) when there is none."""
        try:
            etag = head(self.fs, self.path).get("ETag")
            return str(etag), json.loads(get(self.fs, self.path))
        except FileNotFoundError:
            return None, {}
        except ValueError:  # being rewritten, or damaged: its ETag still tells whether it is renewed
            return str(head(self.fs, self.path).get("ETag")), {}

    def try_create(self) -> bool:
        """Create the lease if there is none; whether this run now holds it."""
        try:
            self.etag = self._put(mode="create")
        except Exception as e:  # noqa: BLE001 - a refused condition is the answer; anything else is raised
            if _precondition_failed(e):
                return False
            raise
        return True

    def acquire(self) -> None:
        """Hold the lease: at once, or after its holder releases it or dies (one line says whom it waits for)."""
        seen: tuple[str | None, float] = (None, 0.0)
        said = False
        while not self.try_create():
            etag, info = self._look()
            if etag is None:
                continue  # released between the two calls: try again at once
            now = time.monotonic()
            if etag != seen[0]:
                seen = (etag, now)  # renewed (or new): its holder lives
            if not said:
                say(logging.INFO, f"store: waiting for {describe(info)} computing {self.rel}")
                said = True
            ttl = max(self.ttl, float(info.get("ttl_s") or 0))  # the holder's own lease time, if longer
            if now - seen[1] > ttl:
                try:
                    self.etag = self._put(IfMatch=etag)
                except Exception as e:  # noqa: BLE001 - another waiter took it first: wait on theirs
                    if not _precondition_failed(e) and not isinstance(e, FileNotFoundError):
                        raise
                    continue
                say(logging.INFO, f"store: the lease of {describe(info)} on {self.rel} was not renewed for "
                                  f"{ttl:.0f} s: taken over")
                break
            time.sleep(POLL_S)
        self._keep()

    def try_acquire(self) -> bool:
        """Hold the lease if nobody does (a dead holder's is left to `acquire`, which waits out its time); whether
        this run now holds it."""
        if not self.try_create():
            return False
        self._keep()
        return True

    def _keep(self) -> None:
        """Start renewing the lease just taken."""
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.rel}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        """Rewrite the lease every third of its time while held; stop when another run took it (said once)."""
        while not self._stop.wait(self.ttl / 3):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as e:  # noqa: BLE001 - a renewal that fails is retried; a lost lease is said
                if _precondition_failed(e) or isinstance(e, FileNotFoundError):
                    self.lost = True
                    say(logging.WARNING, f"store: the lease on {self.rel} was taken over (this run was paused for "
                                         f"over {self.ttl:.0f} s); the result is written by whichever run ends last")
                    return

    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost:
            return
        try:
            if str(head(self.fs, self.path).get("ETag")) == str(self.etag):
                self.fs.rm(self.path)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - a lease left behind expires by itself
            say(logging.INFO, f"store: could not delete the lease on {self.rel} ({type(e).__name__}); it expires "
                              f"in {self.ttl:.0f} s")


def conditional_writes(fs: Any, probe: str) -> bool:
    """Whether `fs` refuses a create-only write over an existing object and tags objects with ETags (so leases
    exclude); `probe` is removed."""
    try:
        fs.pipe_file(probe, b"1", mode="create")
        if not fs.info(probe).get("ETag"):  # renewals and take-overs are conditional on it
            return False
        try:
            fs.pipe_file(probe, b"2", mode="create")
        except Exception as e:  # noqa: BLE001 - the refusal this checks for
            return _precondition_failed(e)
        return False
    except Exception:  # noqa: BLE001 - no mode="create" at all
        return False
    finally:
        try:
            fs.rm(probe)
        except Exception:  # noqa: BLE001 - a probe left behind is swept as a temp
            pass
