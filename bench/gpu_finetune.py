"""GPU fine-tuning throughput and MFU: LoRA r=16 on every linear layer of a Mistral-7B-shaped model.

The model gets random bf16 weights created on the GPU (nothing is downloaded), and trains through our own
training step (tasks.train.loop.train_steps: bf16 autocast, SDPA, padding-free packing with per-row attention,
loss on answer tokens only). Each micro-batch is one packed 2,048-token sequence of 4 examples of 512 tokens
(256 prompt + 256 answer); an optimizer step takes --packs of them (gradient accumulation). A few warm-up steps,
then timed steps; prints tokens/s and MFU.

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s, where
  model FLOPs per token = 4 * N + 6 * N_lora
  N      = every parameter of the base model (7.24e9 for Mistral 7B, embedding table included, as the published
           anchor of ~12.5k tokens/s = 41% MFU for an 8B LoRA on one H100 counts it: 4 * 8.03e9 * 12.5e3 / 989e12)
  4 * N  = forward (2N) + backward through the frozen weights to the activations (2N); frozen weights get no
           weight gradient, so the usual 6N of full training does not apply
  6 * N_lora = forward, input-gradient and weight-gradient of the LoRA matrices
The attention score FLOPs are reported apart, as "MFU incl. attention": per example of L tokens and per layer,
3 * 2 * L^2 * d (forward QK^T and AV under a causal mask, backward twice the forward), d = heads * head_dim.
peak = 989.4e12 bf16 dense FLOP/s for an H100 SXM or an H200 (the same tensor cores); other cards: --peak-tflops.

python bench/gpu_finetune.py                 # on a GPU machine; finishes in well under 5 minutes on an H100
python bench/gpu_finetune.py --cpu-small     # a small shape on CPU, float32 (the script's own test)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    import prefect  # noqa: F401
except ImportError:  # a bare GPU image: tasks.train.finetune needs only prefect's decorator, which this bench never runs
    stub = types.ModuleType("prefect")
    stub.task = lambda *a, **k: (lambda f: f)
    stub.get_run_logger = lambda: None
    policies = types.ModuleType("prefect.cache_policies")
    policies.NO_CACHE = None
    sys.modules["prefect"], sys.modules["prefect.cache_policies"] = stub, policies

import torch  # noqa: E402

from bench._machine import header, table  # noqa: E402
from tasks.models.chat import IGNORE  # noqa: E402
from tasks.train.loop import train_steps  # noqa: E402

MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rope_theta=10000.0)
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)
PEAKS = {"H100": 989.4e12, "H200": 989.4e12}  # bf16 dense tensor-core peak, SXM parts


def build(shape: dict, dev: torch.device, dtype: torch.dtype):
    """A Mistral of `shape` with random weights made directly on `dev` in `dtype`, with LoRA r=16 on all linears."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(**shape, sliding_window=None, tie_word_embeddings=False, attn_implementation="sdpa",
                        use_cache=False)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with dev:
            model = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    n_base = sum(p.numel() for p in model.parameters())
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, n_base, n_lora


