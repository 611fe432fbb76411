"""Measured speed, recorded in the store per stage and device, that the plan (tasks/plan/jobs.py) estimates GPU time with.

A rate is parameter-characters per second: characters of conversation processed x the model's parameter count
(param_count, the same formula where it is measured and where it is planned) / seconds of training or generation.
"""

from __future__ import annotations

import statistics
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from tasks.store.results import rates_path
from tasks.store.store import Store

# Parameter-characters per second when the store has no measurement for the device. CPU: measured by the demo on
# this project's 2-core development machine (bench/plan_accuracy.py: 48 s of training, 1.5 s of generation; a
# generation reads its prompt in one pass and writes short answers, so per character it is the faster stage).
# CUDA, not measured yet: 40% of a 400 TFLOP/s GPU at 6 FLOPs per parameter per training token, 4 characters a
# token: 0.4 * 4e14 / 6 * 4 = 1.1e14, assumed for generation too.
ASSUMED_RATE = {"finetune": {"cpu": 2.7e10, "cuda": 1.1e14}, "generate": {"cpu": 5.5e10, "cuda": 1.1e14}}
KEEP_MEASUREMENTS = 50  # newest measurements kept per stage and device


def conversation_chars(prompt: list[dict[str, str]], answer: str) -> int:
    """Characters of one conversation's messages and answer: what the rates count work in."""
    return sum(len(m["content"]) for m in prompt) + len(answer)


def param_count(sig: dict[str, Any]) -> int:
    """Parameters of a decoder-only transformer from its config fields (attention, MLP, untied embeddings)."""
    h, layers = sig.get("hidden_size") or 0, sig.get("num_hidden_layers") or 0
    heads = sig.get("num_attention_heads") or 1
    head_dim = sig.get("head_dim") or h // heads  # explicit where attention is not as wide as the stream (the zoo)
    q, kv = heads * head_dim, (sig.get("num_key_value_heads") or heads) * head_dim
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * (sig.get("intermediate_size") or 4 * h)
    return int(layers * per_layer + 2 * (sig.get("vocab_size") or 0) * h)


# Measurements kept back by `batched_rates` until its block ends: (store root, stage) -> device -> rates.
_HELD: dict[tuple[str, str], dict[str, list[float]]] = {}
_HOLDING = [0]  # how many batched_rates blocks are open in this process
_GUARD = threading.Lock()


def record_rate(store: Store, stage: str, device: str, chars: float, params: int, seconds: float) -> None:
    """Add one measurement (parameter-characters per second) to the store's rates for a stage and device (inside
    `batched_rates`, when its block ends)."""
    if seconds <= 0 or chars <= 0 or params <= 0:
        return
    rate = round(chars * params / seconds, 1)
    with _GUARD:
        if _HOLDING[0]:
            _HELD.setdefault((store.url, stage), {}).setdefault(device, []).append(rate)
            return
    _append(store, stage, {device: [rate]})


def _append(store: Store, stage: str, new: dict[str, list[float]]) -> None:
    """Add measurements to the store's rates of a stage, under the rates' lock (runs side by side append to it)."""
    rel = rates_path(stage)
    with store.lock(rel):
        rates = store.read_json(rel) if store.exists(rel) else {}
        for device, measured in new.items():
            rates[device] = [*rates.get(device, []), *measured][-KEEP_MEASUREMENTS:]
        store.write_json(rel, rates)


@contextmanager
def batched_rates() -> Iterator[None]:
    """Keep the rates measured in the block and write them when it ends, one read-modify-write per stage: a batch's
    jobs end seconds apart, and each write takes the rates' lock, which on a bucket is a lease (4 requests) and a
    wait of up to its poll (0.5 s) whenever another run holds it."""
    with _GUARD:
        _HOLDING[0] += 1
    try:
        yield
    finally:
        with _GUARD:
            _HOLDING[0] -= 1
            held = dict(_HELD) if not _HOLDING[0] else {}
            if held:
                _HELD.clear()
        for (root, stage), new in held.items():
            _append(Store(root), stage, new)


def measured_rate(store: Store, stage: str, device: str, assumptions: list[str]) -> float:
    """The median measured rate of a stage on a device, else the assumed one (said in `assumptions`)."""
    rel = rates_path(stage)
    measured = (store.read_json(rel) if store.exists(rel) else {}).get(device) or []
    if measured:
        return statistics.median(measured)
    rate = ASSUMED_RATE[stage][device]
    assumptions.append(f"{stage}: no {device} measurement in the store yet; assumed {rate:.2g} parameter-characters/s")
    return rate
