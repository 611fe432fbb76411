"""Outputs: every fine-tune answers its test rows (batched greedy generation); the teacher's answers are read as-is."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.finetune import load_base, prompt_text
from tasks.store import Store, content_key

if TYPE_CHECKING:
    from tasks.config import GenerateConfig
    from tasks.data import Example

STAGE_VERSION = "1"
OUTPUT_COLUMNS = ["dataset", "example_id", "contender", "output", "prompt_tokens", "completion_tokens",
                  "latency_s", "error"]


def teacher_outputs(dataset: str, examples: list[Example], contender: str) -> pd.DataFrame:
    """The dataset's own assistant answers as a contender's outputs (no model, no cost)."""
    return pd.DataFrame({
        "dataset": dataset, "example_id": [e.id for e in examples], "contender": contender,
        "output": [e.answer for e in examples], "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0,
        "error": None,
    })[OUTPUT_COLUMNS]


@torch.inference_mode()
def generate(
    model_dir: str | Path, adapter_dir: str | Path, dataset: str, examples: list[Example], contender: str,
    cfg: GenerateConfig,
) -> pd.DataFrame:
    """Greedy answers of base + LoRA adapter on `examples`, in length-sorted, left-padded batches."""
    from peft import PeftModel

    model, tok = load_base(model_dir)
    # Folding the adapter into the weights makes each decoding step one matmul per layer, not three.
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.eval()
    tok.padding_side = "left"  # left padding: every row's last prompt token sits at the same position
    prompts = [prompt_text(tok, e.prompt) for e in examples]
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i]))
    rows: dict[int, dict] = {}
    dev = next(model.parameters()).device
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(dev)
        t0 = time.perf_counter()
        out = model.generate(
            **batch, max_new_tokens=cfg.max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        latency = (time.perf_counter() - t0) / len(idx)  # batch time shared evenly: s per example
        new = out[:, batch["input_ids"].shape[1] :]
        for row, i in enumerate(idx):
            ids = new[row].tolist()
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id)]
            rows[i] = {"output": tok.decode(ids, skip_special_tokens=True).strip(),
                       "prompt_tokens": len(encoded[i]), "completion_tokens": len(ids), "latency_s": latency}
    return pd.DataFrame([
        {"dataset": dataset, "example_id": e.id, "contender": contender, **rows[i], "error": None}
        for i, e in enumerate(examples)
    ])[OUTPUT_COLUMNS]


def outputs_key(adapter: str, test_fp: str, cfg: GenerateConfig) -> str:
    """Content key of a fine-tune's test outputs: adapter, test rows, generation settings, code version."""
    return content_key("outputs", adapter, test_fp, cfg.model_dump(), STAGE_VERSION)


def teacher_key(test_fp: str) -> str:
    """Content key of a dataset's own answers as outputs."""
    return content_key("teacher", test_fp, STAGE_VERSION)


@task(name="generate", task_run_name="generate-{model}-{dataset}", cache_policy=NO_CACHE)
def generate_task(
    model: str, dataset: str, model_dir: str, adapter_dir: str, test_path: str, cfg: GenerateConfig, key: str,
    store_root: str,
) -> tuple[str, bool]:
    """Prefect task: (store path of the outputs Parquet, whether it was already there). Arguments are JSON-able."""
    from tasks.data import load_examples

    store, rel = Store(store_root), f"outputs/{key}.parquet"
    if store.exists(rel):
        return rel, True
    store.write_parquet(rel, generate(model_dir, adapter_dir, dataset, load_examples(test_path), model, cfg))
    return rel, False
