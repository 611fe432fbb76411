"""Generation on a GPU, both engines: `generate.engine: hf` (ours: transformers, length-sorted batches, each adapter
merged into the cached base) against `generate.engine: vllm` (vLLM's offline engine, every adapter in one multi-LoRA
batch), on a Mistral-7B-shaped model with a few LoRA adapters answering the same rows; output tokens/s of each.

The model gets random bf16 weights made on the GPU from a config and saved once (nothing is downloaded; ~14.5 GB of
disk), with the demo zoo's tokenizer (its chat template; the 32,000-row embedding is larger than the tokenizer, which
both engines allow). The adapters are LoRA r=16 on every linear layer with small random weights. The prompts are the
demo's test rows; random weights rarely stop, so nearly every answer runs to --max-new-tokens and both engines
produce the same number of tokens. Both engines run through the search's own code (tasks/generate/outputs.py
generate; tasks/generate/vllm_engine.py vllm_outputs) with the same prompt ids and stop ids. vLLM runs in the
environment BASESEARCH_VLLM_PYTHON names; without it only the hf engine is measured. The hf engine goes first and
frees the GPU before vLLM starts (vLLM takes 90% of the GPU's memory).

Columns: seconds is generation only (the hf engine after its base is loaded, every adapter merged and answered one
after another; vLLM's one generate call over all adapters), start is what comes before it (loading the base; vLLM's
whole process less its generate call: import, load, compile, CUDA graphs).

python bench/gpu_generate.py                      # on a GPU machine (refuses with one line without CUDA)
python bench/gpu_generate.py --tiny               # the demo zoo's shape on CPU, float32: CPU-indicative only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MISTRAL_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
              "rope_theta": 10000.0}


def build_model(folder: Path, shape: dict, tiny: bool) -> Path:
    """A Mistral of `shape` with random weights (bf16 on the GPU, float32 on CPU), saved with the zoo's tokenizer."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from tasks.demo.zoo import build_tokenizer

    tok = build_tokenizer()
    shape = {**shape, "vocab_size": max(shape.get("vocab_size", 0), len(tok))}
    torch.manual_seed(0)
    cfg = MistralConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, sliding_window=None,
                        initializer_range=0.3 if tiny else 0.02)
    dtype, dev = (torch.float32, "cpu") if tiny else (torch.bfloat16, "cuda")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return folder


