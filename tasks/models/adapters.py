"""A candidate that is a PEFT adapter (a user's existing fine-tune): merged into its base once, cached in the store."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tasks.store.results import model_path
from tasks.store.store import Store


def merge_adapter(adapter_dir: Path, base_dir: Path, out_dir: Path, trust_remote_code: bool) -> None:
    """Fold the adapter into its base's weights (in the base's own dtype) and save model and tokenizer in `out_dir`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto", trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.save_pretrained(str(out_dir))
    # The adapter's own tokenizer when it brought one (new tokens, its chat template), else the base's.
    has_tok = any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    tok = AutoTokenizer.from_pretrained(str(adapter_dir if has_tok else base_dir), trust_remote_code=trust_remote_code)
    tok.save_pretrained(str(out_dir))


def ensure_merged_adapter(name: str, adapter_dir: Path, base_dir: Path, key: str, trust_remote_code: bool,
                          store: Store, log: Callable[[str], None] = print) -> Path:
    """The store folder of the adapter merged into its base, merging it on first use (one run merges, others wait)."""
    rel = model_path(key)
    _, reused = store.folder_once(rel, lambda tmp: merge_adapter(adapter_dir, base_dir, tmp, trust_remote_code))
    if not reused:
        log(f"candidate {name}: adapter {adapter_dir} merged into its base {base_dir}")
    return store.local_dir(rel)
