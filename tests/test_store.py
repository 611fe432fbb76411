"""The store shared by several runs: damaged results recomputed, locks, dead runs' temps, disk failures, remote."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

import tasks.store.store as store_mod
import tasks.store.verify as verify_mod
from tasks.config.schema import JudgeConfig
from tasks.core.errors import EnvironmentFailure, UserError
from tasks.data.load import Example
from tasks.judge.judgments import judge_task  # imports Prefect, which sets up logging: before any test's caplog
from tasks.store.store import MANIFEST, Store, tmp_name
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
DF = pd.DataFrame({"example_id": [f"e{i}" for i in range(200)], "output": ["some answer text"] * 200})


def outputs_stage(store: Store, rel: str, calls: list[str]) -> pd.DataFrame:
    """A stage as tasks/generate/outputs.py runs one: reuse the Parquet result, else compute and write it."""
    with store.claim(rel) as todo:
        if todo:
            calls.append(rel)
            store.write_parquet(rel, DF)
    return store.read_parquet(rel)


def adapter_stage(store: Store, rel: str, calls: list[str]) -> Path:
    """A stage as tasks/train/finetune.py runs one: reuse the folder result, else fill a new folder."""
    with store.claim(rel) as todo:
        if todo:
            calls.append(rel)
            with store.new_dir(rel) as tmp:
                (tmp / "adapter_model.safetensors").write_bytes(os.urandom(4096))
                (tmp / "adapter_config.json").write_text('{"r": 8}')
    return store.local_dir(rel)


def damage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The store's warnings about damaged results."""
    return [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]


def temps(root: Path) -> list[Path]:
    """Every temp file or folder under the store (lock folder aside)."""
    return [p for p in root.rglob(".tmp-*") if ".locks" not in p.parts]


def test_truncated_parquet_is_detected_and_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, rel, calls = Store(str(tmp_path)), "outputs/abc.parquet", []
    outputs_stage(store, rel, calls)
    path = tmp_path / rel
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # a copy cut short
    caplog.set_level(logging.INFO, "basesearch")
    df = outputs_stage(store, rel, calls)
    assert calls == [rel, rel] and df.equals(DF) and path.read_bytes() == whole
    (line,) = damage_lines(caplog)
    assert rel in line and "recomputed" in line and "\n" not in line
    outputs_stage(store, rel, calls)
    assert len(calls) == 2  # whole again: reused


def test_parquet_with_broken_footer_is_damaged(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.write_parquet("judgments/j.parquet", DF)
    path = tmp_path / "judgments/j.parquet"
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[-8:-4], "little")
    data[-8 - n: -8] = b"\xff" * n  # end markers intact, footer garbage
    path.write_bytes(bytes(data))
    assert "footer" in store.damage("judgments/j.parquet")
    with pytest.raises(EnvironmentFailure, match="judgments/j.parquet is damaged.*run the same command again"):
        store.read_parquet("judgments/j.parquet")
    assert not path.exists()


@pytest.mark.parametrize("harm", ["truncate", "delete", "same-size-edit", "no-manifest"])
def test_damaged_folder_is_detected_and_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                    harm: str) -> None:
    store, rel, calls = Store(str(tmp_path)), "adapters/k1", []
    folder = adapter_stage(store, rel, calls)
    manifest = json.loads((folder / MANIFEST).read_text())["files"]
    assert set(manifest) == {"adapter_model.safetensors", "adapter_config.json"}
    assert manifest["adapter_config.json"]["size"] == 8
    weights = folder / "adapter_model.safetensors"
    if harm == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif harm == "delete":
        (folder / "adapter_config.json").unlink()
    elif harm == "same-size-edit":
        weights.write_bytes(b"\0" * 4096)  # same size, new mtime: hashed again, found changed
    else:
        (folder / MANIFEST).unlink()  # as a store written before manifests
    caplog.set_level(logging.INFO, "basesearch")
    assert not store.exists(rel)
    assert store.exists(rel) is False  # still absent, warned once only
    adapter_stage(store, rel, calls)
    assert calls == [rel, rel] and store.exists(rel)
    assert len(json.loads((folder / MANIFEST).read_text())["files"]) == 2
    assert len(damage_lines(caplog)) == 1 and rel in damage_lines(caplog)[0]
    assert not temps(tmp_path)


def test_files_are_hashed_again_only_when_touched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, rel = Store(str(tmp_path)), "models/m1"
    folder = adapter_stage(store, rel, [])
    hashed = []
    real = verify_mod.sha256_file
    monkeypatch.setattr(verify_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    assert store.exists(rel) and hashed == []  # times as recorded: sizes and times only
    weights = folder / "adapter_model.safetensors"
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))  # a copy that did not keep times
    assert store.exists(rel) and hashed == ["adapter_model.safetensors"]
    assert store.exists(rel) and len(hashed) == 1
    verify_mod._VERIFIED.clear()  # as a new process: the side record spares hashing again
    assert store.exists(rel) and len(hashed) == 1


