"""Which to deploy in vLLM: the LoRA adapter against its merged weights, served by the model card's own command.

    BASESEARCH_VLLM_PYTHON=.venv-vllm/bin/python python bench/vllm_serving.py [--rows 40] [--batch 8] [--quick]

Builds a tiny Qwen2.5-shaped model (ChatML, eos <|endoftext|> not its end of turn <|im_end|>; head_dim 64, the
smallest vLLM's CPU attention takes), runs a search fine-tuning it on the demo's classification rows, then
`python -m flows.export --check vllm`: the card's `vllm serve` command for the adapter, then the merged weights' own,
each a real server asked every test row through the openai client, `--batch` requests at a time (one untimed pass,
then a timed one). Prints each form's output tokens/s, whether its answers were identical to the search's, and how
long its server took to start. CPU numbers on a tiny model are indicative only: request overhead dominates.

--ablate also serves the adapter with the card's command less one flag at a time (`--generation-config`, then
`--dtype float32`) and checks it the same way: what each flag buys.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._machine import header, table
from tasks.demo.data import make_split
from tests.conftest import write_jsonl
from tests.families import build_model

SHAPE = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}  # head_dim 64


def run(args: list[str], what: str) -> tuple[float, str]:
    """(wall seconds, stdout) of a `python -m` command of this project; exits with its stderr when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        sys.exit(f"{what} failed: {proc.stderr.strip()[-2000:]}")
    return time.perf_counter() - t0, proc.stdout


def main() -> None:
    """Search, export with the vLLM check, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=40, help="test rows asked (default 40)")
    p.add_argument("--batch", type=int, default=8, help="requests in flight at once, as generate.batch_size")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--task", default="classification", choices=["classification", "extraction"],
                   help="the demo dataset fine-tuned and asked (extraction: longer JSON answers)")
    p.add_argument("--quick", action="store_true", help="8 test rows")
    p.add_argument("--ablate", action="store_true", help="also check the adapter served without each flag")
    a = p.parse_args()
    if not os.environ.get("BASESEARCH_VLLM_PYTHON"):
        sys.exit("set BASESEARCH_VLLM_PYTHON to the python of an environment with vLLM")
    rows = 8 if a.quick else a.rows
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        root = Path(tmp)
        model = build_model("qwen2", root / "qwen2", seed=0, **SHAPE)
        train, test = make_split(a.task, 32, rows)
        cfg = {"name": "served", "candidates": [{"name": "qwen2", "path": str(model)}],
               "datasets": [{"name": "labels", "train": str(write_jsonl(root / "train.jsonl", train)),
                             "test": str(write_jsonl(root / "test.jsonl", test))}],
               "finetune": {"max_steps": 30, "batch_size": 8, "learning_rate": 0.01, "max_length": 256, "lora_r": 8,
                            "search": {"enabled": False}},
               "generate": {"max_new_tokens": a.max_new_tokens, "batch_size": a.batch},
               "rating": {"bootstrap_rounds": 20}}
        (root / "search.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        run(["flows.search", "--config", str(root / "search.yaml"), "--store", str(root / "store")], "the search")
        out = root / "adapter"
        wall, stdout = run(["flows.export", "--run", "LATEST", "--store", str(root / "store"), "--out", str(out),
                            "--force", "--check", "vllm"], "the export")
        card = (out / "README.md").read_text()
        ablations = ablate(card, root, a.max_new_tokens, a.batch) if a.ablate else []
    results = re.findall(r"^check \(vllm\): (\d+ of \d+ test outputs identical.*)$", stdout, re.MULTILINE)
    ready = re.findall(r"server ready in (\d+) s", stdout)
    speeds = re.search(r"merged weights (\d+) output tokens/s, the adapter (\d+) \((\d+)% of merged\)", card)
    if len(results) != 2 or len(ready) != 2 or not speeds:
        sys.exit(f"unexpected export output:\n{stdout}")
    print(header())
    print(f"load average (1/5/15 min) at the start: {load0}; vLLM python: {os.environ['BASESEARCH_VLLM_PYTHON']}")
    print(f"{a.task}: {rows} test rows, {a.batch} requests at a time, at most {a.max_new_tokens} new tokens; export with both "
          f"checks: {wall:.0f} s wall\n")
    print(table([{"form": "adapter (--enable-lora)", "output tokens/s": speeds[2], "vs merged": f"{speeds[3]}%",
                  "check": results[0], "server start s": ready[0]},
                 {"form": "merged weights", "output tokens/s": speeds[1], "vs merged": "100%",
                  "check": results[1], "server start s": ready[1]}],
                ["form", "output tokens/s", "vs merged", "check", "server start s"]))
    if ablations:
        print("\nthe adapter served with the card's command less one flag:\n")
        print(table(ablations, ["command", "check"]))


def ablate(card: str, root: Path, max_new_tokens: int, batch: int) -> list[dict]:
    """The adapter's card command without --generation-config, then without --dtype float32, each checked."""
    import pandas as pd

    from tasks.config.schema import LoadOptions
    from tasks.data.load import load_examples
    from tasks.export.serve import card_serve_command
    from tasks.export.vllm import VllmCheckConfig, check_in_vllm, vllm_python
    from tasks.models.chat import load_tokenizer

    command = card_serve_command(card)
    stored = pd.concat(pd.read_parquet(f) for f in (root / "store" / "outputs").glob("*.parquet"))
    stored = stored[stored["contender"] == "qwen2"]
    want = {str(i): (o, f) for i, o, f in zip(stored["example_id"], stored["output"], stored["finish_reason"])}
    rows = [(str(e.id), e.prompt) for e in load_examples(str(root / "test.jsonl"))]
    tok = load_tokenizer(root / "adapter", LoadOptions())
    cfg = VllmCheckConfig(**vllm_python())
    out = []
    for flag in (f"--generation-config {root / 'adapter'}", "--dtype float32"):
        less = command.replace(" " + flag, "")
        verdict = check_in_vllm(less, "qwen2-labels", rows, want, tok, max_new_tokens, batch, cfg, log=lambda _: None)
        out.append({"command": f"without {flag.split()[0]}", "check": verdict.line.split(": ", 1)[1]})
    return out


if __name__ == "__main__":
    main()
