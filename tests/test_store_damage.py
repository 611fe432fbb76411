"""Damage inside a stored file is found when the result is read: a flipped bit or 64 random bytes in a Parquet data
page (an output, a judgment batch) or in an adapter's weights is one warning line naming the result, which is
removed and recomputed; the run goes on. Keys do not change (tests/test_store_keys.py)."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tasks.config.schema import JudgeConfig
from tasks.core.errors import EnvironmentFailure
from tasks.data.load import Example
from tasks.judge.judgments import judge_task  # imports Prefect, which sets up logging: before any test's caplog
from tasks.store.store import MANIFEST, Store

ROOT = Path(__file__).resolve().parents[1]
DF = pd.DataFrame({"example_id": [f"e{i}" for i in range(300)],
                   "output": [f"answer number {i} about {i % 11} things" for i in range(300)],
                   "latency_s": [i / 7 for i in range(300)]})


def data_page(path: Path, column: str) -> tuple[int, int]:
    """(first byte, end) of a column's data page in a Parquet file (its one row group, one page), from the footer."""
    md = pq.read_metadata(path)
    names = [md.row_group(0).column(c).path_in_schema for c in range(md.num_columns)]
    col = md.row_group(0).column(names.index(column))
    start = col.dictionary_page_offset or col.data_page_offset
    return col.data_page_offset, start + col.total_compressed_size


def harm(path: Path, start: int, end: int, how: str, seed: int = 0) -> None:
    """Flip one bit in the last 8 bytes of the page [start, end), or write 64 random bytes over its end, keeping the
    file's size and times (bit rot: nothing a file system notices).

    The end of a page is its body, which the page's CRC covers; its header (sizes, statistics) is not covered: damage
    there fails to decode, or changes statistics that nothing here reads (docs/scale-out.md).
    """
    st = path.stat()
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    if how == "bit":
        pos = rng.randrange(end - 8, end)
        data[pos] ^= 1 << rng.randrange(8)
    else:
        pos = max(start, end - 64)
        data[pos:end] = bytes(b ^ (1 + rng.randrange(255)) for b in data[pos:end])  # every byte changed
    assert bytes(data) != path.read_bytes()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def damage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The store's warnings about damaged results."""
    return [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]


def outputs_stage(store: Store, rel: str, calls: list[str]) -> pd.DataFrame:
    """A stage as tasks/generate/outputs.py runs one: reuse the Parquet result, else compute and write it."""
    with store.claim(rel) as todo:
        if todo:
            calls.append(rel)
            store.write_parquet(rel, DF)
    return store.read_parquet(rel)


@pytest.mark.parametrize("how", ["bit", "64-bytes"])
@pytest.mark.parametrize("column", ["output", "latency_s"])
def test_damage_in_an_outputs_data_page_is_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      how: str, column: str) -> None:
    store, rel, calls = Store(str(tmp_path)), f"outputs/{column}-{how}.parquet", []
    outputs_stage(store, rel, calls)
    path = tmp_path / rel
    whole = path.read_bytes()
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).data_page_offset > 0
    harm(path, *data_page(path, column), how)
    assert store.exists(rel)  # shallow (what the plan counts): the footer is whole
    caplog.set_level(logging.INFO, "basesearch")
    df = outputs_stage(store, rel, calls)  # a stage's claim reads every byte
    assert calls == [rel, rel] and df.equals(DF) and path.read_bytes() == whole
    (line,) = damage_lines(caplog)
    assert line.startswith(f"store: {rel} is damaged (its data does not read back: ") and "\n" not in line
    assert line.endswith("it will be removed and recomputed")
    outputs_stage(store, rel, calls)
    assert len(calls) == 2  # whole again: reused


def test_a_damaged_file_read_outside_a_claim_is_one_line(tmp_path: Path) -> None:
    store, rel = Store(str(tmp_path)), "outputs/o.parquet"
    store.write_parquet(rel, DF)
    harm(tmp_path / rel, *data_page(tmp_path / rel, "output"), "bit")
    with pytest.raises(EnvironmentFailure, match=r"outputs/o.parquet is damaged .*run the same command again"):
        store.read_parquet(rel)
    assert not (tmp_path / rel).exists()