def test_dead_runs_temps_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for d in ("models", "outputs", "runs/r1", "adapters"):
        (tmp_path / d).mkdir(parents=True)
    gone = [tmp_path / "models" / tmp_name(dead.pid), tmp_path / "outputs" / tmp_name(dead.pid),
            tmp_path / "runs/r1" / tmp_name(dead.pid), tmp_path / "adapters/.tmp-0123abcd"]
    kept = [tmp_path / "adapters" / tmp_name(), tmp_path / "outputs" / ".tmp-fresh-unknown"]
    gone[0].mkdir()
    (gone[0] / "model.safetensors").write_bytes(b"x")
    for p in gone[1:] + kept:
        p.write_bytes(b"half")
    old = time.time() - 2 * 86400
    os.utime(gone[3], (old, old))  # an unknown owner's temp, two days old
    store_mod._OPENED.clear()
    Store(str(tmp_path))  # the next run sweeps on opening the store
    assert [p.exists() for p in gone] == [False] * 4 and all(p.exists() for p in kept)


def test_threads_compute_a_key_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "basesearch")
    store, rel, calls = Store(str(tmp_path)), "adapters/shared", []
    start = threading.Barrier(2)

    def slow_stage() -> None:
        start.wait()
        with store.claim(rel) as todo:
            if todo:
                calls.append(rel)
                # a training the other thread must wait for: it lasts until that thread says it waits
                wait_for(lambda: bool(waits()), 60, "the other thread to wait for the claim")
                with store.new_dir(rel) as tmp:
                    (tmp / "w.bin").write_bytes(b"w" * 100)

    waits = lambda: [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]  # noqa: E731
    threads = [threading.Thread(target=slow_stage) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [rel] and store.exists(rel)
    assert len(waits()) == 1 and "another task of this run" in waits()[0] and rel in waits()[0]


WORKER = """
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
import pandas as pd
from tasks.store.store import Store
st, rel = Store(sys.argv[1]), "outputs/shared.parquet"
with st.claim(rel) as todo:
    if todo:
        open(sys.argv[2], "a").write("computed\\n")
        deadline = time.monotonic() + 120
        while sys.argv[3] and not os.path.exists(sys.argv[3]) and time.monotonic() < deadline:
            time.sleep(0.05)  # a long computation, until the test lets it finish
        st.write_parquet(rel, pd.DataFrame({"a": [1, 2, 3]}))
print("rows", len(st.read_parquet(rel)))
"""


def _worker(store: Path, counter: Path, release: Path | None) -> subprocess.Popen[str]:
    """A run in its own process computing the shared key (until `release` exists, when given)."""
    return subprocess.Popen([sys.executable, "-c", WORKER, str(store), str(counter), str(release or "")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_processes_compute_a_key_once(tmp_path: Path) -> None:
    counter, release = tmp_path / "counter", tmp_path / "release"
    first = _worker(tmp_path / "store", counter, release)
    wait_for(counter.exists, 120, "the first worker to start computing")
    second = _worker(tmp_path / "store", counter, None)
    waiting = second.stderr.readline()  # stderr is line-buffered: its first line, as soon as it waits
    release.touch()
    out1, _ = first.communicate(timeout=120)
    out2, _ = second.communicate(timeout=120)
    assert counter.read_text() == "computed\n"
    assert "rows 3" in out1 and "rows 3" in out2
    assert f"waiting for pid {first.pid}" in waiting and "outputs/shared.parquet" in waiting


def test_a_dead_owners_lock_is_taken_over(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    first = _worker(tmp_path / "store", counter, tmp_path / "never")
    wait_for(counter.exists, 120, "the first worker to start computing")
    first.kill()  # killed mid-computation: the OS drops its flock
    first.wait()
    out2, err2 = _worker(tmp_path / "store", counter, None).communicate(timeout=120)
    assert counter.read_text() == "computed\ncomputed\n" and "rows 3" in out2, err2


@pytest.mark.parametrize("rel", ["../outside", "/etc/passwd", "models/../../x", "", "s3://bucket/x", "~/x"])
def test_paths_that_leave_the_store_are_rejected(tmp_path: Path, rel: str) -> None:
    with pytest.raises(UserError, match="must be relative and stay inside the store"):
        Store(str(tmp_path)).exists(rel)


def test_store_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"is a file, not a folder; hint: --store DIR"):
        Store(str(tmp_path / "f"))


def test_unwritable_store_is_one_line_and_probed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probes = []

    def refuse(self: Store, path: str, data: bytes) -> None:
        probes.append(path)
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(Store, "_put_bytes", refuse)
    with pytest.raises(EnvironmentFailure, match=f"store {tmp_path}/ro is not writable .*--store DIR"):
        Store(str(tmp_path / "ro"))
    monkeypatch.undo()
    Store(str(tmp_path / "ok"))
    monkeypatch.setattr(Store, "_put_bytes", refuse)
    Store(str(tmp_path / "ok"))  # probed once per root per process
    assert len(probes) == 1 and not temps(tmp_path)


def test_full_disk_is_one_line_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(str(tmp_path))

    def half_then_full(self: Store, path: str, data: bytes) -> None:
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Store, "_put_bytes", half_then_full)
    with pytest.raises(EnvironmentFailure, match=f"the disk holding {tmp_path} is full; free space and run the "
                                                 "same command again: finished results are kept"):
        store.write_parquet("outputs/x.parquet", DF)
    with pytest.raises(EnvironmentFailure, match="is full"):
        with store.new_dir("models/m") as tmp:
            (tmp / "w").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not temps(tmp_path) and not store.exists("outputs/x.parquet") and not store.exists("models/m")


def test_memory_store_counts_a_folder_only_with_its_manifest_uploaded_last(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # its local locks go here
    monkeypatch.setenv("BASESEARCH_CACHE_DIR", str(tmp_path / "cache"))  # and this machine's copies here
    store = Store(f"memory://bs-{uuid.uuid4().hex[:8]}")
    uploads: list[str] = []
    real = store.fs.put_file
    monkeypatch.setattr(store.fs, "put_file", lambda lp, rp, **kw: uploads.append(rp) or real(lp, rp, **kw))
    calls: list[str] = []
    folder = adapter_stage(store, "adapters/r1", calls)
    assert uploads[-1].endswith(f"adapters/r1/{MANIFEST}") and len(uploads) == 3
    assert folder.is_relative_to(tmp_path) and list(tmp_path.glob("basesearch-locks/*/adapters/r1.lock"))
    assert (folder / "adapter_config.json").read_text() == '{"r": 8}' and store.exists("adapters/r1")
    assert adapter_stage(store, "adapters/r1", calls) and calls == ["adapters/r1"]
    store.fs.rm(store.path(f"adapters/r1/{MANIFEST}"))  # as an upload cut short before its manifest
    assert not store.exists("adapters/r1")
    store.fs.pipe_file(store.path("adapters/r2/weights.bin"), b"x" * 10)
    assert not store.exists("adapters/r2")
    store.write_parquet("outputs/o.parquet", DF)
    assert store.exists("outputs/o.parquet") and store.read_parquet("outputs/o.parquet").equals(DF)
    store.fs.pipe_file(store.path("outputs/t.parquet"), store.fs.cat_file(store.path("outputs/o.parquet"))[:500])
    assert "truncated" in store.damage("outputs/t.parquet")


def test_other_folders_need_no_manifest(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.write_json("runs/r1/validation.json", {"ok": True})
    assert store.exists("runs/r1") and store.exists("runs/r1/validation.json") and (tmp_path / "runs/r1").is_dir()


def test_judge_stage_recomputes_a_truncated_batch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(str(tmp_path))
    examples = [Example(id=f"e{i}", prompt=[{"role": "user", "content": "q"}], answer="yes") for i in range(4)]
    outputs = {}
    for name, text in (("a", "yes"), ("b", "no")):
        store.write_parquet(f"outputs/{name}.parquet", pd.DataFrame(
            {"example_id": [e.id for e in examples], "output": text, "contender": name, "error": None}))
        outputs[name] = (f"outputs/{name}.parquet", f"key-{name}")
    run = lambda: judge_task.fn("d", examples, "exact", "fp", outputs, JudgeConfig(), str(tmp_path))  # noqa: E731
    (batch, *_), reused = run()
    assert reused == 0 and run()[1] == 1
    whole = (tmp_path / batch[0]).read_bytes()
    (tmp_path / batch[0]).write_bytes(whole[:-30])
    caplog.set_level(logging.INFO, "basesearch")
    assert run()[1] == 0 and (tmp_path / batch[0]).read_bytes() == whole
    assert len(damage_lines(caplog)) == 1


def test_each_keeps_the_order_and_asks_a_remote_store_at_once(tmp_path):
    remote, local = Store(f"memory://each-{uuid.uuid4().hex[:8]}"), Store(str(tmp_path / "store"))
    both_in_flight = threading.Barrier(2, timeout=10)  # broken (an error) unless two calls wait at once

    def ask(i: int) -> int:
        """One call that waits for another to be in flight beside it."""
        both_in_flight.wait()
        return i * i

    assert remote.each(ask, range(6)) == [0, 1, 4, 9, 16, 25]
    threads: list[str] = []
    assert local.each(lambda i: threads.append(threading.current_thread().name) or -i, [1, 2, 3]) == [-1, -2, -3]
    assert threads == [threading.current_thread().name] * 3  # a local store: one at a time, here
