"""LoRA fine-tuning (peft) of one model on one dataset, with the loss on the assistant's tokens only."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.store import Store, content_key

if TYPE_CHECKING:
    from tasks.config import FinetuneConfig
    from tasks.data import Example

STAGE_VERSION = "1"  # bump when a change alters what a fine-tune computes
IGNORE = -100  # label id that torch's cross-entropy skips


def device() -> torch.device:
    """CUDA when there is a GPU, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prompt_text(tokenizer: Any, prompt: list[dict[str, str]]) -> str:
    """The conversation up to the assistant's turn, in the model's chat template (plain text if it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


def encode(tokenizer: Any, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one training row: labels are IGNORE on the prompt, the answer + EOS is learned."""
    prompt = tokenizer(prompt_text(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
    answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer)[:max_length]
    return ids, labels


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of indices, each made of similar lengths so that little compute goes on padding.

    Rows are shuffled, cut into windows of 16 batches, sorted by length inside each window, batched, and the
    batches shuffled again: order stays random across windows while padding within a batch stays small.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (ids, labels) into tensors with an attention mask."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_steps(
    model: torch.nn.Module,
    rows: list[tuple[list[int], list[int]]],
    *,
    lr: float,
    steps: int,
    batch_size: int,
    seed: int,
    pad_id: int,
) -> dict[str, Any]:
    """Train `model` for `steps` AdamW steps (linear warm-up 10%, then linear decay) and return metrics."""
    dev = next(model.parameters()).device
    # Tiny gradients drift into subnormal floats, which x86 CPUs process ~100x slower; flush them to zero.
    torch.set_flush_denormal(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    rng = random.Random(seed)
    lengths = [len(ids) for ids, _ in rows]
    batches: list[list[int]] = []
    losses, tokens, t0 = [], 0, time.perf_counter()
    model.train()
    # bf16 autocast on GPU halves memory traffic; CPU stays in fp32 (same code path, exact arithmetic).
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    for _ in range(steps):
        if not batches:
            batches = length_grouped_batches(lengths, batch_size, rng)
        batch = {k: v.to(dev) for k, v in collate([rows[i] for i in batches.pop()], pad_id).items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - t0
    k = max(1, len(losses) // 10)  # report the mean of the first and last 10% of steps: single steps are noisy
    return {
        "steps": steps,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "loss_first": round(sum(losses[:k]) / k, 4),
        "loss_last": round(sum(losses[-k:]) / k, 4),
        "device": dev.type,
    }


def load_base(model_dir: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a Hugging Face folder, on the training device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if device().type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device())
    return model, tok


def finetune(model_dir: str | Path, train: list[Example], cfg: FinetuneConfig, out_dir: Path) -> dict[str, Any]:
    """Train a LoRA adapter of `model_dir` on `train`, save it (and train_metrics.json) in `out_dir`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    model, tok = load_base(model_dir)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    rows = [encode(tok, ex, cfg.max_length) for ex in train]
    steps = cfg.max_steps or math.ceil(cfg.epochs * len(rows) / cfg.batch_size)
    metrics = train_steps(
        model, rows, lr=cfg.learning_rate, steps=steps, batch_size=cfg.batch_size, seed=cfg.seed, pad_id=tok.pad_token_id
    )
    metrics["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.save_pretrained(str(out_dir))
    (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def adapter_key(model_fp: str, train_fp: str, cfg: FinetuneConfig) -> str:
    """Content key of a fine-tune: base weights, training rows, hyper-parameters, code version."""
    return content_key("finetune", model_fp, train_fp, cfg.model_dump(), STAGE_VERSION)


@task(name="finetune", task_run_name="finetune-{model}-{dataset}", cache_policy=NO_CACHE)
def finetune_task(
    model: str, dataset: str, model_dir: str, train_path: str, cfg: FinetuneConfig, key: str, store_root: str
) -> tuple[str, bool]:
    """Prefect task: (local adapter folder, whether it was already in the store). Arguments are JSON-able."""
    from tasks.data import load_examples

    store, rel = Store(store_root), f"adapters/{key}"
    if store.exists(rel):
        return str(store.local_dir(rel)), True
    with store.new_dir(rel) as tmp:
        m = finetune(model_dir, load_examples(train_path), cfg, tmp)
    get_run_logger().info(
        f"finetune {model} on {dataset}: loss {m['loss_first']} -> {m['loss_last']}, {m['steps']} steps, "
        f"{m['tokens_per_s']:.0f} tokens/s"
    )
    return str(store.local_dir(rel)), False
