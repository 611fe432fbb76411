"""Every bench's small mode runs and prints its table (machine and command included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "machine:" in out.stdout and "command: python" in out.stdout and "|---" in out.stdout
    return out.stdout


def test_finetune_throughput_quick():
    out = run("bench/finetune_throughput.py", "--quick")
    assert "ours (packed)" in out and "Trainer + peft" in out


def test_generate_throughput_quick():
    out = run("bench/generate_throughput.py", "--quick")
    assert "identical outputs: True" in out and "one at a time" in out and "plain batched model.generate" in out


def test_store_overhead_quick():
    out = run("bench/store_overhead.py", "--quick")
    assert "first run: writes + checks" in out and "re-run: checks only" in out and "linear extrapolation" in out


def test_leak_check_small():
    out = run("bench/leak_check.py", "--train", "300", "--test", "60")
    assert out.count("18 of 60 test prompts (30%): 12 verbatim, 6 after case/whitespace folding, 0 near") == 3
    assert "datasketch LSH at the threshold (baseline)" in out


def test_ingest_speed_small():
    out = run("bench/ingest_speed.py", "--rows", "2000")
    assert "| ingest (every step)" in out and "read + parse JSON (floor)" in out
    assert "500 exact and 200 near duplicates, 1,240 rows written" in out and "equal to the log's truth" in out


def test_gpu_finetune_cpu_small():
    out = run("bench/gpu_finetune.py", "--cpu-small", "--checkpointing", "off", "--steps", "1")
    assert "MFU = tokens/s * (4N + 6N_lora) / peak" in out and "| off" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU machine runs the bench itself")
def test_gpu_generate_refuses_without_cuda_in_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "bench/gpu_generate.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    line = ("bench/gpu_generate.py: no CUDA device on this machine; run it on a GPU machine, or with --tiny for a "
            "CPU-indicative run")
    assert out.returncode == 1 and out.stderr.splitlines() == [line], out.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_merge_memory_quick():
    # a tiny model is ~0.4 MB on disk: 3000x (~1.2 GB) is a limit the tiny merge fits under, to exercise the cgroup
    out = run("bench/merge_memory.py", "--quick", "--limit-x", "3000")
    assert "peak RSS (ru_maxrss)" in out and "peak anon RSS (sampled)" in out and "n/a (tiny shape)" in out
    assert "completed under a 3000x memory.max: " in out


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_merge_memory_quick_sharded():
    # the 7B path (models written shard by shard, an absolute GiB limit) on the tiny shape
    out = run("bench/merge_memory.py", "--quick", "--shape", "7b", "--limit-gb", "1")
    assert "written shard by shard" in out and "n/a (tiny shape)" in out
    assert "completed under a 1 GiB memory.max: " in out


def test_merge_memory_shards_load_as_mistral(tmp_path):
    # the direct writer must produce the folder transformers itself would: same names, shapes, no missing keys
    import importlib.util

    import torch
    from transformers import MistralForCausalLM

    spec = importlib.util.spec_from_file_location("merge_memory", ROOT / "bench" / "merge_memory.py")
    merge_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_memory)
    params = merge_memory.write_shards(tmp_path, merge_memory.TINY, seed=0)
    model, info = MistralForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info.values()), info
    assert params == sum(p.numel() for p in model.parameters())
    assert model.dtype == torch.bfloat16 and len(list(tmp_path.glob("*.safetensors"))) == 2 + 2


def test_families_quick():
    out = run("bench/families.py", "--quick")
    assert "traceback in stderr: False" in out and "| base-hermes-union |" in out, out[-4000:]
    assert "10-candidate check with a refused conversation: exit 2" in out


def test_coverage_quick():
    out = run("bench/coverage.py", "--quick")
    assert "| example bootstrap |" in out and "| battle bootstrap  |" in out and "| strong   | fisher" in out
    assert "| strong   | sandwich" in out
    assert "pseudo-true Elo m0..m5" in out


def test_adaptive_savings_quick():
    out = run("bench/adaptive_savings.py", "--quick")
    for case in ("clear leader", "near-tie", "24 contenders"):
        for strategy in ("adaptive", "uniform, same n", "all pairs"):
            assert f"| {case:<13} | {strategy:<15} | 3 " in out
    assert "wrong-winner claims (Wilson 95%)" in out and "adaptive stops:" in out


def test_zoo_copying_small():
    out = run("bench/zoo_copying.py", "--steps", "2", "--every", "1")
    assert "| zoo (tasks.demo.zoo.SHAPE: 4x96, 2/1 heads of 64, untied) |" in out and "| 2x128, 8/8 heads, tied |" in out
    assert "of the extraction test values have the same tokens in the answer as in the prompt" in out
    assert "trained on varied rows" in out and "| 0.00/0.00 |" in out  # 2 steps copy nothing, on either layout


def test_merge_search_quick():
    out = run("bench/merge_search.py", "--quick")
    assert "20 landscapes" in out and "| rule, 5 rounds x 4" in out and "| grid, spacing 0.1" in out
