"""A fine-tune that dies goes on from its last checkpoint in the store: the resumed adapter equals an uninterrupted
run's bit for bit (CPU, one thread), the log says the step, checkpoints go once the adapter is stored, and how
often a fine-tune checkpoints is no part of its key."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tasks.config.stages import FinetuneConfig
from tasks.data.load import load_examples
from tasks.store.results import adapter_key, adapter_path, checkpoint_path
from tasks.store.store import Store
from tasks.train import loop
from tasks.train.finetune import finetune_task

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "adapter_model.safetensors"


class Preempted(Exception):
    """The worker dying mid fine-tune."""


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the same float sums every run (bit-for-bit holds for one thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cfg_for(search: bool, **kw) -> FinetuneConfig:
    """A short fine-tune: 12 steps, fixed settings or the settings search."""
    return FinetuneConfig(max_steps=12, batch_size=4, learning_rate=3e-3, lora_dropout=0.1,
                          search={"enabled": search}, **kw)


def run(store: Path, model: Path, train: Path, cfg: FinetuneConfig, key: str) -> Path:
    """finetune_task as a stage runs it; the adapter's folder."""
    folder, _ = finetune_task.fn("alpha", "extraction", str(model), str(train), cfg, key, str(store),
                                 dev_from=str(train), dev_share=0.25)
    return Path(folder)


def test_checkpoint_settings_are_no_part_of_the_key():
    base = cfg_for(True)
    for other in (cfg_for(True, checkpoint_every=3), cfg_for(True, checkpoint_minutes=0)):
        assert adapter_key("m", "t", other, "d") == adapter_key("m", "t", base, "d")
    assert adapter_key("m", "t", cfg_for(True, seed=1), "d") != adapter_key("m", "t", base, "d")


@pytest.mark.parametrize("search", [False, True], ids=["fixed", "searched"])
def test_a_fine_tune_killed_after_a_checkpoint_resumes_bit_for_bit(tiny_models, tiny_data, tmp_path, monkeypatch,
                                                                   caplog, search):
    model, train = tiny_models["alpha"], tiny_data["extraction"][0]
    key = "k" * 16
    plain = run(tmp_path / "plain", model, train, cfg_for(search), key)  # no checkpoint taken (12 steps < 10 min)
    cfg = cfg_for(search, checkpoint_every=4, checkpoint_minutes=0)
    real_step, taken = loop.Trainer._step, []

    full = len(load_examples(train))  # the fine-tune trains on every row; the settings search's trainers on fewer

    def dies_at_step_10(self):
        """Steps as usual, but the 10th step of the fine-tune (not of the settings search's trainers) never ends."""
        if len(self.rows) == full and self.done == 9:
            raise Preempted
        taken.append(self.done)
        real_step(self)

    monkeypatch.setattr(loop.Trainer, "_step", dies_at_step_10)
    store = tmp_path / "store"
    with pytest.raises(Preempted):
        run(store, model, train, cfg, key)
    st = Store(str(store))
    assert not st.exists(adapter_path(key))
    saved = sorted(p.name for p in (store / checkpoint_path(key)).iterdir() if p.name.startswith("step-"))
    assert saved == ["step-8"]  # step-4 removed once step-8 was whole
    monkeypatch.setattr(loop.Trainer, "_step", real_step)
    caplog.set_level(logging.INFO, "basesearch")
    resumed = run(store, model, train, cfg, key)
    assert "fine-tune of alpha on extraction: resumed from the checkpoint at step 8 of 12" in caplog.text
    assert (resumed / WEIGHTS).read_bytes() == (plain / WEIGHTS).read_bytes()
    assert not (store / checkpoint_path(key)).exists()  # spent once the adapter is stored
    import json

    metrics = json.loads((resumed / "train_metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["loss_last"] == json.loads((plain / "train_metrics.json").read_text())[
        "loss_last"]
    if search:
        assert metrics["search"]["learning_rate"] == json.loads((plain / "train_metrics.json").read_text())[
            "search"]["learning_rate"]


KILLED = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
torch.set_num_threads(1)
from tasks.config.stages import FinetuneConfig
from tasks.data.load import load_examples
from tasks.train.finetune import finetune_task
cfg = FinetuneConfig(max_steps=int(sys.argv[5]), batch_size=4, learning_rate=3e-3, search={"enabled": False},
                     checkpoint_every=int(sys.argv[6]), checkpoint_minutes=0)
print(finetune_task.fn("alpha", "extraction", sys.argv[1], sys.argv[2], cfg, sys.argv[3], sys.argv[4])[0])
"""


def test_kill_9_mid_fine_tune_resumes_in_a_new_process(tiny_models, tiny_data, tmp_path):
    model, train = str(tiny_models["alpha"]), str(tiny_data["extraction"][0])
    store, key = tmp_path / "store", "c" * 16
    steps, every = 400, 40

    def start() -> subprocess.Popen:
        """The fine-tune in its own process, as a worker runs it."""
        return subprocess.Popen([sys.executable, "-c", KILLED, model, train, key, str(store), str(steps), str(every)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=os.environ | {"BASESEARCH_PROGRESS": "0"})

    first = start()
    ckpts = store / checkpoint_path(key)
    deadline = time.monotonic() + 300
    while not (ckpts.is_dir() and any((p / ".manifest.json").exists() for p in ckpts.glob("step-*"))):
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)  # a preempted spot machine: no cleanup of any kind
    first.wait(timeout=60)
    at = max(int(p.name[5:]) for p in ckpts.glob("step-*") if (p / ".manifest.json").exists())
    assert every <= at < steps
    second = start()
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-2000:]
    assert f"resumed from the checkpoint at step {at} of {steps}" in err
    again = subprocess.run([sys.executable, "-c", KILLED, model, train, key, str(tmp_path / "plain"), str(steps),
                            "0"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    assert (Path(out.strip()) / WEIGHTS).read_bytes() == (Path(again.stdout.strip()) / WEIGHTS).read_bytes()
    assert not ckpts.exists()
