"""Fine-tuning throughput: our LoRA training step against transformers Trainer + peft (with group_by_length, its
best for variable-length rows, and without), side by side.

Same model (the demo zoo's tiny Mistral shape, random weights), same LoRA (r=16, all linear layers), same rows
(every demo train set: variable-length chats, loss on the assistant's tokens only), same batch size, one
process, runs interleaved. Tokens/s counts real (non-padding) tokens over the timed steps, after warm-up steps.

python bench/finetune_throughput.py [--quick] [--steps N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._machine import header, table  # noqa: E402
from tasks.data.load import load_examples  # noqa: E402
from tasks.demo.zoo import SHAPE, build_tokenizer  # noqa: E402
from tasks.models.chat import IGNORE, prompt_format  # noqa: E402
from tasks.train.loop import encode, resolve_packing, train_steps

LR, BATCH, R, ALPHA = 3e-3, 8, 16, 32


def new_model(tok, shape: dict, seed: int = 0):
    """A random Mistral of `shape` with a fresh LoRA (r=16, all linear layers), float32 on CPU, SDPA attention."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, sliding_window=None,
                        attn_implementation="sdpa", **shape)
    lora = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(MistralForCausalLM(cfg), lora)


def ours(tok, shape, rows, warmup: int, steps: int, packing: bool) -> dict:
    """Our train_steps: warm-up steps, then `steps` timed steps."""
    model = new_model(tok, shape)
    train_steps(model, rows, lr=LR, steps=warmup, batch_size=BATCH, seed=1, pad_id=tok.pad_token_id, packing=packing)
    cpu = time.process_time()
    m = train_steps(model, rows, lr=LR, steps=steps, batch_size=BATCH, seed=2, pad_id=tok.pad_token_id,
                    packing=packing)
    return {"tokens": m["tokens"], "padded": m["padded_tokens"], "seconds": m["seconds"],
            "cpu_seconds": time.process_time() - cpu}


def trainer(tok, shape, rows, warmup: int, steps: int, out: str, by_length: bool = False) -> dict:
    """transformers Trainer + peft: its defaults (random batches padded to the longest row, its optimizer), or with
    group_by_length (transformers 5: train_sampling_strategy="group_by_length"), its own cure for padding."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    model = new_model(tok, shape)
    data = [{"input_ids": x, "attention_mask": [1] * len(x), "labels": y} for x, y in rows]
    pad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE)
    seen: list[tuple[int, int]] = []  # (real tokens, padded tokens) of every batch collated

    def collate(feats):
        b = pad(feats)
        seen.append((int(b["attention_mask"].sum()), b["input_ids"].numel()))
        return b

    marks: dict[str, float | int] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup:
                marks["t0"], marks["c0"], marks["n0"] = time.perf_counter(), time.process_time(), len(seen)
            if state.global_step == warmup + steps:
                marks["t1"], marks["c1"], marks["n1"] = time.perf_counter(), time.process_time(), len(seen)

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=BATCH, max_steps=warmup + steps, learning_rate=LR,
        lr_scheduler_type="linear", warmup_steps=max(1, (warmup + steps) // 10), weight_decay=0.0,
        max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if by_length else "random",
    )
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Clock()]).train()
    timed = seen[marks["n0"] : marks["n1"]]
    return {"tokens": sum(t for t, _ in timed), "padded": sum(p for _, p in timed), "seconds": marks["t1"] - marks["t0"],
            "cpu_seconds": marks["c1"] - marks["c0"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few steps, one round (for the test)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 40; quick 4)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds; the median is reported (default 5)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared machine a busy core makes OpenMP threads spin, and "
                    "2-thread timings swing 10x)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    steps = a.steps or (4 if a.quick else 40)
    rounds = a.rounds or (1 if a.quick else 5)
    warmup = 2 if a.quick else 5
    shape = SHAPE
    tok = build_tokenizer()
    fmt = prompt_format(tok)
    rows = []
    for f in sorted((ROOT / "configs" / "demo_data").glob("*_train.jsonl")):
        rows += [r for r in (encode(tok, fmt, ex) for ex in load_examples(f)) if len(r[0]) <= 256]
    lengths = sorted(len(x) for x, _ in rows)
    # packing: "auto" (the default) resolves to one of our two layouts for SDPA, the attention used here
    default = resolve_packing("auto", "sdpa")
    packed, padded = (f"ours ({name}{', the default' if on == default else ''})"
                      for name, on in (("packed", True), ("padded, length-grouped", False)))
    grouped = "Trainer + peft, group_by_length"
    runs: dict[str, list[dict]] = {packed: [], padded: [], grouped: [], "Trainer + peft": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            runs[packed].append(ours(tok, shape, rows, warmup, steps, packing=True))
            runs["Trainer + peft"].append(trainer(tok, shape, rows, warmup, steps, tmp))
            runs[padded].append(ours(tok, shape, rows, warmup, steps, packing=False))
            runs[grouped].append(trainer(tok, shape, rows, warmup, steps, tmp, by_length=True))
    # The baseline is the peer at its best: Trainer with its length grouping (the plain Trainer is listed too).
    base = statistics.median(r["tokens"] / r["seconds"] for r in runs[grouped])
    base_cpu = statistics.median(r["tokens"] / r["cpu_seconds"] for r in runs[grouped])
    plain = statistics.median(r["tokens"] / r["seconds"] for r in runs["Trainer + peft"])
    out = []
    for name, rs in runs.items():
        tps = statistics.median(r["tokens"] / r["seconds"] for r in rs)
        tpc = statistics.median(r["tokens"] / r["cpu_seconds"] for r in rs)
        out.append({
            "run": name, "tokens/s (median)": f"{tps:,.0f}",
            "each round": " ".join(f"{r['tokens'] / r['seconds']:,.0f}" for r in rs),
            "vs Trainer group_by_length": f"{tps / base:.2f}x", "vs plain Trainer": f"{tps / plain:.2f}x",
            "tokens/CPU-s": f"{tpc:,.0f}", "vs group_by_length (CPU time)": f"{tpc / base_cpu:.2f}x",
            "padding share": f"{1 - sum(r['tokens'] for r in rs) / sum(r['padded'] for r in rs):.1%}",
        })
    print(f"Fine-tuning throughput: {len(rows)} demo train rows ({lengths[0]}..{lengths[-1]} tokens, median "
          f"{lengths[len(lengths) // 2]}), batch {BATCH}, LoRA r={R} all-linear, model {shape}, "
          f"{warmup} warm-up + {steps} timed steps x {rounds} rounds, float32 on {'CUDA' if torch.cuda.is_available() else 'CPU'}")
    print(header())
    print(table(out, ["run", "tokens/s (median)", "each round", "vs Trainer group_by_length", "vs plain Trainer",
                      "tokens/CPU-s", "vs group_by_length (CPU time)", "padding share"]))


if __name__ == "__main__":
    main()
