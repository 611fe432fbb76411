"""Outputs: every fine-tune answers its test rows (batched greedy generation); the teacher's answers are read as-is."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.compute.speeds import conversation_chars, record_rate
from tasks.config.schema import LoadOptions
from tasks.core import progress
from tasks.generate.columns import GENERATED_COLUMNS, OUTPUT_COLUMNS, TIMING_COLUMNS  # noqa: F401  (found here too)
from tasks.models.chat import PromptFormat, prompt_ids, strip_stop
from tasks.models.loading import device, load_base, model_params, peak_memory_mb
from tasks.store.guards import say
from tasks.store.results import outputs_path
from tasks.store.store import Store

if TYPE_CHECKING:
    from tasks.config.stages import GenerateConfig
    from tasks.data.load import Example

# Base models kept loaded between generate calls, by resolved folder: every fine-tune of one base answers its
# test rows on the same loaded weights (adapters merged in, then the weights restored bit for bit).
_BASES: OrderedDict[str, tuple[Any, Any, PromptFormat]] = OrderedDict()
CACHE_SHARE = 0.4  # at most this share of the device's memory (CPU: RAM) holds cached base models


class _TokenClock:
    """A stopping criterion that stops nothing: it notes when each decoding step of a batch produced its tokens."""

    def __init__(self) -> None:
        """No step yet."""
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        """Note the time of this step; never stop a row (the stop tokens do that)."""
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def teacher_outputs(dataset: str, examples: list[Example], contender: str) -> pd.DataFrame:
    """The dataset's own assistant answers as a contender's outputs (no model, no cost)."""
    return pd.DataFrame({
        "dataset": dataset, "example_id": [e.id for e in examples], "contender": contender,
        "output": [e.answer for e in examples], "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0,
        "error": None,
    })[OUTPUT_COLUMNS]


def _param_bytes(model: Any) -> int:
    """Bytes of a model's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _cache_budget() -> int:
    """Bytes the base-model cache may hold on the current device."""
    if device().type == "cuda":
        return int(CACHE_SHARE * torch.cuda.get_device_properties(device()).total_memory)
    import os

    return int(CACHE_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _cache_key(model_dir: str | Path, load: LoadOptions | None) -> str:
    """The cache's key: the resolved folder, and the template it is loaded with when not its own."""
    return f"{Path(model_dir).resolve()}\0{(load or LoadOptions()).model_dump_json()}"


def cached_base(model_dir: str | Path, load: LoadOptions | None = None) -> tuple[Any, Any, PromptFormat]:
    """(model, tokenizer, prompt format) of a base model, loaded once and reused while the memory budget allows."""
    key = _cache_key(model_dir, load)
    if key in _BASES:
        _BASES.move_to_end(key)
        return _BASES[key]
    model, tok, fmt = load_base(model_dir, load)
    model.eval()
    size, budget = _param_bytes(model), _cache_budget()
    while _BASES and sum(_param_bytes(m) for m, _, _ in _BASES.values()) + size > budget:
        _BASES.popitem(last=False)  # least recently used goes first
    if size <= budget:
        _BASES[key] = (model, tok, fmt)
    return model, tok, fmt


def clear_base_cache() -> None:
    """Drop every cached base model (and the GPU memory it held)."""
    _BASES.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def merged_adapter(model: Any, adapter_dir: str | Path) -> Iterator[Any]:
    """`model` with the LoRA adapter folded into its weights; on exit the original weights come back exactly.

    Folding makes each decoding step one matmul per layer, not three. The weights the merge changes are copied
    first (on the same device when there is room, else on the CPU) and copied back afterwards, so the cached base
    is bit-for-bit the loaded one for the next adapter (subtracting the update again would not be exact).
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    if getattr(peft_model.peft_config["default"], "modules_to_save", None):
        raise ValueError("adapters with modules_to_save are not supported by the base-model cache")
    layers = {n: m.get_base_layer() for n, m in peft_model.base_model.model.named_modules()
              if isinstance(m, BaseTunerLayer)}
    need = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers.values())
    room = device().type != "cuda" or torch.cuda.mem_get_info()[0] > 2 * need
    saved = {n: layer.weight.detach().to("cpu" if not room else layer.weight.device, copy=True)
             for n, layer in layers.items()}
    merged = peft_model.merge_and_unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(merged, attr) and attr not in type(merged).__dict__:
            try:
                delattr(merged, attr)
            except AttributeError:
                pass
    try:
        yield merged
    finally:
        modules = dict(merged.named_modules())
        with torch.no_grad():
            for n, w in saved.items():
                modules[n].weight.copy_(w)


def generate(
    model_dir: str | Path, adapter_dir: str | Path, dataset: str, examples: list[Example], contender: str,
    cfg: GenerateConfig, load: LoadOptions | None = None,
) -> pd.DataFrame:
    """Greedy answers of base + LoRA adapter (none: `adapter_dir` empty) on `examples`, in length-sorted,
    left-padded batches."""
    from tasks.compute.workers import threads_for, torch_threads

    base, tok, fmt = cached_base(model_dir, load)
    try:
        threads = threads_for(base.num_parameters())
        # no adapter: the untuned base answering zero-shot (a floor, tasks/generate/floors.py)
        adapter = merged_adapter(base, adapter_dir) if adapter_dir else contextlib.nullcontext(base)
        with adapter as model, torch_threads(threads):
            return generate_loaded(model, tok, fmt, dataset, examples, contender, cfg)
    except BaseException:
        _BASES.pop(_cache_key(model_dir, load), None)  # a failed merge may have left the weights changed
        raise


def generate_loaded(model: Any, tok: Any, fmt: PromptFormat, dataset: str, examples: list[Example], contender: str,
              cfg: GenerateConfig) -> pd.DataFrame:
    """generate's batches on a loaded, adapter-merged model (the export's check calls it on the exported folder);
    each answer ends at the model's first stop token."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    tok.padding_side = "left"  # left padding: every row's last prompt token sits at the same position
    encoded = [prompt_ids(tok, fmt, e.prompt) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i]))
    rows: dict[int, dict] = {}
    dev = next(model.parameters()).device
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(dev)
        clock = _TokenClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **batch, max_new_tokens=cfg.max_new_tokens, do_sample=False, eos_token_id=list(fmt.stop_ids),
                pad_token_id=tok.pad_token_id, use_cache=True, stopping_criteria=[clock],
            )
        if dev.type == "cuda":
            torch.cuda.synchronize()  # the last step's kernels are done: the batch's time is its real time
        batch_s = time.perf_counter() - t0
        progress.tick(len(idx))
        new = out[:, batch["input_ids"].shape[1] :]
        answers = [strip_stop(new[row].tolist(), fmt) for row in range(len(idx))]
        # A row's tokens: its answer, plus the stop token that ended it (generated too, then stripped).
        steps = [len(ids) + (finish == "stop") for ids, finish in answers]
        times = [t - t0 for t in clock.times] or [batch_s]  # seconds from the batch's start to each step's tokens
        at = [times[min(max(n, 1), len(times)) - 1] for n in steps]  # each row's last token
        timing = {"ttft_s": times[0], "batch_size": len(idx), "batch_s": batch_s,
                  "tokens_per_s": sum(steps) / batch_s if batch_s > 0 else 0.0, "device": dev.type}
        for row, i in enumerate(idx):
            ids, finish = answers[row]
            rows[i] = {"output": tok.decode(ids, skip_special_tokens=True).strip(), "prompt_tokens": len(encoded[i]),
                       "completion_tokens": len(ids), "latency_s": at[row], "finish_reason": finish, **timing}
    df = pd.DataFrame([
        {"dataset": dataset, "example_id": e.id, "contender": contender, **rows[i], "error": None}
        for i, e in enumerate(examples)
    ])[GENERATED_COLUMNS]
    df.attrs["peak_memory"] = peak_memory_mb(dev)  # not a column: the outputs columns stay as docs/architecture.md lists them
    # What the plan's estimates are measured in (tasks/plan/jobs.py): characters read and written, batch seconds.
    chars = sum(conversation_chars(e.prompt, rows[i]["output"]) for i, e in enumerate(examples))
    df.attrs["rate"] = (dev.type, chars, model_params(model.config), float((df["batch_s"] / df["batch_size"]).sum()))
    return df


