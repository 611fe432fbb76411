"""The store over a real S3 API (moto's server on 127.0.0.1, reached through s3fs as AWS is): every result written
and read, folder results uploaded manifest last and kept in this machine's bounded cache, damage found and
recomputed, and a small search whose ratings equal a local store's."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.store import cache
from tasks.store.store import MANIFEST, Store
from tests.s3_server import apply, make_bucket, restore, s3_env, s3_server
from tests.test_store_damage import adapter_stage

BUCKET = "basesearch-test"
ROOT = Path(__file__).resolve().parents[1]
DF = pd.DataFrame({"example_id": [f"e{i}" for i in range(300)], "output": [f"answer {i}" for i in range(300)]})


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server with one bucket, the environment pointing at it; yields the endpoint."""
    with s3_server(tmp_path_factory.mktemp("moto")) as url:
        make_bucket(url, BUCKET)
        old = apply(s3_env(url))
        try:
            yield url
        finally:
            restore(old)


@pytest.fixture
def store(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A fresh store under its own prefix of the bucket, with its own cache."""
    monkeypatch.setenv("BASESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # its per-machine locks
    return Store(f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}")


def test_files_go_to_s3_whole_and_read_back(store: Store) -> None:
    assert type(store.fs).__name__ == "S3FileSystem" and not store.local
    store.write_parquet("outputs/o.parquet", DF)
    store.write_json("runs/r1/validation.json", {"ok": True})
    assert store.read_parquet("outputs/o.parquet").equals(DF) and store.read_json("runs/r1/validation.json")
    assert store.exists("outputs/o.parquet", deep=True) and store.exists("runs/r1")
    listed = store.fs.find(store.root)
    assert not [p for p in listed if "/.tmp-" in p], listed  # a PUT is whole: no temp objects, no copies


def test_folders_upload_manifest_last_and_are_cached_by_key(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    weights, calls = random.Random(0).randbytes(50_000), []
    uploads: list[str] = []
    put = store.fs.put_file
    monkeypatch.setattr(store.fs, "put_file", lambda lp, rp, **kw: uploads.append(rp) or put(lp, rp, **kw))
    folder = adapter_stage(store, "adapters/k1", calls, weights)
    assert uploads[-1].endswith(f"adapters/k1/{MANIFEST}") and len(uploads) == 3
    assert folder == cache.cache_root() / "adapters/k1"  # what it made is this machine's copy: no download
    assert (folder / "adapter_model.safetensors").read_bytes() == weights
    gets: list[str] = []
    get = store.fs.get_file
    monkeypatch.setattr(store.fs, "get_file", lambda rp, lp, **kw: gets.append(rp) or get(rp, lp, **kw))
    assert adapter_stage(store, "adapters/k1", calls, weights) == folder and calls == ["adapters/k1"] and not gets
    import shutil

    shutil.rmtree(folder)  # another machine: nothing cached
    again = adapter_stage(store, "adapters/k1", calls, weights)
    assert again == folder and len(gets) == 2 and calls == ["adapters/k1"]
    assert (again / "adapter_model.safetensors").read_bytes() == weights


def test_damage_in_s3_is_found_and_recomputed(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    weights, calls = random.Random(1).randbytes(50_000), []
    folder = adapter_stage(store, "adapters/k2", calls, weights)
    target = store.path("adapters/k2/adapter_model.safetensors")
    bad = bytearray(weights)
    bad[777] ^= 4
    store.fs.pipe_file(target, bytes(bad))  # the object changed in the bucket, same size
    import shutil

    shutil.rmtree(folder)  # a machine that downloads it
    caplog.set_level(logging.INFO, "basesearch")
    assert store.exists("adapters/k2")  # sizes match: what the plan counts
    adapter_stage(store, "adapters/k2", calls, weights)
    assert calls == ["adapters/k2", "adapters/k2"]
    assert store.fs.cat_file(target) == weights
    lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert lines == ["store: adapters/k2 is damaged (adapter_model.safetensors differs from its manifest's sha256); "
                     "it will be removed and recomputed"]
    # a Parquet object with a changed byte in its page
    store.write_parquet("outputs/p.parquet", DF)
    data = bytearray(store.fs.cat_file(store.path("outputs/p.parquet")))
    data[len(data) // 3] ^= 1
    store.fs.pipe_file(store.path("outputs/p.parquet"), bytes(data))
    with store.claim("outputs/p.parquet") as todo:
        assert todo
        store.write_parquet("outputs/p.parquet", DF)
    assert store.read_parquet("outputs/p.parquet").equals(DF)


def asked(store: Store) -> list[str]:
    """Every request the store's S3 client sends from now on, as `METHOD path?query` (botocore's own hook)."""
    seen: list[str] = []
    store.fs.s3.meta.events.register("before-send.s3", lambda request, **kw: seen.append(
        f"{request.method} {request.url.split('/', 3)[-1]}"))
    return seen


def test_checks_and_queue_looks_cost_the_bucket_one_request(store: Store) -> None:
    from tasks.plan.queue import look, open_queue, put

    seen = asked(store)
    assert not store.exists("outputs/none.parquet") and len(seen) == 1 and seen[0].startswith("HEAD ")  # no listing
    store.write_parquet("outputs/o.parquet", DF)
    assert [r.split()[0] for r in seen[1:]] == ["PUT"]  # an object store: no folder to make first
    store.write_json("runs/r/x.json", {"a": 1})
    seen.clear()
    assert store.read_json("runs/r/x.json") == {"a": 1} and [r.split()[0] for r in seen] == ["GET"]  # no HEAD first
    seen.clear()
    assert not store.exists("adapters/none", deep=True) and len(seen) == 2  # its manifest, then a listing
    adapter_stage(store, "adapters/k9", [], b"w" * 100)
    seen.clear()
    assert store.exists("adapters/k9") and len(seen) == 2  # its manifest, and its files' sizes in one listing
    open_queue(store, "s9", "test")
    put(store, "s9", 1, "merge", "merge-a", {})
    seen.clear()
    assert look(store, "s9") == (True, ["00001-merge.json"]) and len(seen) == 1  # open, jobs and done at once


def test_the_cache_keeps_to_its_bound(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASESEARCH_CACHE_GB", str(120_000 / 1e9))  # room for two 50 kB results, not three
    for i in range(3):
        adapter_stage(store, f"adapters/c{i}", [], random.Random(i).randbytes(50_000))
        os.utime(cache.cache_root() / f"adapters/c{i}" / cache.USED, (1000 + i, 1000 + i))
    cache.evict()
    kept = sorted(p.name for p in (cache.cache_root() / "adapters").iterdir() if not p.name.startswith("."))
    assert kept == ["c1", "c2"]  # the least recently used went
    assert sum(size for _, size, _ in cache.entries()) <= 120_000
    assert (adapter_stage(store, "adapters/c0", [], b"") / "adapter_model.safetensors").stat().st_size == 50_000


@pytest.mark.filterwarnings("ignore")
def test_a_search_on_s3_rates_as_on_a_local_store(s3: str, tiny_models, tiny_data, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from flows.cli import main
    from tests.conftest import one_dataset_config_dict

    monkeypatch.setenv("BASESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "mini.yaml"
    config.write_text(yaml.safe_dump(one_dataset_config_dict(tiny_models, tiny_data)))
    assert main(["--config", str(config), "--store", str(tmp_path / "local")]) == 0
    url = f"s3://{BUCKET}/search-{uuid.uuid4().hex[:6]}"
    capsys.readouterr()
    assert main(["--config", str(config), "--store", url]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and out.out.splitlines()[-1].startswith(f"report: {url.removeprefix('s3://')}")
    local, remote = Store(str(tmp_path / "local")), Store(url)

    def ratings(st: Store) -> pd.DataFrame:
        """The latest run's ratings."""
        return st.read_parquet(f"runs/{st.read_text('runs/LATEST').strip()}/ratings.parquet")

    pd.testing.assert_frame_equal(ratings(remote), ratings(local))
    for kind in ("adapters", "outputs", "judgments"):
        assert sorted(p.rsplit("/", 1)[-1] for p in remote.fs.ls(remote.path(kind))) == \
            sorted(p.name for p in (tmp_path / "local" / kind).iterdir() if not p.name.startswith(".")), kind
    # the re-run on S3 computes nothing
    assert main(["--config", str(config), "--store", url, "--dry-run"]) == 0
    assert "nothing to compute" in capsys.readouterr().out


