"""The dry-run's prompt-format check with 12 local candidates sharing one tokenizer, 3 datasets of 6,000 rows each.

    python bench/format_check.py [--candidates 12] [--train 5000] [--test 1000] [--no-baseline]

Builds 12 tiny Mistral folders with the zoo's tokenizer (as tests/conftest.py's make_tiny_model does: the fine-tunes
of one family) and the demo's extraction, summarization and orders splits, then times in one process, CPU seconds
(user + system, all threads) and wall:
- the check keyed by content (tasks.models.format_check.check_formats): one render per row per distinct format;
- the baseline, the check as it was: every candidate's folder loaded and every row rendered with it;
- prepare() (the whole dry-run check: rows, leaks, folders, formats, fingerprints) with each of them.
Template renders (a row's prompt and its full conversation: 2 per row and format) are counted by wrapping
tasks.models.chat.render; the target is prepare() under 10 CPU s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # save_pretrained's shard bars, 12 times
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import header, table  # noqa: E402
from tasks.models import format_check as fc  # noqa: E402

TASKS = ("extraction", "summarization", "orders")  # the demo tasks with 6,000 distinct prompts
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)


def cpu_s() -> float:
    """CPU seconds (user + system, every thread) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build(root: Path, n_candidates: int, n_train: int, n_test: int) -> dict[str, Any]:
    """Tiny model folders sharing one tokenizer, the datasets' JSONL files, and the search config over them."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from tasks.demo.data import make_split
    from tasks.demo.zoo import build_tokenizer

    tok = build_tokenizer()
    cands = []
    for n in range(n_candidates):
        folder = root / f"finetune-{n:02d}"
        torch.manual_seed(n)
        cfg = MistralConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, tie_word_embeddings=False, sliding_window=None, **TINY)
        MistralForCausalLM(cfg).save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        cands.append({"name": folder.name, "path": str(folder)})
    datasets = []
    for task in TASKS:
        paths = []
        for split, rows in zip(("train", "test"), make_split(task, n_train, n_test)):
            paths.append(root / f"{task}_{split}.jsonl")
            paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        datasets.append({"name": task, "train": str(paths[0]), "test": str(paths[1])})
    return {"name": "formats", "candidates": cands, "datasets": datasets, "finetune": {"max_length": 512}}


def per_folder(cfg: Any, folders: dict[str, Path | None], rows: fc.Rows) -> tuple[dict, list[str], str]:
    """The baseline, the check as it was before content keys: every candidate's folder loaded, and every row of
    every dataset put through encode_row with its tokenizer (renders were shared only by candidates naming the very
    same folder); a training row over finetune.max_length counted as there."""
    from tasks.models.chat import encode_row, generation_eos, install_template, prompt_format

    loads, long = {}, 0
    for i, c in enumerate(cfg.candidates):
        folder = folders[c.name]
        tok = fc._load(c, folder)
        own = tok.chat_template if isinstance(tok.chat_template, str) else None
        load, source = fc.load_options(c, own, cfg, f"candidates[{i}] ({c.name})")
        fmt = prompt_format(install_template(tok, load.chat_template), generation_eos(folder), c.name)
        loads[c.name] = load, f"{source}; {fmt.describe()}"
        for _, train, test in rows.values():
            for examples in (train, test):
                for ex in examples:
                    ids, _ = encode_row(tok, fmt, ex.prompt, ex.answer)
                    long += examples is train and len(ids) > cfg.finetune.max_length
    return loads, [], f"per folder: {len(cfg.candidates)} formats, {long} long training rows"


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(CPU s, wall s, result) of one call."""
    c0, w0 = cpu_s(), time.perf_counter()
    out = fn()
    return cpu_s() - c0, time.perf_counter() - w0, out


def main() -> None:
    """Build the folders and datasets, time both checks alone and inside prepare(), print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--train", type=int, default=5000, help="training rows per dataset")
    ap.add_argument("--test", type=int, default=1000, help="test rows per dataset")
    ap.add_argument("--no-baseline", action="store_true", help="skip the per-folder check (~45 CPU s at full size)")
    args = ap.parse_args()

    import transformers  # noqa: F401 - imported before any timing: its import is no part of either check

    from tasks.candidates.resolve import inspect_candidate, tokenizer_folder
    from tasks.config.schema import SearchConfig
    from tasks.models import chat
    from tasks.plan.prepare import _checked_rows, prepare

    renders = [0]
    render = chat.render

    def counted(*a: Any, **k: Any) -> Any:
        """A template render (prompt or full conversation), counted."""
        renders[0] += 1
        return render(*a, **k)

    chat.render = fc.render = counted  # encode_row's (looked up in chat at each call) and the check's own
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as tmp:
        t0 = time.perf_counter()
        cfg = SearchConfig.model_validate(build(Path(tmp), args.candidates, args.train, args.test))
        built = time.perf_counter() - t0
        rows = {d.name: (d, *_checked_rows(d, cfg.finetune)) for d in cfg.datasets}
        sources = cfg.candidates + cfg.ingredients
        folders = {c.name: tokenizer_folder(c, inspect_candidate(c, sources)[0], sources) for c in sources}
        checks = [("content keys (check_formats)", fc.check_formats)]
        checks += [] if args.no_baseline else [("per folder (baseline, as before)", per_folder)]
        fc.check_formats(cfg, folders, {})  # the tokenizer's first load warms transformers' caches for both
        out, lines, n_rows = [], [], sum(len(tr) + len(te) for _, tr, te in rows.values())
        for name, check in checks:
            renders[0] = 0
            cpu, wall, (_, _, note) = timed(lambda check=check: check(cfg, folders, rows))
            out.append({"run": f"format check alone: {name}", "template renders": f"{renders[0]:,}", "CPU s": f"{cpu:.2f}",
                        "wall s": f"{wall:.2f}"})
            lines.append(note)
        original, preps = fc.check_formats, []
        for name, check in checks:
            fc.check_formats = check  # prepare() imports it from the module when it runs
            renders[0] = 0
            cpu, wall, prep = timed(lambda: prepare(cfg))
            preps.append(prep)
            out.append({"run": f"prepare() with {name}", "template renders": f"{renders[0]:,}", "CPU s": f"{cpu:.2f}",
                        "wall s": f"{wall:.2f}"})
        fc.check_formats = original
    print(header())
    print(f"{args.candidates} local candidates with one tokenizer (built in {built:.1f} s), {len(TASKS)} datasets x "
          f"({args.train:,} train + {args.test:,} test) rows = {n_rows:,} rows")
    print(table(out, ["run", "template renders", "CPU s", "wall s"]))
    for line in lines:
        print(line)
    if len(checks) == 2:
        alone = [float(r["CPU s"]) for r in out[:2]]
        whole = [float(r["CPU s"]) for r in out[2:]]
        print(f"CPU ratio (baseline / content keys): format check {alone[1] / alone[0]:.1f}x, prepare() "
              f"{whole[1] / whole[0]:.1f}x; target: prepare() under 10 CPU s")
    print(f"prepare() with content keys: {len(preps[0].warnings)} warnings; notes: {preps[0].notes}")


if __name__ == "__main__":
    main()
