"""generate.engine: vllm: the fine-tunes' test answers from vLLM's offline engine, every adapter of one base (and the
base itself, untuned) in one multi-LoRA batch, in a process of the environment BASESEARCH_VLLM_PYTHON names.

vLLM cannot be imported here (it pins its own transformers), so the exchange is two JSON files and a script that
imports only the standard library and vllm (tasks/generate/vllm_run.py). What goes in is what the transformers
engine feeds its model: the prompt token ids our own chat formatting makes (tasks/models/chat.py prompt_ids), the
stop ids, greedy decoding, generate.max_new_tokens, the search's dtype (float32 on CPU, bfloat16 on CUDA), so
tokenization cannot differ; what comes back is token ids, decoded here as the transformers engine decodes them. Each
(adapter, dataset) result is then written under its own outputs key through the store's compute_once, so a re-run
reuses and resumes exactly as with hf. tests/test_generate_vllm.py holds both engines' outputs equal in float32.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from tasks.core.errors import EnvironmentFailure
from tasks.generate.job import GenerateJob

if TYPE_CHECKING:
    from tasks.config.stages import GenerateConfig

SCRIPT = Path(__file__).with_name("vllm_run.py")
KV_CACHE_GIB = 2  # VLLM_CPU_KVCACHE_SPACE when unset: vLLM's CPU backend otherwise reserves a large share of memory
WHAT = "generate.engine: vllm"


def check_engine(cfg: GenerateConfig) -> str:
    """The vLLM environment's python when generate.engine is vllm ('' for hf); a one-line UserError, before any model
    loads, when BASESEARCH_VLLM_PYTHON is unset or has no vLLM."""
    if cfg.engine != "vllm":
        return ""
    from tasks.compute.vllm_env import vllm_python

    return vllm_python(WHAT)["python"]


def engine_line(gen: GenerateConfig) -> str:
    """The plan's line on what generates (generate.engine)."""
    return ("generate: vLLM's offline engine (generate.engine: vllm), every adapter of one base in one multi-LoRA "
            "batch, in BASESEARCH_VLLM_PYTHON's environment" if gen.engine == "vllm" else
            f"generate: transformers (generate.engine: hf), {gen.batch_size} rows a batch")


def by_base(jobs: list[GenerateJob]) -> list[list[GenerateJob]]:
    """The jobs grouped by base model (its folder and load options), in the order each base first appears."""
    groups: dict[tuple[str, str], list[GenerateJob]] = {}
    for job in jobs:
        groups.setdefault((str(Path(job.model_dir).resolve()), job.load.model_dump_json()), []).append(job)
    return list(groups.values())


def _adapter_rank(adapter_dir: str) -> int:
    """An adapter's LoRA rank (adapter_config.json r)."""
    return int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"])


def _request(jobs: list[GenerateJob], encoded: list[list[list[int]]], stops: list[int], limit: int | None,
             ) -> dict[str, Any]:
    """vllm_run.py's request: the base, its adapters, every row's prompt ids with its adapter's index (None: none);
    `limit` is the model's context (max_position_embeddings)."""
    from tasks.compute.vllm_env import lora_rank
    from tasks.models.loading import device

    job, adapters = jobs[0], list(dict.fromkeys(j.adapter_dir for j in jobs if j.adapter_dir))
    longest = max((len(ids) for rows in encoded for ids in rows), default=1) + job.cfg.max_new_tokens
    requests = [{"prompt_token_ids": ids, "adapter": adapters.index(j.adapter_dir) if j.adapter_dir else None}
                for j, rows in zip(jobs, encoded) for ids in rows]
    return {"model": job.model_dir, "adapters": adapters, "requests": requests, "stop_token_ids": stops,
            "max_tokens": job.cfg.max_new_tokens, "dtype": "bfloat16" if device().type == "cuda" else "float32",
            "max_lora_rank": lora_rank(max((_adapter_rank(a) for a in adapters), default=8)),
            "max_model_len": min(longest, limit) if limit else longest,
            "trust_remote_code": job.load.trust_remote_code}


def run_vllm(python: str, request: dict[str, Any]) -> dict[str, Any]:
    """vllm_run.py's result for a request, run by `python` in a process of its own; EnvironmentFailure naming the last
    error of its log when it fails."""
    env = os.environ.copy()
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
    with tempfile.TemporaryDirectory(prefix="basesearch-vllm-") as tmp:
        src, dst, log = Path(tmp, "request.json"), Path(tmp, "result.json"), Path(tmp, "vllm.log")
        src.write_text(json.dumps(request))
        with log.open("wb") as out:
            # run from the temporary folder: the project's own packages (tasks/, tests/) must not shadow vLLM's
            proc = subprocess.run([python, str(SCRIPT), str(src), str(dst)], stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env, cwd=tmp, check=False)
        if proc.returncode != 0 or not dst.is_file():
            from tasks.compute.vllm_env import log_tail

            raise EnvironmentFailure(f"{WHAT}: vLLM exited ({proc.returncode}) on {request['model']}: "
                                     f"{log_tail(log)}")
        return json.loads(dst.read_text())