def build_adapters(base: Path, folder: Path, n: int, rank: int, tiny: bool) -> list[str]:
    """n LoRA adapters of `rank` on every linear layer of `base`, small random weights each, saved under `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32 if tiny else torch.bfloat16,
                                                 device_map="cpu" if tiny else "cuda")
    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                init_lora_weights=False))
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        peft.save_pretrained(str(folder / f"adapter-{i + 1}"))
        out.append(str(folder / f"adapter-{i + 1}"))
        model = peft.unload()  # the base without the LoRA layers, for the next adapter
    del model, peft
    if not tiny:
        torch.cuda.empty_cache()
    return out


def run_hf(model_dir: Path, adapters: list[str], test: Path, cfg) -> dict:
    """The hf engine: the base loaded once, then each adapter merged and answering the rows in turn."""
    import torch

    from tasks.data.load import load_examples
    from tasks.generate.outputs import cached_base, clear_base_cache, generate

    examples = load_examples(test)
    t0 = time.perf_counter()
    cached_base(model_dir)
    start = time.perf_counter() - t0
    generate(model_dir, adapters[0], "bench", examples[:2], "warm-up", cfg.model_copy(update={"max_new_tokens": 4}))
    t0, frames = time.perf_counter(), []
    for i, a in enumerate(adapters):
        frames.append(generate(model_dir, a, "bench", examples, f"adapter-{i + 1}", cfg))
    seconds = time.perf_counter() - t0
    clear_base_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"frames": frames, "seconds": seconds, "start": start}


def run_vllm(model_dir: Path, adapters: list[str], test: Path, cfg, python: str) -> dict:
    """The vllm engine: every adapter's rows in one multi-LoRA batch, through the search's own vllm_outputs."""
    from tasks.config.schema import LoadOptions
    from tasks.generate.job import GenerateJob
    from tasks.generate.vllm_engine import vllm_outputs

    jobs = [GenerateJob(f"adapter-{i + 1}", "bench", str(model_dir), a, str(test), cfg, f"k{i}", LoadOptions())
            for i, a in enumerate(adapters)]
    t0 = time.perf_counter()
    frames = vllm_outputs(jobs, python)
    wall = time.perf_counter() - t0
    seconds = float(frames["k0"]["batch_s"].iloc[0])
    return {"frames": [frames[j.key] for j in jobs], "seconds": seconds, "start": wall - seconds}


def row(engine: str, result: dict, n_adapters: int, base_s: float | None) -> dict:
    """One table row: output tokens (answers and the stop tokens that ended them) per second of generation."""
    frames = result["frames"]
    tokens = sum(int(f["completion_tokens"].sum() + (f["finish_reason"] == "stop").sum()) for f in frames)
    rate = tokens / result["seconds"]
    return {"engine": engine, "adapters": n_adapters, "rows": sum(len(f) for f in frames), "new tokens": tokens,
            "seconds": f"{result['seconds']:.2f}", "tokens/s": f"{rate:,.0f}",
            "vs hf": f"{rate / base_s:.2f}x" if base_s else "1.00x", "start s": f"{result['start']:.1f}",
            "_rate": rate}


def test_file(folder: Path, rows: int) -> Path:
    """The demo's test rows (every dataset, in turn) up to `rows`, as one JSONL file."""
    lines = []
    for f in sorted((ROOT / "configs" / "demo_data").glob("*_test.jsonl")):
        lines += [x for x in f.read_text().splitlines() if x.strip()]
    path = folder / "test.jsonl"
    path.write_text("\n".join(lines[:rows]) + "\n")  # the demo has 160: every row once
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the demo zoo's shape on CPU in float32 (CPU-indicative)")
    ap.add_argument("--adapters", type=int, default=4, help="LoRA adapters of the one base (default 4)")
    ap.add_argument("--rank", type=int, default=16, help="their LoRA rank (default 16)")
    ap.add_argument("--rows", type=int, default=None, help="test rows each adapter answers (default 128; --tiny 40)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128; --tiny 48")
    ap.add_argument("--batch", type=int, default=None, help="hf engine's batch size (default 64; --tiny 40)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads with --tiny (default 1)")
    a = ap.parse_args()
    import torch

    if not a.tiny and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_generate.py: no CUDA device on this machine; run it on a GPU machine, or with "
                         "--tiny for a CPU-indicative run")
    if a.tiny:
        torch.set_num_threads(a.threads)
    from bench._machine import header, table
    from tasks.config.stages import GenerateConfig
    from tasks.demo.zoo import SHAPE

    rows, max_new, batch = a.rows or (40 if a.tiny else 128), a.max_new_tokens or (48 if a.tiny else 128), \
        a.batch or (40 if a.tiny else 64)
    cfg = GenerateConfig(max_new_tokens=max_new, batch_size=batch)
    python = os.environ.get("BASESEARCH_VLLM_PYTHON", "")
    with tempfile.TemporaryDirectory(prefix="gpu-generate-") as tmp:
        t0 = time.perf_counter()
        model_dir = build_model(Path(tmp) / "model", SHAPE if a.tiny else MISTRAL_7B, a.tiny)
        adapters = build_adapters(model_dir, Path(tmp), a.adapters, a.rank, a.tiny)
        built = time.perf_counter() - t0
        test = test_file(Path(tmp), rows)
        hf = run_hf(model_dir, adapters, test, cfg)
        results = [row(f"hf (ours, adapter merged, batches of {batch})", hf, a.adapters, None)]
        vllm = None
        if python:
            vllm = run_vllm(model_dir, adapters, test, cfg.model_copy(update={"engine": "vllm"}), python)
            results.append(row("vllm (one multi-LoRA batch)", vllm, a.adapters, results[0]["_rate"]))
        hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    same = ""
    if vllm:
        pairs = [(x, y) for f, g in zip(hf["frames"], vllm["frames"]) for x, y in zip(f["output"], g["output"])]
        same = f"; vLLM's answers identical to hf's on {sum(x == y for x, y in pairs)} of {len(pairs)} rows"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not a.tiny else "CPU"
    print(f"Generation, both engines: {'demo zoo shape ' + str(SHAPE) if a.tiny else 'Mistral-7B shape'} (hidden "
          f"{hidden}), random {'float32' if a.tiny else 'bf16'} weights, {a.adapters} LoRA adapters r={a.rank} on "
          f"every linear layer, {rows} demo test rows each, greedy, max_new_tokens {max_new}, on {device}; model and "
          f"adapters built in {built:.0f} s{same}" + ("" if python else "; vLLM not measured: BASESEARCH_VLLM_PYTHON "
                                                                         "is not set"))
    print(header())
    print(table(results, ["engine", "adapters", "rows", "new tokens", "seconds", "tokens/s", "vs hf", "start s"]))


if __name__ == "__main__":
    main()
