"""Loading a model: a Hugging Face folder onto the device, with its tokenizer and prompt format, and what it weighs.

Shared by training, generation, export and the zoo: none of them imports another stage to load a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tasks.compute.speeds import param_count
from tasks.config.schema import LoadOptions
from tasks.models.chat import PromptFormat, load_tokenizer, prompt_format


def device() -> torch.device:
    """CUDA when there is a GPU, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def base_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attn_implementations() -> list[str]:
    """Attention implementations to try, best first: flash-attention on CUDA when installed, SDPA, then eager.

    Not every model supports each (Gemma 2 refuses SDPA in transformers 5); load_base takes the first one the
    model accepts.
    """
    import importlib.util

    flash = device().type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return (["flash_attention_2"] if flash else []) + ["sdpa", "eager"]


def peak_memory_mb(dev: torch.device) -> dict[str, float]:
    """Peak memory so far: the process's resident set (whole life of the process), and CUDA's allocator peak."""
    import resource

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # Linux: KiB
    if dev.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return out


def model_params(config: Any) -> int:
    """The parameter count tasks/plan/jobs.py plans with, from a transformers config (the same formula on both sides)."""
    return param_count({k: getattr(config, k, None) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                             "num_key_value_heads", "head_dim", "intermediate_size",
                                                             "vocab_size")})


def load_base(model_dir: str | Path, load: LoadOptions | None = None) -> tuple[Any, Any, PromptFormat]:
    """(model, tokenizer, prompt format) of a Hugging Face folder on the training device (bf16 on CUDA, else fp32)."""
    from transformers import AutoModelForCausalLM

    load = load or LoadOptions()
    tok = load_tokenizer(model_dir, load)
    dtype = torch.bfloat16 if device().type == "cuda" else torch.float32
    for attn in attn_implementations():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=dtype, attn_implementation=attn, trust_remote_code=load.trust_remote_code)
            break
        except (ValueError, ImportError) as e:
            if attn == "eager" or "attention" not in str(e).lower():
                raise  # not a refused attention implementation, or nothing left to try
    return model.to(device()), tok, prompt_format(tok, model.generation_config.eos_token_id, str(model_dir))