def vllm_outputs(jobs: list[GenerateJob], python: str) -> dict[str, pd.DataFrame]:
    """Outputs key -> the outputs of each job, all of one base, answered in one vLLM batch."""
    from transformers import AutoConfig

    from tasks.data.load import load_examples
    from tasks.models.chat import generation_eos, load_tokenizer, prompt_format, prompt_ids
    from tasks.models.loading import model_params

    job = jobs[0]
    tok = load_tokenizer(job.model_dir, job.load)
    config = AutoConfig.from_pretrained(job.model_dir, trust_remote_code=job.load.trust_remote_code)
    # the stops the hf engine's loaded model has: its generation_config.json's eos, else its config's
    fmt = prompt_format(tok, generation_eos(job.model_dir) or config.eos_token_id, str(job.model_dir))
    examples = [load_examples(j.test_path) for j in jobs]
    encoded = [[prompt_ids(tok, fmt, e.prompt) for e in rows] for rows in examples]
    request = _request(jobs, encoded, list(fmt.stop_ids), getattr(config, "max_position_embeddings", None))
    result = run_vllm(python, request)
    rows, frames = iter(result["rows"]), {}
    for j, exs, ids in zip(jobs, examples, encoded):
        frames[j.key] = outputs_frame(j, exs, ids, [next(rows) for _ in exs], result, tok, fmt)
        frames[j.key].attrs["rate"] = (result["device"], frames[j.key].attrs.pop("chars"), model_params(config),
                                       float(result["batch_s"]) * len(exs) / max(len(result["rows"]), 1))
    return frames


def outputs_frame(job: GenerateJob, examples: list[Any], encoded: list[list[int]], rows: list[dict[str, Any]],
                  result: dict[str, Any], tok: Any, fmt: Any) -> pd.DataFrame:
    """One job's outputs in the hf engine's columns: the batch is the whole vLLM call (batch_s, batch_size,
    tokens_per_s), the row's latency and first token from vLLM's request metrics (the batch's time where absent)."""
    from tasks.compute.speeds import conversation_chars
    from tasks.generate.columns import GENERATED_COLUMNS
    from tasks.models.chat import strip_stop

    batch_s, size = float(result["batch_s"]), len(result["rows"])
    tokens = sum(len(r["token_ids"]) for r in result["rows"])
    timing = {"batch_size": size, "batch_s": batch_s, "tokens_per_s": tokens / batch_s if batch_s > 0 else 0.0,
              "device": result["device"]}
    out = []
    for e, ids, r in zip(examples, encoded, rows):
        answer, _ = strip_stop(r["token_ids"], fmt)
        finish = "stop" if r["finish_reason"] == "stop" else "length"
        out.append({"dataset": job.dataset, "example_id": e.id, "contender": job.model,
                    "output": tok.decode(answer, skip_special_tokens=True).strip(), "prompt_tokens": len(ids),
                    "completion_tokens": len(answer), "latency_s": _or(r["latency_s"], batch_s), "error": None,
                    "finish_reason": finish, "ttft_s": _or(r["ttft_s"], batch_s), **timing})
    df = pd.DataFrame(out)[GENERATED_COLUMNS]
    df.attrs["chars"] = sum(conversation_chars(e.prompt, o) for e, o in zip(examples, df["output"]))
    return df


def _or(value: float | None, fallback: float) -> float:
    """A per-request time vLLM reported, else the batch-level one."""
    return float(value) if value is not None else fallback


def generate_group(jobs: list[GenerateJob], store_root: str, python: str,
                   done: Callable[[GenerateJob, pd.DataFrame | None], None]) -> list[tuple[str, bool]]:
    """(outputs path, reused?) of jobs of one base: those the store lacks answered in one vLLM batch, then each
    written under its own key through compute_once (a result another run made meanwhile is reused, not rewritten);
    `done` hears of each job with its new outputs (None: reused)."""
    from tasks.store.results import outputs_path
    from tasks.store.store import Store

    store = Store(store_root)
    todo = [j for j in jobs if not store.exists(outputs_path(j.key))]
    frames = vllm_outputs(todo, python) if todo else {}
    results = []
    for job in jobs:
        rel = outputs_path(job.key)

        def write(job: GenerateJob = job, rel: str = rel) -> pd.DataFrame:
            """This job's outputs from the batch (answered alone when the store lost it since), written."""
            df = frames[job.key] if job.key in frames else vllm_outputs([job], python)[job.key]
            store.write_parquet(rel, df)
            return df

        df, reused = store.compute_once(rel, write)
        done(job, None if reused else df)
        results.append((rel, reused))
    return results