def test_reading_damaged_pages_exits_cleanly(tmp_path: Path) -> None:
    # pyarrow aborts the interpreter at exit after a threaded read of a damaged file failed: the store reads in one
    # thread, so a process that found damage still exits 0
    store = Store(str(tmp_path))
    for i in range(12):
        rel = f"outputs/o{i}.parquet"
        store.write_parquet(rel, DF)
        harm(tmp_path / rel, *data_page(tmp_path / rel, ["output", "latency_s", "example_id"][i % 3]),
             ["bit", "64"][i % 2], seed=i)
    code = ("import sys; from tasks.store.store import Store; s = Store(sys.argv[1]); "
            "print(sum(not s.exists(f'outputs/o{i}.parquet', deep=True) for i in range(12)))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "12" and "terminate called" not in done.stderr


@pytest.mark.parametrize("how", ["bit", "64-bytes"])
def test_damage_in_a_judgment_batch_is_rejudged(tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    store = Store(str(tmp_path))
    examples = [Example(id=f"e{i}", prompt=[{"role": "user", "content": "q"}], answer="yes", expected="yes")
                for i in range(60)]
    outputs = {}
    for name, texts in (("a", ["yes", "no"]), ("b", ["no", "no", "yes"])):
        store.write_parquet(f"outputs/{name}.parquet", pd.DataFrame(
            {"example_id": [e.id for e in examples], "output": [texts[i % len(texts)] for i in range(60)],
             "contender": name, "error": None}))
        outputs[name] = (f"outputs/{name}.parquet", f"key-{name}")
    run = lambda: judge_task.fn("d", examples, "exact", "fp", outputs, JudgeConfig(), str(tmp_path))
    ((batch, *_),), _ = run()
    path = tmp_path / batch
    before, whole = store.read_parquet(batch), path.read_bytes()
    harm(path, *data_page(path, "raw" if how == "bit" else "winner"), how)
    caplog.set_level(logging.INFO, "basesearch")
    assert run()[1] == 0  # judged again
    assert path.read_bytes() == whole and store.read_parquet(batch).equals(before)
    (line,) = damage_lines(caplog)
    assert batch in line and "\n" not in line
    assert run()[1] == 1


def adapter_stage(store: Store, rel: str, calls: list[str], weights: bytes) -> Path:
    """A stage as tasks/train/finetune.py runs one: reuse the folder result, else fill a new folder."""
    with store.claim(rel) as todo:
        if todo:
            calls.append(rel)
            with store.new_dir(rel) as tmp:
                (tmp / "adapter_model.safetensors").write_bytes(weights)
                (tmp / "adapter_config.json").write_text('{"r": 8}')
    return store.local_dir(rel)


@pytest.mark.parametrize("how", ["bit", "64-bytes"])
def test_bit_rot_in_an_adapter_is_found_and_refit(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                  how: str) -> None:
    from tasks.store import verify

    store, rel, calls = Store(str(tmp_path)), "adapters/k1", []
    weights = random.Random(1).randbytes(64 << 10)
    folder = adapter_stage(store, rel, calls, weights)
    target = folder / "adapter_model.safetensors"
    harm(target, 0, target.stat().st_size, how)
    verify._DEEP.clear()
    verify._VERIFIED.clear()  # as a new process
    assert store.exists(rel)  # sizes and times are as the manifest says: the plan counts it
    caplog.set_level(logging.INFO, "basesearch")
    adapter_stage(store, rel, calls, weights)
    assert calls == [rel, rel] and target.read_bytes() == weights
    (line,) = damage_lines(caplog)
    assert line == (f"store: {rel} is damaged (adapter_model.safetensors differs from its manifest's sha256); "
                    "it will be removed and recomputed")
    assert json.loads((folder / MANIFEST).read_text())["files"]["adapter_model.safetensors"]["size"] == 64 << 10
    adapter_stage(store, rel, calls, weights)
    assert len(calls) == 2


@pytest.mark.filterwarnings("ignore")
def test_a_search_over_damaged_results_goes_on_and_rates_as_before(tiny_models, tiny_data, tmp_path, capsys, caplog):
    import shutil

    import yaml

    from flows.cli import main
    from tasks.store import verify
    from tests.conftest import one_dataset_config_dict

    config = tmp_path / "mini.yaml"
    config.write_text(yaml.safe_dump(one_dataset_config_dict(tiny_models, tiny_data)))
    first = tmp_path / "first"
    assert main(["--config", str(config), "--store", str(first)]) == 0
    store = tmp_path / "store"
    shutil.copytree(first, store)
    batch = min((store / "judgments").glob("*.parquet"))
    harm(batch, *data_page(batch, "winner"), "64-bytes")  # the verdicts themselves
    output = max((store / "outputs").glob("*.parquet"))
    harm(output, *data_page(output, "output"), "bit")
    adapter = next(p for p in sorted((store / "adapters").iterdir()) if not p.name.startswith("."))
    weights = adapter / "adapter_model.safetensors"
    harm(weights, 0, weights.stat().st_size, "bit")
    (store / "runs" / "LATEST").unlink()
    verify._DEEP.clear()
    verify._VERIFIED.clear()  # as a new process
    capsys.readouterr()
    caplog.set_level(logging.INFO, "basesearch")
    assert main(["--config", str(config), "--store", str(store)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    warned = sorted({line.split(" is damaged")[0] for line in damage_lines(caplog)})
    assert warned == sorted(f"store: {p.relative_to(store).as_posix()}" for p in (batch, output, adapter)), warned

    def ratings(root: Path) -> pd.DataFrame:
        """The latest run's ratings."""
        return pd.read_parquet(root / "runs" / (root / "runs" / "LATEST").read_text().strip() / "ratings.parquet")

    pd.testing.assert_frame_equal(ratings(store), ratings(first))
    assert batch.read_bytes() == (first / batch.relative_to(store)).read_bytes()
    again, before = pd.read_parquet(output), pd.read_parquet(first / output.relative_to(store))
    assert again["output"].tolist() == before["output"].tolist()  # answers again (their timings differ)
