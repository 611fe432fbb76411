"""Merge memory: two ~1B-parameter Mistral-shaped models (random bf16 weights, safetensors on disk) merged with
the merge stage's own code (tasks.merge.run_merge, mergekit, SLERP t=0.5), in a child process whose peak resident
memory (getrusage ru_maxrss of the child itself) and wall time are reported against one model's size on disk.

python bench/merge_memory.py [--quick] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ~1.1B parameters (the TinyLlama 1.1B shape, Mistral architecture): 2.2 GB in bf16.
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def make(folder: Path, shape: dict, seed: int) -> int:
    """Save a random bf16 Mistral of `shape` (safetensors) with the zoo tokenizer; return its parameter count."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from tasks.zoo import build_tokenizer

    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    cfg = MistralConfig(**shape, sliding_window=None, tie_word_embeddings=False, dtype="bfloat16")
    model = MistralForCausalLM(cfg)
    model.save_pretrained(str(folder), safe_serialization=True)
    build_tokenizer().save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def child_make(folder: str, shape: str, seed: str) -> None:
    print(json.dumps({"params": make(Path(folder), json.loads(shape), int(seed))}))


def child_merge(a: str, b: str, out: str) -> None:
    """The measured process: import, merge, report own peak RSS and the merge's wall time."""
    from tasks.config import Merge
    from tasks.merge import run_merge

    override = json.loads(os.environ.get("BENCH_MERGE_OPTIONS", "{}"))
    if override:  # try mergekit options the stage does not set yet (reported as such)
        import mergekit.options

        cls = mergekit.options.MergeOptions
        init = cls.__init__

        def patched(self, **kw):
            init(self, **(kw | override))

        cls.__init__ = patched
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    merge = Merge(name="bench-slerp", recipe={"merge_method": "slerp", "base_model": "a",
                                              "models": [{"model": "a"}, {"model": "b"}],
                                              "parameters": {"t": 0.5}, "dtype": "bfloat16"})
    t0 = time.perf_counter()
    run_merge(merge, {"a": a, "b": b}, Path(out))
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_merge_mb": base_rss}))


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def size_on_disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    from bench._machine import header, table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny shape (for the test)")
    ap.add_argument("--keep", default=None, help="folder for the models (reused if already there)")
    a = ap.parse_args()
    shape = TINY if a.quick else ONE_B
    with tempfile.TemporaryDirectory(dir=a.keep and None) as tmp:
        root = Path(a.keep or tmp)
        dirs = {name: root / name for name in ("a", "b")}
        t0 = time.perf_counter()
        params = 0
        for seed, (name, d) in enumerate(dirs.items()):
            if not list(d.glob("*.safetensors")):
                d.mkdir(parents=True, exist_ok=True)
                params = run_child("--make", str(d), json.dumps(shape), str(seed))["params"]
        made = time.perf_counter() - t0
        out = root / "merged"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        m = run_child("--merge", str(dirs["a"]), str(dirs["b"]), str(out))
        one = size_on_disk(dirs["a"])
        merged = size_on_disk(out)
    ratio = m["peak_rss_mb"] * 2**20 / one
    print(f"Merge memory: SLERP of two random bf16 Mistral-shaped models {shape} "
          f"({params / 1e9:.2f}e9 params each{'' if params else ', made earlier'}; made in {made:.0f} s) with "
          f"tasks.merge.run_merge (mergekit, lazy loading); peak RSS = the merge child's own ru_maxrss, including "
          f"the Python/torch/mergekit imports ({m['rss_before_merge_mb']:.0f} MB before the merge began)"
          + (f"; mergekit options overridden: {os.environ['BENCH_MERGE_OPTIONS']}" if os.environ.get("BENCH_MERGE_OPTIONS") else ""))
    print(header())
    print(table([{
        "one model on disk": f"{one / 2**20:,.0f} MB", "merged on disk": f"{merged / 2**20:,.0f} MB",
        "merge wall time": f"{m['seconds']:.1f} s", "peak RSS": f"{m['peak_rss_mb']:,.0f} MB",
        "peak / one model": f"{ratio:.2f}x", "target": "< 1.5x", "met": "n/a (tiny shape)" if a.quick else "yes" if ratio < 1.5 else "NO",
    }], ["one model on disk", "merged on disk", "merge wall time", "peak RSS", "peak / one model", "target", "met"]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--make":
        child_make(*sys.argv[2:5])
    elif len(sys.argv) > 1 and sys.argv[1] == "--merge":
        child_merge(*sys.argv[2:5])
    else:
        main()