def finish_reasons(df: pd.DataFrame, max_new_tokens: int) -> pd.Series:
    """Each output's finish_reason; for outputs stored before the column existed, `length` when it used every token."""
    if "finish_reason" in df.columns:
        return df["finish_reason"]
    return (df["completion_tokens"] >= max_new_tokens).map({True: "length", False: "stop"})


@task(name="generate", task_run_name="generate-{model}-{dataset}", cache_policy=NO_CACHE)
def generate_task(
    model: str, dataset: str, model_dir: str, adapter_dir: str, test_path: str, cfg: GenerateConfig, key: str,
    store_root: str, load: LoadOptions | None = None,
) -> tuple[str, bool]:
    """Prefect task: (store path of the outputs Parquet, whether it was already there). Arguments are JSON-able."""
    from tasks.data.load import load_examples

    store, rel = Store(store_root), outputs_path(key)

    def answer() -> pd.DataFrame:
        """The fine-tune's answers, written to the store."""
        if cfg.engine == "vllm":  # a pool's stage run: this one job in a vLLM batch of its own
            from tasks.generate.job import GenerateJob
            from tasks.generate.vllm_engine import check_engine, vllm_outputs

            job = GenerateJob(model, dataset, model_dir, adapter_dir, test_path, cfg, key, load or LoadOptions())
            df = vllm_outputs([job], check_engine(cfg))[key]
        else:
            df = generate(model_dir, adapter_dir, dataset, load_examples(test_path), model, cfg, load)
        store.write_parquet(rel, df)
        return df

    df, reused = store.compute_once(rel, answer)
    if reused:  # in the store, or made by another run this one waited for
        return rel, True
    note_generated(store, model, dataset, df)
    return rel, False


def note_generated(store: Store, model: str, dataset: str, df: pd.DataFrame) -> None:
    """Record new outputs' generation rate (the plan's estimates) and log their tokens, cuts and peak memory."""
    record_rate(store, "generate", *df.attrs["rate"])
    mem = df.attrs.get("peak_memory", {})
    say(logging.INFO,
        f"generate {model} on {dataset}: {int(df['completion_tokens'].sum())} tokens, "
        f"{int((df['finish_reason'] == 'length').sum())} of {len(df)} cut at max_new_tokens"
        + (", peak memory " if mem else "")
        + ", ".join(f"{k.removeprefix('peak_').removesuffix('_mb')} {v:.0f} MB" for k, v in mem.items())
    )