def test_a_missing_bucket_is_one_line(s3: str) -> None:
    from tasks.core.errors import EnvironmentFailure

    with pytest.raises(EnvironmentFailure, match=r"^store s3://no-such-bucket-x/p: cannot write in it \(.*\); hint: "
                       r"check the bucket and the credentials") as e:
        Store("s3://no-such-bucket-x/p")
    assert "\n" not in str(e.value)


RACER = """
import logging, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from tasks.store.store import Store
store = Store(sys.argv[1])
def compute():
    time.sleep(float(sys.argv[3]))  # longer than a lease lives unrenewed: renewals keep it
    store.write_text(sys.argv[2], sys.argv[4])
    return "computed"
print(store.compute_once(sys.argv[2], compute)[0] or "reused", flush=True)
"""


def racer(url: str, rel: str, tmp: Path, name: str, seconds: float, env: dict[str, str]) -> subprocess.Popen:
    """A process as on another machine (its own temp folder, so its own local locks, and its own cache)."""
    (tmp / name).mkdir()
    return subprocess.Popen([sys.executable, "-c", RACER, url, rel, str(seconds), name], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=os.environ | env | {"TMPDIR": str(tmp / name), "BASESEARCH_CACHE_DIR": str(tmp / name)})


def test_two_machines_racing_compute_once(s3: str, tmp_path: Path) -> None:
    url, rel = f"s3://{BUCKET}/race-{uuid.uuid4().hex[:6]}", "judgments/j.txt"
    env = {"BASESEARCH_LEASE_SECONDS": "1"}
    procs = [racer(url, rel, tmp_path, name, 3.0, env) for name in ("first", "second")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in outs]
    assert sorted(o.strip() for o, _ in outs) == ["computed", "reused"], outs
    winner = ["first", "second"][[o.strip() for o, _ in outs].index("computed")]
    assert Store(url).read_text(rel) == winner
    waited = next(e for (o, e) in outs if o.strip() == "reused")
    assert "store: waiting for pid " in waited and f"computing {rel}" in waited and "taken over" not in waited
    assert not Store(url).fs.find(f"{Store(url).root}/.leases")  # released