def rows_for(n_packs: int, seq: int, per_pack: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """n_packs * per_pack examples of seq/per_pack tokens each: first half prompt (no loss), second half answer."""
    g = torch.Generator().manual_seed(seed)
    L = seq // per_pack
    out = []
    for _ in range(n_packs * per_pack):
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        out.append((ids, [IGNORE] * (L // 2) + ids[L // 2 :]))
    return out


def run(model, rows, *, steps: int, packs: int, per_pack: int, micro: int | None, checkpointing: bool) -> dict:
    """train_steps over `steps` steps of `packs` packed sequences (micro-batches of `micro` tokens; None: what
    train_steps finds fits in memory); returns its metrics."""
    return train_steps(model, rows, lr=1e-4, steps=steps, batch_size=packs * per_pack, seed=0, pad_id=0,
                       packing=True, gradient_checkpointing=checkpointing, max_tokens=micro)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-small", action="store_true", help="small shape on CPU in float32 (for the test)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per packed sequence (default 2048; small 256)")
    ap.add_argument("--packs", type=int, default=4, help="packed sequences per optimizer step")
    ap.add_argument("--per-pack", type=int, default=4, help="examples per packed sequence")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; small 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 8; small 2)")
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], default="both",
                    help="gradient checkpointing in the timed runs (both: one run each)")
    ap.add_argument("--micro-tokens", default="auto",
                    help="comma-separated micro-batch sizes in tokens to time, `auto` = what train_steps picks to fit "
                    "memory (several packed sequences in one forward pass, attention still per example)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s of a card not in the table")
    a = ap.parse_args()
    small = a.cpu_small or not torch.cuda.is_available()
    dev = torch.device("cpu" if small and a.cpu_small else ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = SMALL if small else MISTRAL_7B
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    seq = a.seq or (256 if small else 2048)
    warmup = a.warmup if a.warmup is not None else (1 if small else 3)
    steps = a.steps or (2 if small else 8)
    t_start = time.perf_counter()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model, n_base, n_lora = build(shape, dev, dtype)
    t_built = time.perf_counter() - t_start
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU"
    peak = a.peak_tflops * 1e12 if a.peak_tflops else next((v for k, v in PEAKS.items() if k in gpu), None)
    d = shape["hidden_size"]  # heads * head_dim
    L = seq // a.per_pack
    attn_per_token = 3 * 2 * L * L * d * shape["num_hidden_layers"] / L  # per example, spread over its tokens
    model_per_token = 4 * n_base + 6 * n_lora
    results = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[a.checkpointing]
    micros = [None if x == "auto" else int(x) for x in a.micro_tokens.split(",")]
    for ckpt, micro in [(c, mt) for c in modes for mt in micros]:
        rows = rows_for(a.packs * (warmup + steps), seq, a.per_pack, shape["vocab_size"], seed=int(ckpt))
        run(model, rows, steps=warmup, packs=a.packs, per_pack=a.per_pack, micro=micro, checkpointing=ckpt)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        m = run(model, rows, steps=steps, packs=a.packs, per_pack=a.per_pack, micro=micro, checkpointing=ckpt)
        tps = m["tokens"] / m["seconds"]
        results.append({
            "gradient checkpointing": "on" if ckpt else "off",
            "micro-batch tokens": f"{m['micro_batch_tokens'] or 'all'}" + (" (auto)" if micro is None else ""),
            "tokens/s": f"{tps:,.0f}",
            "model TFLOP/s": f"{tps * model_per_token / 1e12:,.1f}",
            "MFU (4N+6N_lora)": f"{tps * model_per_token / peak:.1%}" if peak else "n/a",
            "MFU incl. attention": f"{tps * (model_per_token + attn_per_token) / peak:.1%}" if peak else "n/a",
            "peak GPU memory": f"{m['peak_gpu_mb'] / 1024:.1f} GiB" if "peak_gpu_mb" in m else
            f"{m['peak_rss_mb'] / 1024:.2f} GiB RSS",
            "loss": f"{m['loss_first']} -> {m['loss_last']}",
        })
    total = time.perf_counter() - t_start
    print(f"GPU fine-tune bench: {'Mistral-7B' if not small else 'small'} shape {shape}, random {str(dtype)[6:]} "
          f"weights made on {gpu}; N = {n_base:.4g} base params, N_lora = {n_lora:.4g} (r=16, all "
          f"linear layers); {a.packs} packed sequences of {seq} tokens per step ({a.per_pack} examples of {L} "
          f"tokens each, loss on the last half), {warmup} warm-up + {steps} timed steps per row")
    print(f"MFU = tokens/s * (4N + 6N_lora) / peak; peak = "
          + (f"{peak / 1e12:.1f} TFLOP/s bf16 dense" if peak else "unknown (pass --peak-tflops)")
          + f"; attention adds {attn_per_token / 1e9:.2f} GFLOP/token; model built in {t_built:.0f} s, "
          f"whole run {total:.0f} s")
    print(header())
    print(table(results, list(results[0])))


if __name__ == "__main__":
    main()
