"""What a store on another machine (an object store: s3://, gs://, or any fsspec URL) needs beyond a local folder:
uploads (files first, manifest last), downloads into this machine's cache (tasks/store/cache.py) with every file
hashed, and whole-object writes. Mixed into tasks/store/store.py Store (docs/scale-out.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.errors import EnvironmentFailure
from tasks.store import cache
from tasks.store.guards import MANIFEST, disk_failure, rm_local

# Object stores publish an object whole when its PUT ends (never half a file), so a result is written in place: the
# temp-then-rename of a folder store would be a server-side copy and a delete for every file.
WHOLE_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}


class Remote:
    """Uploads and cached downloads of a remote Store's folder results."""

    fs: Any
    root: str
    local: bool

    if TYPE_CHECKING:  # Store's own (a stub here would shadow it: Store inherits this class first)
        def path(self, rel: str) -> str: ...  # Store's
        def damage(self, rel: str, deep: bool = False) -> str | None: ...  # Store's (tasks/store/verify.py)

    def whole_put(self) -> bool:
        """Whether a PUT publishes a file whole here (an object store), so no temp and rename is needed."""
        protocol = self.fs.protocol
        return not self.local and bool(({protocol} if isinstance(protocol, str) else set(protocol)) & WHOLE_PUT)

    def remote_manifest(self, rel: str) -> dict[str, Any] | None:
        """The manifest of folder result `rel` in the store, or None when it has none (absent, or cut short)."""
        try:
            return json.loads(self.fs.cat_file(f"{self.path(rel)}/{MANIFEST}"))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"files": {}, "damaged": True}

    def fetch(self, rel: str) -> tuple[Path | None, str | None]:
        """(this machine's copy of folder result `rel`, None), downloaded and hashed when not cached; (None, why)
        when the store's copy is absent or damaged."""
        manifest = self.remote_manifest(rel)
        if manifest is None or manifest.get("damaged"):
            return None, "it has no manifest: cut short" if manifest is None else "its manifest is damaged"
        hit = cache.cached(rel, manifest)
        if hit is not None:
            return hit, None
        try:
            part = cache.new_part()
        except OSError as e:
            raise disk_failure(e, str(cache.cache_root()), full_only=True) or e from None
        try:
            for name in manifest["files"]:
                (part / name).parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get_file(f"{self.path(rel)}/{name}", str(part / name))
                except FileNotFoundError:
                    return None, f"{name} is missing"
            why = cache.check_files(part, manifest)
            if why:
                return None, why
            return cache.add(rel, part, manifest), None
        except OSError as e:
            raise disk_failure(e, str(cache.cache_root()), full_only=True) or e from None
        finally:
            rm_local(part)

    def remote_local_dir(self, rel: str) -> Path:
        """This machine's copy of folder result `rel` (cached, else downloaded and hashed); one line when damaged."""
        folder, why = self.fetch(rel)
        if folder is None:
            raise EnvironmentFailure(f"store: {rel} cannot be read from {self.root} ({why}); run the same command "
                                     "again (it is recomputed)")
        return folder

    def new_part(self) -> Path:
        """The temp folder a new folder result of a remote store is filled in: inside the cache, so that after its
        upload it becomes this machine's copy by one rename."""
        try:
            return cache.new_part()
        except OSError as e:
            raise disk_failure(e, str(cache.cache_root()), full_only=True) or e from None

    def upload(self, tmp: Path, rel: str, manifest: dict[str, Any]) -> None:
        """Upload a finished folder to `rel`: its files first, the manifest last, so half an upload is absent; then
        keep it as this machine's copy."""
        target = self.path(rel)
        if self.fs.exists(target):
            if self.damage(rel, deep=True) is None:  # another machine finished it first (now cached here): as good
                return
            if self.fs.exists(f"{target}/{MANIFEST}"):
                self.fs.rm(f"{target}/{MANIFEST}")  # absent first, then emptied
            self.fs.rm(target, recursive=True)
        for name in manifest["files"]:
            self.fs.put_file(str(tmp / name), f"{target}/{name}")
        self.fs.put_file(str(tmp / MANIFEST), f"{target}/{MANIFEST}")
        cache.add(rel, tmp, manifest)