def test_a_dead_holders_lease_expires(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    import json
    import time

    monkeypatch.setenv("BASESEARCH_LEASE_SECONDS", "1.5")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    store = Store(f"s3://{BUCKET}/dead-{uuid.uuid4().hex[:6]}")
    assert store.leasing  # the S3 API refuses a create-only write over an object
    dead = {"pid": 4242, "host": "gpu-node-7", "command": "python -m flows.stages", "started": "2026-01-01 00:00:00",
            "ttl_s": 1.5}
    store.fs.pipe_file(store.path(".leases/adapters/a1.lease"), json.dumps(dead).encode())  # killed -9 long ago
    caplog.set_level(logging.INFO, "basesearch")
    t0 = time.monotonic()
    made, reused = store.folder_once("adapters/a1", lambda tmp: (tmp / "w.bin").write_bytes(b"w" * 100))
    waited = time.monotonic() - t0
    assert made == 100 and not reused and 1.5 <= waited < 20
    lines = [r.getMessage() for r in caplog.records if "a1" in r.getMessage()]
    assert lines[0] == ("store: waiting for pid 4242 on gpu-node-7 (started 2026-01-01 00:00:00, python -m "
                        "flows.stages) computing adapters/a1")
    assert "was not renewed for 2 s: taken over" in lines[1]
    assert not store.fs.exists(store.path(".leases/adapters/a1.lease"))


def test_stage_arguments_travel_as_store_references(store: Store, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.store.portable import localized, portable

    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": []}\n')
    candidate = tmp_path / "my-model"
    candidate.mkdir()
    (candidate / "config.json").write_text('{"a": 1}')
    adapter = adapter_stage(store, "adapters/p1", [], b"weights")  # in the search machine's cache
    params = {"model_dir": str(candidate), "adapter_dir": str(adapter), "test_path": str(data),
              "paths": {"alpha": str(candidate), "hub": "mistralai/Mistral-7B-v0.1"}, "cfg": {"lr": 1},
              "store_root": store.url, "dev_from": ""}
    sent = portable(params, store)
    assert sent["adapter_dir"] == "store:adapters/p1" and sent["test_path"].startswith("store:inputs/")
    assert sent["model_dir"].startswith("store:inputs/") and sent["paths"]["alpha"] == sent["model_dir"]
    assert sent["paths"]["hub"] == "mistralai/Mistral-7B-v0.1" and sent["cfg"] == {"lr": 1} and sent["dev_from"] == ""
    assert portable(sent, store) == sent  # sent again after a crash: the same references
    monkeypatch.setenv("BASESEARCH_CACHE_DIR", str(tmp_path / "worker-cache"))  # a worker: no disk in common
    got = localized(sent)
    assert all(str(Path(got[k])).startswith(str(tmp_path / "worker-cache")) for k in ("model_dir", "adapter_dir",
                                                                                         "test_path"))
    assert Path(got["test_path"]).read_text() == data.read_text()
    assert (Path(got["model_dir"]) / "config.json").read_text() == '{"a": 1}'
    assert (Path(got["adapter_dir"]) / "adapter_model.safetensors").read_bytes() == b"weights"
    assert got["paths"]["alpha"] == got["model_dir"] and got["cfg"] == {"lr": 1}
