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


def on_s3(fs: Any) -> bool:
    """Whether `fs` is s3fs, whose client answers the single requests below."""
    return "s3" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol) and hasattr(fs, "call_s3")


def head(fs: Any, path: str) -> dict[str, Any]:
    """A file's info (size, ETag) in one request; FileNotFoundError when there is none. fsspec's `info` on S3 asks
    twice for a name that is not a file (a HEAD, then a listing to see whether it is a folder): for a result that is
    absent, the common case of a claim, that doubles the requests, and on a busy bucket every request waits."""
    if on_s3(fs):
        bucket, key, _ = fs.split_path(path)
        out = fs.call_s3("head_object", Bucket=bucket, Key=key)  # s3fs turns a 404 into FileNotFoundError
        return {"name": path, "type": "file", "size": out["ContentLength"], "ETag": out.get("ETag"),
                "LastModified": out.get("LastModified")}
    info = fs.info(path)
    if info.get("type") == "directory":  # a folder is not the file asked for
        raise FileNotFoundError(path)
    return info


def get(fs: Any, path: str) -> bytes:
    """A file's bytes in one request (s3fs asks for the size first, to split a large file over several GETs; the
    store's files are read whole and are small: manifests, records, a dataset's answers)."""
    return fs.cat_file(path, max_concurrency=1) if on_s3(fs) else fs.cat_file(path)


def listing(fs: Any, path: str, recursive: bool = False) -> list[dict[str, Any]]:
    """The entries of folder `path` (name, type, size, LastModified): every file below it with `recursive`, else its
    own files and sub-folders; [] when there are none. On S3 one request per 1,000 entries: fsspec's `ls` and `find`
    ask again (the parent folder, or the path as a file) when there are none, and an empty folder is the common case
    of a queue or a result not made yet."""
    if not on_s3(fs):
        try:
            found = fs.find(path, detail=True) if recursive else {i["name"]: i for i in fs.ls(path, detail=True)}
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [i for name, i in found.items() if name.rstrip("/") != path.rstrip("/")]
    bucket, key, _ = fs.split_path(path)
    ask = {"Bucket": bucket, "Prefix": key.rstrip("/") + "/"} | ({} if recursive else {"Delimiter": "/"})
    out: list[dict[str, Any]] = []
    while True:
        page = fs.call_s3("list_objects_v2", **ask)
        out += [{"name": f"{bucket}/{o['Key']}", "type": "file", "size": o["Size"],
                 "LastModified": o.get("LastModified")} for o in page.get("Contents", [])]
        out += [{"name": f"{bucket}/{p['Prefix'].rstrip('/')}", "type": "directory", "size": 0}
                for p in page.get("CommonPrefixes", [])]
        if not page.get("IsTruncated"):
            return out
        ask["ContinuationToken"] = page["NextContinuationToken"]


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
        """The manifest of folder result `rel` in the store (one GET), or None when it has none (absent, or cut
        short)."""
        try:
            return json.loads(get(self.fs, f"{self.path(rel)}/{MANIFEST}"))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"files": {}, "damaged": True}

    def fetch(self, rel: str, manifest: dict[str, Any] | None = None) -> tuple[Path | None, str | None]:
        """(this machine's copy of folder result `rel`, None), downloaded and hashed when not cached; (None, why)
        when the store's copy is absent or damaged. `manifest`: the store's, when the caller just read it."""
        manifest = manifest or self.remote_manifest(rel)
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
        there = [e["name"] for e in listing(self.fs, target, recursive=True)]  # usually none: the claim found none
        if there:
            if self.damage(rel, deep=True) is None:  # another machine finished it first (now cached here): as good
                return
            if f"{target}/{MANIFEST}" in there:
                self.fs.rm(f"{target}/{MANIFEST}")  # absent first, then emptied
            self.fs.rm(there)
        for name in manifest["files"]:
            self.fs.put_file(str(tmp / name), f"{target}/{name}")
        self.fs.put_file(str(tmp / MANIFEST), f"{target}/{MANIFEST}")
        cache.add(rel, tmp, manifest)
