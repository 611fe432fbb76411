"""A search over all six model families plus a tokenizer_source: union merge, and the up-front check's speed.

    python bench/families.py [--quick]

Builds tiny models (two layers, 64 wide) of Mistral-Instruct, Llama 3, Qwen 2, Gemma, Gemma 2 and Phi 3, each
with a tokenizer trained here that carries the family's special tokens and chat template, plus a template-less
Mistral base and an OpenHermes-shaped sibling (two added ChatML tokens) merged with `tokenizer_source: union`.
Then:
1. runs `python -m flows.search` on the demo's classification dataset and reports, per fine-tune, the share of
   test outputs that ended at an end-of-turn token (`finish_reason: stop`), and whether stderr held a traceback;
2. times `python -m flows.search` on a 10-candidate config whose dataset has one conversation a template refuses
   (two user turns in a row): the wall time until its one-line error, with weights never loaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._machine import header  # noqa: E402
from tests.families import build_model  # noqa: E402

FAMILIES = ["mistral", "llama3", "qwen2", "gemma", "gemma2", "phi3"]
DATA = ROOT / "configs" / "demo_data"


def search(config: dict, folder: Path) -> tuple[float, subprocess.CompletedProcess]:
    """(wall seconds, finished process) of `python -m flows.search` on `config` with a store in `folder`."""
    path = folder / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.search", "--config", str(path), "--store", str(folder / "store")],
                         cwd=ROOT, capture_output=True, text=True)
    return time.perf_counter() - t0, out


def main() -> None:
    """Build the families, run the search, time the check; print one table each."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="20 training steps and 8 test rows (the CI smoke run)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        dirs = {n: build_model(n, root / n, seed=i) for i, n in enumerate([*FAMILIES, "mistral_base", "hermes"])}
        built = time.perf_counter() - t0
        test = DATA / "classification_test.jsonl"
        if a.quick:
            test = root / "test.jsonl"
            test.write_text("".join((DATA / "classification_test.jsonl").read_text().splitlines(True)[:8]))
        config = {
            "name": "families",
            "candidates": [{"name": n, "path": str(dirs[n])} for n in FAMILIES],
            "ingredients": [{"name": n, "path": str(dirs[n])} for n in ("mistral_base", "hermes")],
            "merges": [{"name": "base-hermes-union", "recipe": {
                "merge_method": "linear", "tokenizer_source": "union", "dtype": "float32",
                "models": [{"model": "mistral_base", "parameters": {"weight": 0.5}},
                           {"model": "hermes", "parameters": {"weight": 0.5}}]}}],
            "datasets": [{"name": "classification", "train": str(DATA / "classification_train.jsonl"),
                          "test": str(test), "metric": "exact"}],
            # the demo's LoRA settings; a step count instead of its 4 epochs, since the families start untrained
            "finetune": {"max_steps": 20 if a.quick else 60, "batch_size": 8, "learning_rate": 0.01,
                         "max_length": 256, "lora_r": 16, "lora_alpha": 32, "search": {"enabled": False}},
            "generate": {"max_new_tokens": 48, "batch_size": 40},
            "rating": {"bootstrap_rounds": 50},
        }
        wall, out = search(config, root)
        if out.returncode != 0:
            sys.exit(f"the families search failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        rows = []
        for p in sorted((root / "store" / "outputs").glob("*.parquet")):
            df = pd.read_parquet(p)
            if "finish_reason" in df:
                rows.append({"fine-tune": df["contender"].iloc[0], "outputs": len(df),
                             "finish_reason stop": f"{(df['finish_reason'] == 'stop').mean():.0%}"})
        run_id = (root / "store" / "runs" / "LATEST").read_text().strip()
        stages = json.loads((root / "store" / "runs" / run_id / "stages.json").read_text())

        # 10 candidates (the six families, four of them twice), one row no template may render: two user turns.
        bad = root / "bad_train.jsonl"
        rows_in = (DATA / "classification_train.jsonl").read_text().splitlines()
        msgs = json.loads(rows_in[0])["messages"]
        bad_row = {"messages": [msgs[1], msgs[1], msgs[2]]}
        bad.write_text("\n".join(rows_in + [json.dumps(bad_row)]) + "\n")
        ten = [{"name": f"{n}-{i}", "path": str(dirs[n])} for i in range(2) for n in FAMILIES][:10]
        check = {"name": "check", "candidates": ten,
                 "datasets": [{"name": "labels", "train": str(bad), "test": str(DATA / "classification_test.jsonl")}]}
        check_wall, check_out = search(check, root)
    print(header())
    print(f"built 8 tiny family models in {built:.1f} s; search wall {wall:.1f} s (process), "
          f"traceback in stderr: {'Traceback' in out.stderr}")
    if "Traceback" in out.stderr:  # say where, so a flaky one in CI can be read from the log
        start = out.stderr.index("Traceback")
        print("first traceback in the search's stderr:\n" + out.stderr[max(0, start - 600):start + 2400])
    print()
    print("| fine-tune | test outputs | finish_reason stop |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['fine-tune']} | {r['outputs']} | {r['finish_reason stop']} |")
    print()
    print("| stage | seconds | computed |")
    print("|---|---|---|")
    for s in stages:
        print(f"| {s['stage']} | {s['seconds']} | {s['computed']} |")
    print()
    error = (check_out.stderr.strip().splitlines() or [""])[-1]
    print(f"10-candidate check with a refused conversation: exit {check_out.returncode} after {check_wall:.1f} s "
          f"(process, Python start included): {error[:160]}")


if __name__ == "__main__":
    main()
