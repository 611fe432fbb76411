"""Bad input fails fast with one line naming the file, line or key; every shipped config loads."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.config.schema import load_config
from tasks.plan.prepare import prepare
from tests.conftest import config_error as _error
from tests.conftest import make_tiny_model, mini_config_dict, write_jsonl
from tests.conftest import write_config as _write

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("[!.]*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.candidates and cfg.datasets
    if not cfg.llm_judges() and not cfg.references:
        prepare(cfg)  # API-judged configs make a first call to their endpoint in prepare(): no network here


def test_unknown_key_names_line_and_nearest_key(tmp_path, tiny_models, tiny_data):
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["finetune"]["learning_rte"] = 0.1
    msg = _error(_write(tmp_path, cfg))
    assert "finetune.learning_rte" in msg and "did you mean 'learning_rate'" in msg
    line = int(msg.split(":")[1])
    assert "learning_rte" in (tmp_path / "search.yaml").read_text().splitlines()[line - 1]


def test_bad_packing_value_lists_the_choices(tmp_path, tiny_models, tiny_data):
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["finetune"]["packing"] = "fast"
    msg = _error(_write(tmp_path, cfg))
    assert "finetune.packing" in msg and "True, False or 'auto'" in msg and "\n" not in msg.strip()


@pytest.mark.parametrize("value", [0, "many", True])
def test_bad_workers_value(tmp_path, tiny_models, tiny_data, value):
    cfg = mini_config_dict(tiny_models, tiny_data) | {"compute": {"workers": value}}
    msg = _error(_write(tmp_path, cfg))
    assert "compute.workers: should be a whole number of processes (1 or more) or auto" in msg


def test_unknown_top_level_key(tmp_path, tiny_models, tiny_data):
    cfg = mini_config_dict(tiny_models, tiny_data) | {"candidats": []}
    assert "did you mean 'candidates'" in _error(_write(tmp_path, cfg))


def test_missing_dataset_file(tmp_path, tiny_models, tiny_data):
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["datasets"][0]["train"] = "nowhere.jsonl"
    msg = _error(_write(tmp_path, cfg))
    assert "nowhere.jsonl" in msg and "not found" in msg
    assert str(tmp_path) in msg  # relative paths resolve against the config's folder


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([], "is empty"),
        (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', '{"messages": [}'],
         ":2: broken JSON line"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], ":1: no assistant message"),
    ],
)
def test_bad_dataset_rows(tmp_path, tiny_models, tiny_data, lines, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(line + "\n" for line in lines))
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["datasets"][1]["test"] = str(bad)
    msg = _error(_write(tmp_path, cfg))
    assert "bad.jsonl" in msg and expected in msg


def test_broken_held_out_file_fails_up_front(tmp_path, tiny_models, tiny_data):
    bad = write_jsonl(tmp_path / "held.jsonl", [{"messages": [{"role": "user", "content": "no answer"}]}])
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["validation"]["dataset"]["test"] = str(bad)
    assert "held.jsonl:1: no assistant message" in _error(_write(tmp_path, cfg))


def test_merge_of_unknown_candidate(tmp_path, tiny_models, tiny_data):
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["merges"][0]["recipe"]["models"][1]["model"] = "betta"
    msg = _error(_write(tmp_path, cfg))
    assert "unknown candidate 'betta'" in msg and "did you mean 'beta'" in msg


def test_merge_of_different_architectures(tmp_path, tiny_models, tiny_data):
    wide = make_tiny_model(tmp_path / "wide", 3, hidden_size=64)
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["candidates"][1]["path"] = str(wide)
    msg = _error(_write(tmp_path, cfg))
    assert "alpha and beta have different architectures" in msg and "hidden_size 32 vs 64" in msg


def test_merge_of_different_vocabularies(tmp_path, tiny_models, tiny_data):
    other = make_tiny_model(tmp_path / "other", 3)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    first, second = sorted(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, different token ids
    (other / "tokenizer.json").write_text(json.dumps(tj))
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["candidates"][1]["path"] = str(other)
    assert "have different vocabularies" in _error(_write(tmp_path, cfg))


def test_cli_bad_input_is_one_line_without_traceback_and_fast(tmp_path, tiny_models, tiny_data):
    cfg = mini_config_dict(tiny_models, tiny_data)
    cfg["judge"] = {"kind": "metric", "strong_margn": 0.3}
    path = _write(tmp_path, cfg)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.search", "--config", str(path), "--store", str(tmp_path / "s")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "judge.strong_margn" in lines[0]
    assert not (tmp_path / "s" / "runs").exists()  # nothing started
    assert time.perf_counter() - t0 < 60  # no model was loaded, no server started
