"""Runs in the vLLM environment (BASESEARCH_VLLM_PYTHON), never imported by the search: one base model's requests,
each with its LoRA adapter or none, answered by vLLM's offline engine in one batch.

    python vllm_run.py REQUEST.json RESULT.json

It imports only the standard library and vllm (that environment may have no pandas or pyarrow). The request holds
token ids, never text: the search's own chat formatting made them (tasks/generate/vllm_engine.py), so tokenization
cannot differ from the transformers engine's. The result holds, per request, the generated token ids (stop token
included when one ended the answer), vLLM's finish_reason, and per-request first and last token times from vLLM's
own request metrics (null where it reports none).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def _seconds(metrics: Any, attr: str, t0: float) -> float | None:
    """Seconds from the batch's start (monotonic) to one of vLLM's engine timestamps; None where it has none."""
    ts = getattr(metrics, attr, 0.0) if metrics is not None else 0.0
    return ts - t0 if ts and ts >= t0 else None


def _engine(req: dict[str, Any]) -> Any:
    """vLLM's offline engine for the request's base model, with room for every adapter at once."""
    from vllm import LLM

    lora = {"enable_lora": True, "max_loras": len(req["adapters"]), "max_lora_rank": req["max_lora_rank"]} \
        if req["adapters"] else {}
    return LLM(model=req["model"], dtype=req["dtype"], seed=0, trust_remote_code=req["trust_remote_code"],
               max_model_len=req["max_model_len"], disable_log_stats=False, **lora)


def run(req: dict[str, Any]) -> dict[str, Any]:
    """Answer every request in one generate call; the result as RESULT.json holds it."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    llm = _engine(req)
    loras = [LoRARequest(f"adapter-{i + 1}", i + 1, path) for i, path in enumerate(req["adapters"])]
    params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], stop_token_ids=req["stop_token_ids"],
                            detokenize=False)
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in req["requests"]]
    chosen = [loras[r["adapter"]] if r["adapter"] is not None else None for r in req["requests"]]
    t0 = time.monotonic()
    outs = llm.generate(prompts, params, lora_request=chosen if loras else None, use_tqdm=False)
    batch_s = time.monotonic() - t0
    rows = []
    for out in outs:
        done = out.outputs[0]
        rows.append({"token_ids": list(done.token_ids), "finish_reason": done.finish_reason,
                     "ttft_s": _seconds(out.metrics, "first_token_ts", t0),
                     "latency_s": _seconds(out.metrics, "last_token_ts", t0)})
    try:
        from vllm.platforms import current_platform
        device = str(current_platform.device_type or "cpu")
    except Exception:  # noqa: BLE001 - an older vLLM: the device is a label only
        device = "cuda" if os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("", "-1") else "cpu"
    import vllm

    return {"version": getattr(vllm, "__version__", "unknown"), "device": device, "batch_s": batch_s, "rows": rows}


if __name__ == "__main__":
    request_path, result_path = sys.argv[1], sys.argv[2]
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    result = run(request)
    tmp = result_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, result_path)
