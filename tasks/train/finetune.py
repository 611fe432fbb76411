"""The fine-tuning stage: a LoRA adapter (peft) of one model on one dataset, at the settings its search chose."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.compute.speeds import conversation_chars, record_rate
from tasks.compute.workers import in_worker
from tasks.config.schema import LoadOptions
from tasks.data.devsplit import row_position
from tasks.models.loading import base_of, load_base, model_params
from tasks.store.guards import say
from tasks.store.results import adapter_path
from tasks.store.store import Store
from tasks.train.checkpoint import Checkpoints, train_to
from tasks.train.loop import Trainer, training_mode, training_rows
from tasks.train.settings_search import search_settings

if TYPE_CHECKING:
    from tasks.config.stages import FinetuneConfig
    from tasks.data.load import Example


# What opening a remote store reads from the environment: s3fs/botocore, gcsfs, fsspec's own options, basesearch's.
STORE_ENV = ("AWS_", "GOOGLE_", "AZURE_", "FSSPEC_", "BASESEARCH_")


def finetune(model_dir: str | Path, train: list[Example], cfg: FinetuneConfig, out_dir: Path,
             load: LoadOptions | None = None, dev: list[Example] | None = None,
             checkpoints: tuple[str, str, str, dict[str, str]] | None = None,
             ) -> dict[str, Any]:
    """Train a LoRA adapter of `model_dir` on `train`, save it (and train_metrics.json) in `out_dir`.

    With finetune.search on, the learning rate and epochs are first searched on `dev` (the development rows), each
    rate trained on `train` less those rows; the adapter then trains on all of `train` with the chosen ones (with
    `dev` empty, at the configured ones). With `checkpoints` (store root, adapter key, what to call the fine-tune in
    the log, the store's environment) the training state is saved to the store as it goes
    (tasks/train/checkpoint.py), and a fine-tune started again goes on from the last save.
    """
    from peft import LoraConfig, get_peft_model

    if cfg.search.enabled and dev is None:
        raise ValueError("finetune.search needs development rows (dev=...); or set finetune.search.enabled false")
    torch.manual_seed(cfg.seed)
    model, tok, fmt = load_base(model_dir, load)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    params = model_params(base_of(model).config)
    rows, left_out = training_rows(tok, fmt, train, cfg.max_length)
    lr, steps, search = cfg.lr_for(params), cfg.steps_for(len(rows)), None
    if checkpoints:  # a worker process started before this search sees the store's credentials and cache as it does
        os.environ.update(checkpoints[3])
    ckpt = Checkpoints(checkpoints[0], checkpoints[1], cfg, checkpoints[2]) if checkpoints else None
    resumed = ckpt.latest() if ckpt is not None and ckpt.enabled else None
    with training_mode(model, rows, cfg.packing, cfg.gradient_checkpointing) as packed:
        if resumed is not None:  # the settings the killed run chose: no search again
            lr, steps, search = resumed["plan"]["lr"], resumed["plan"]["steps"], resumed["plan"]["search"]
        elif cfg.search.enabled and dev:  # none: a dataset too small to split (the check warned), fixed settings
            seen = {row_position(ex) for ex in dev}  # a row's content hash: the development rows leave the fit rows
            fit, _ = training_rows(tok, fmt, [ex for ex in train if row_position(ex) not in seen], cfg.max_length)
            dev_rows, _ = training_rows(tok, fmt, dev, cfg.max_length)
            epochs = None if cfg.max_steps else cfg.epochs_for(len(rows))  # the fine-tune's, so a share maps to it
            search = search_settings(model, fit, dev_rows, cfg, params, tok.pad_token_id, packed, epochs)
            lr, steps = search["learning_rate"], max(1, round(search["share"] * steps))
        trainer = Trainer(model, rows, lr=lr, steps=steps, batch_size=cfg.batch_size, seed=cfg.seed,
                          pad_id=tok.pad_token_id, packing=packed, checkpointing=cfg.gradient_checkpointing)
        plan = {"lr": lr, "steps": steps, "search": search}
        if resumed is not None:
            trainer.load_state_dict(resumed["trainer"])
            say(logging.INFO, f"{ckpt.what}: resumed from the checkpoint at step {trainer.done} of {steps}")
        elif ckpt is not None and search is not None and ckpt.enabled:
            ckpt.save(trainer, plan)  # step 0, after the search: a resumed run does not search again
        train_to(trainer, steps, ckpt, plan)
    metrics = trainer.metrics()
    metrics["learning_rate"] = lr
    metrics["epochs"] = round(steps * cfg.batch_size / len(rows), 2)
    if search is not None:
        metrics["search"] = search
    metrics["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics["rows_left_out"] = left_out  # longer than max_length (named at the check)
    # What the plan's estimates are measured in (tasks/plan/jobs.py): characters trained on, and parameters; the
    # search's steps count too, so that its rate stays the plan's unit.
    chars = sum(conversation_chars(ex.prompt, ex.answer) for ex in train) / len(train)
    metrics["chars"] = round((steps + (search["steps_trained"] if search else 0)) * cfg.batch_size * chars)
    metrics["plan_params"] = params
    metrics["plan_seconds"] = round(metrics["seconds"] + (search["seconds"] if search else 0.0), 3)
    metrics["attn_implementation"] = base_of(model).config._attn_implementation
    model.save_pretrained(str(out_dir))
    (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


@task(name="finetune", task_run_name="finetune-{model}-{dataset}", cache_policy=NO_CACHE)
def finetune_task(
    model: str, dataset: str, model_dir: str, train_path: str, cfg: FinetuneConfig, key: str, store_root: str,
    load: LoadOptions | None = None, dev_from: str = "", dev_share: float = 0.0,
) -> tuple[str, bool]:
    """Prefect task: (local adapter folder, whether it was already in the store). Arguments are JSON-able; the
    development rows are the share `dev_share` of the training file `dev_from` (the dataset's own, before any
    split), as the merge loop's."""
    from tasks.data.devsplit import split_rows
    from tasks.data.load import load_examples

    store, rel = Store(store_root), adapter_path(key)
    dev = split_rows(load_examples(dev_from), dev_share)[1] if cfg.search.enabled else None
    what = f"fine-tune of {model} on {dataset}"
    m, reused = store.folder_once(rel, lambda tmp: in_worker(  # a worker process when fine-tunes run side by side
        finetune, model_dir, load_examples(train_path), cfg, tmp, load, dev, (store_root, key, what, store_env()),
        what=what))
    Checkpoints(store_root, key, cfg, what).clear()  # the adapter is whole in the store: its checkpoints are spent
    if reused:  # in the store, or made by another run this one waited for
        return str(store.local_dir(rel)), True
    record_rate(store, "finetune", m["device"], m["chars"], m["plan_params"], m["plan_seconds"])
    say(logging.INFO,
        f"finetune {model} on {dataset}: {settings_line(m)}loss {m['loss_first']} -> {m['loss_last']}, "
        f"{m['steps']} steps, "
        f"{m['tokens_per_s']:.0f} tokens/s, peak memory {m['peak_rss_mb']:.0f} MB resident"
        + (f", {m['peak_gpu_mb']:.0f} MB GPU" if "peak_gpu_mb" in m else "")
        + (f"; {m['rows_left_out']} rows longer than max_length left out" if m.get("rows_left_out") else "")
    )
    return str(store.local_dir(rel)), False


def store_env() -> dict[str, str]:
    """The environment a store is opened with (credentials, endpoint, cache), for a worker process to use the same."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORE_ENV)}


def settings_line(m: dict[str, Any]) -> str:
    """What the settings search chose, for the log: '' without one."""
    s = m.get("search")
    if not s:
        return ""
    tried = ", ".join(f"{lr:.2g}" for lr in s["learning_rates"])
    return (f"learning rate {s['learning_rate']:.2g} (of {tried}), {m['epochs']:g} epochs (development loss "
            f"{s['first_dev_loss']} -> {s['best_dev_loss']}, {s['dev_rows']} rows); ")
