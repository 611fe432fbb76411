"""kill -9 a search in the middle of judging, start it again: it completes, no judgment is lost or duplicated,
no finished fine-tune is retrained, and no Parquet file is left truncated.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import one_dataset_config_dict
from tests.prefect_server import prefect_env, run_search, slowed_search, start, stop, wait_while_running

pytestmark = pytest.mark.filterwarnings("ignore")

# The search, with every judged batch's write slowed down: judging then lasts long enough to be killed in.
SLOW_JUDGING = slowed_search("judgments/")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime in ns) of every finished entry in a store folder (temp entries left out)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir() if not p.name.startswith(".tmp")}


def test_killed_in_judging_resumes_without_loss_or_rework(tiny_models, tiny_data, tmp_path):
    config = tmp_path / "mini.yaml"
    config.write_text(yaml.safe_dump(one_dataset_config_dict(tiny_models, tiny_data)))  # 6 judged batches
    store = tmp_path / "store"
    home = tmp_path / "prefect"
    home.mkdir()
    env = prefect_env(home, None)  # no server: each run starts Prefect's temporary one, as the CLI does
    args = ["--config", str(config), "--store", str(store)]

    log = tmp_path / "killed.log"
    proc = start([sys.executable, "-c", SLOW_JUDGING, *args], env, log)
    try:
        judged = lambda: len(list((store / "judgments").glob("*.parquet"))) if (store / "judgments").is_dir() else 0  # noqa: E731
        wait_while_running(proc, log, lambda: judged() >= 2, 600, "two judged batches, before the kill")
    finally:
        stop(proc, signal.SIGKILL)  # kill -9, the search and the temporary server it started
    assert proc.returncode == -signal.SIGKILL
    before = {"adapters": snapshot(store / "adapters"), "outputs": snapshot(store / "outputs"),
              "judgments": snapshot(store / "judgments")}
    assert len(before["adapters"]) == 3 and 2 <= len(before["judgments"]) < 6
    assert not (store / "runs" / "LATEST").exists()

    rc, out = run_search(args, env, tmp_path / "rerun.log")
    assert rc == 0, out[-3000:]

    run = (store / "runs" / "LATEST").read_text().strip()
    stages = {s["stage"]: s for s in yaml.safe_load((store / "runs" / run / "stages.json").read_text())}
    # Nothing finished before the kill is computed again: no fine-tune, no generation, no judged batch.
    assert stages["finetune:extraction"] == stages["finetune:extraction"] | {"computed": 0, "reused": 3}
    assert stages["generate:extraction"]["computed"] == 0
    assert stages["judge:extraction"]["computed"] == 6 - len(before["judgments"])
    for folder, entries in before.items():
        after = snapshot(store / folder)
        assert {k: after[k] for k in entries} == entries, f"{folder}: a finished result was rewritten"
    # Every judgment once: 6 pairs x 6 examples x 2 orders.
    judgments = pq.read_table(store / "runs" / run / "judgments.parquet").to_pandas()
    assert len(judgments) == 72
    assert not judgments.duplicated(["dataset", "example_id", "contender_a", "contender_b", "order"]).any()
    # No Parquet file anywhere in the store is truncated.
    for path in store.rglob("*.parquet"):
        pq.read_table(path)

    # A user appends a candidate to the saved search's list: the re-run computes that candidate's work only.
    from flows.rerun import search_rerun
    from tasks.demo.zoo import build_tokenizer
    from tests.conftest import make_tiny_model

    gamma = make_tiny_model(tmp_path / "gamma", seed=7, tokenizer=build_tokenizer())
    listing = tmp_path / "candidates.yaml"
    listing.write_text(f"- {{name: alpha, path: {tiny_models['alpha']}}}  # already in the config: ignored\n"
                       f"- {{name: gamma, path: {gamma}}}\n")
    from flows.cli import stop_temporary_server

    result = search_rerun(str(config), str(listing), str(store))
    stop_temporary_server()  # now, not at interpreter exit when pytest has closed the streams it logs to
    stages = {s["stage"]: s for s in result["stages"]}
    assert (stages["finetune:extraction"]["computed"], stages["finetune:extraction"]["reused"]) == (1, 3)
    assert (stages["generate:extraction"]["computed"], stages["generate:extraction"]["reused"]) == (1, 3)
    assert (stages["judge:extraction"]["computed"], stages["judge:extraction"]["reused"]) == (4, 6)  # gamma x 4
    assert stages["merges"]["computed"] == 0
    assert "gamma" in {r["contender"] for r in result["ranking"]}


def test_candidate_list_files(tmp_path):
    from flows.rerun import candidate_name, read_candidates, with_candidates
    from tasks.config.schema import Candidate, SearchConfig
    from tasks.core.errors import UserError

    (tmp_path / "local-model").mkdir()
    listing = tmp_path / "c.yaml"
    listing.write_text("# users append here\n- Qwen/Qwen2.5-0.5B\n- {name: mine, path: ./local-model}\n")
    found = read_candidates(listing)
    assert found == [Candidate(name="qwen2-5-0-5b", path="Qwen/Qwen2.5-0.5B"),
                     Candidate(name="mine", path=str(tmp_path / "local-model"))]
    assert candidate_name("org/Model.v1/") == "model-v1"
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert read_candidates(tmp_path / "empty.yaml") == []
    (tmp_path / "bad.yaml").write_text("- {name: x}\n")
    with pytest.raises(UserError, match=r"bad.yaml: entry 0: path: Field required"):
        read_candidates(tmp_path / "bad.yaml")
    cfg = SearchConfig(name="s", candidates=[Candidate(name="mine", path="zoo:base")],
                       datasets=[{"name": "d", "train": "t.jsonl", "test": "u.jsonl"}])
    merged = with_candidates(cfg, found, str(listing))
    assert [c.name for c in merged.candidates] == ["mine", "qwen2-5-0-5b"]  # the config's own entry wins
    assert merged.candidates[0].path == "zoo:base"
