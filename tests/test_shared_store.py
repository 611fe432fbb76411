"""A store shared by several searches, through the real flow: two searches at once compute each result once, a
damaged result is recomputed, a full disk is one line; every time the ratings equal an undisturbed run's."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import one_dataset_config_dict
from tests.prefect_server import prefect_env, start, stop

pytestmark = pytest.mark.filterwarnings("ignore")
WORK = ("merges", "finetune", "generate", "judge")  # stages whose results live in the store


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_models, tiny_data) -> Path:
    """The miniature search cut to one dataset and no held-out check: 3 models + teacher."""
    path = tmp_path_factory.mktemp("cfg") / "mini.yaml"
    path.write_text(yaml.safe_dump(one_dataset_config_dict(tiny_models, tiny_data)))
    return path


@pytest.fixture(scope="module")
def undisturbed(config, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """(store, ratings) of one run alone on a fresh store."""
    from flows.cli import main

    store = tmp_path_factory.mktemp("alone") / "store"
    assert main(["--config", str(config), "--store", str(store)]) == 0
    return store, ratings_of(store)


def ratings_of(store: Path, run: str | None = None) -> pd.DataFrame:
    """The ratings of a run (the latest by default), without the columns that time the run."""
    run = run or (store / "runs" / "LATEST").read_text().strip()
    return pd.read_parquet(store / "runs" / run / "ratings.parquet")


def computed(store: Path, run: str) -> dict[str, int]:
    """stage -> results computed (not reused) by a run, for the stages that store results."""
    stages = json.loads((store / "runs" / run / "stages.json").read_text())
    return {s["stage"]: s["computed"] for s in stages if s["stage"].split(":")[0] in WORK}


def test_two_searches_at_once_compute_each_result_once(config, undisturbed, tmp_path):
    store = tmp_path / "store"
    args = ["--config", str(config), "--store", str(store)]
    procs = []
    try:
        for name in ("one", "two"):
            home = tmp_path / f"prefect-{name}"
            home.mkdir()
            procs.append(start([sys.executable, "-m", "flows.search", *args], prefect_env(home, None),
                               tmp_path / f"{name}.log"))
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            stop(p, wait_s=5)
    logs = [(tmp_path / f"{n}.log").read_text() for n in ("one", "two")]
    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
    runs = sorted(p.name for p in (store / "runs").iterdir() if p.is_dir())
    assert len(runs) == 2  # two run ids, even when started in the same second
    alone = computed(undisturbed[0], (undisturbed[0] / "runs" / "LATEST").read_text().strip())
    both = [computed(store, r) for r in runs]
    # Each result computed once between the two runs: the second waited for the first's and reused it.
    assert {k: both[0][k] + both[1][k] for k in alone} == alone
    for run in runs:
        pd.testing.assert_frame_equal(ratings_of(store, run), undisturbed[1])


def test_damaged_results_are_recomputed_with_one_warning(config, undisturbed, tmp_path, capsys, caplog):
    import shutil

    from flows.cli import main

    store = tmp_path / "store"
    shutil.copytree(undisturbed[0], store)
    adapter = next(p for p in sorted((store / "adapters").iterdir()) if not p.name.startswith("."))
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    output = next(p for p in sorted((store / "outputs").glob("*.parquet")))
    output.unlink()  # a deleted output file (a fine-tune's or the teacher's)
    (store / "runs" / "LATEST").unlink()
    assert main(["--config", str(config), "--store", str(store)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warned = [r.getMessage() for r in caplog.records if " is damaged " in r.getMessage()]
    assert len(warned) == 1 and f"adapters/{adapter.name} is damaged" in warned[0], warned
    run = (store / "runs" / "LATEST").read_text().strip()
    done = computed(store, run)
    assert done["finetune:extraction"] == 1  # the truncated adapter, and nothing else
    # The deleted outputs file again (its key is the adapter's key, not its bytes: the retrained adapter's
    # outputs are reused, as it is computed exactly as before).
    assert output.is_file() and done["generate:extraction"] <= 1
    pd.testing.assert_frame_equal(ratings_of(store), undisturbed[1])


def test_full_disk_is_one_line_then_the_same_command_goes_on(config, undisturbed, tmp_path, capsys, monkeypatch):
    from flows.cli import main
    from tasks.store.store import Store

    store = tmp_path / "store"
    put = Store._put_bytes

    def full(self, path: str, data: bytes) -> None:
        if "/outputs/" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        put(self, path, data)

    monkeypatch.setattr(Store, "_put_bytes", full)
    assert main(["--config", str(config), "--store", str(store)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "full" in errors[0] and str(store) in errors[0], err[-3000:]
    assert "Traceback" not in err
    assert not [p for p in store.rglob(".tmp-*") if ".locks" not in p.parts]
    monkeypatch.undo()
    assert main(["--config", str(config), "--store", str(store)]) == 0
    pd.testing.assert_frame_equal(ratings_of(store), undisturbed[1])
