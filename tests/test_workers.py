"""Local fine-tunes side by side in worker processes compute what one after another computes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest
import torch
from prefect import flow
from safetensors.torch import load_file

from tasks.compute.workers import local_workers
from tasks.config.schema import ComputeConfig
from tasks.config.stages import FinetuneConfig
from tasks.core.errors import EnvironmentFailure
from tasks.plan.execute import finetune_all
from tasks.plan.jobs import FinetuneJob


@pytest.fixture(autouse=True)
def stop_server():
    """Stop the flows' temporary Prefect server before pytest closes its output (it logs a line when stopping)."""
    yield
    from flows.cli import stop_temporary_server

    stop_temporary_server()


@flow
def finetune_flow(jobs: list[FinetuneJob], workers: int, store: str) -> list[tuple[str, bool]]:
    return finetune_all(jobs, ComputeConfig(workers=workers), store).results


def spawned_workers() -> int:
    """Live multiprocessing workers under this process (the pool's spawned children)."""
    return sum("multiprocessing" in " ".join(p.cmdline()) for p in psutil.Process().children(recursive=True))


def test_side_by_side_equals_one_after_another(tmp_path, tiny_models, tiny_data):
    cfg = FinetuneConfig(max_steps=3, batch_size=4, learning_rate=3e-3, max_length=128, search={"enabled": False})
    jobs = [FinetuneJob(name, "extraction", str(path), str(tiny_data["extraction"][0]), cfg, f"k-{name}")
            for name, path in tiny_models.items()]
    one = finetune_flow(jobs, 1, str(tmp_path / "one"))
    two = finetune_flow(jobs, 2, str(tmp_path / "two"))
    assert spawned_workers() >= 2  # the second run really went to worker processes
    for (a, reused_a), (b, reused_b) in zip(one, two):
        assert not reused_a and not reused_b
        ma, mb = (json.loads((Path(p) / "train_metrics.json").read_text()) for p in (a, b))
        assert ma["loss_first"] == pytest.approx(mb["loss_first"], rel=1e-4)
        assert ma["loss_last"] == pytest.approx(mb["loss_last"], rel=1e-4)
        wa, wb = (load_file(str(Path(p) / "adapter_model.safetensors")) for p in (a, b))
        assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    again = finetune_flow(jobs, 2, str(tmp_path / "two"))
    assert again == [(p, True) for p, _ in two]  # stored: reused, nothing sent to the workers


def die(*args, **kwargs):
    """Stands for a fine-tune whose worker the OS kills (the out-of-memory killer, or kill -9)."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_worker_is_one_line_naming_the_job(tmp_path, tiny_models, tiny_data, monkeypatch):
    monkeypatch.setattr("tasks.train.finetune.finetune", die)  # pickled by name: the worker runs tests.test_workers.die
    cfg = FinetuneConfig(max_steps=3, batch_size=4, learning_rate=3e-3, max_length=128, search={"enabled": False})
    jobs = [FinetuneJob(name, "extraction", str(path), str(tiny_data["extraction"][0]), cfg, f"k-{name}")
            for name, path in tiny_models.items()]
    with pytest.raises(EnvironmentFailure, match=r"^fine-tune of (alpha|beta) on extraction: its worker process died"):
        finetune_flow(jobs, 2, str(tmp_path / "store"))
    assert not list((tmp_path / "store" / "adapters").glob("[!.]*"))  # nothing half-trained was stored
    monkeypatch.undo()
    again = finetune_flow(jobs, 2, str(tmp_path / "store"))  # a fresh pool: the next run goes on
    assert [reused for _, reused in again] == [False, False]


def test_auto_workers_follow_the_machine():
    n = local_workers(ComputeConfig())
    assert n == (1 if torch.cuda.is_available() else max(1, min(8, len(psutil.Process().cpu_affinity()))))
    assert local_workers(ComputeConfig(workers=3)) == 3


def test_a_small_merge_runs_on_the_thread_count_of_the_search_in_either_mode(tiny_models, tmp_path, monkeypatch):
    """A merge runs on threads_for's count (1 for a small model), not the process's: local mode's search process
    (2 threads here) and a pool stage run (1) then write the same bytes (BENCHMARKS.md: 3e-8 apart before)."""
    import mergekit.merge
    import torch

    from tasks.config.schema import Merge
    from tasks.models.merge import run_merge

    real, seen = mergekit.merge.run_merge, []

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(mergekit.merge, "run_merge", recording)
    merge = Merge(name="ab", recipe={"merge_method": "slerp", "base_model": "alpha", "parameters": {"t": 0.5},
                                     "models": [{"model": "alpha"}, {"model": "beta"}], "dtype": "float32"})
    paths = {n: str(p) for n, p in tiny_models.items()}
    before = torch.get_num_threads()
    try:
        for n, out in ((2, tmp_path / "two"), (1, tmp_path / "one")):
            torch.set_num_threads(n)
            run_merge(merge, paths, out)
            assert torch.get_num_threads() == n  # given back
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1]
    assert (tmp_path / "two" / "model.safetensors").read_bytes() == (tmp_path / "one" / "model.safetensors").read_bytes()
