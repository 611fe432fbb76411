"""Where each candidate's weights are and what determines them: zoo models, hub ids, local folders and adapters.

The demo zoo is one kind of candidate among others, so this module sits above both tasks/models/ (folders,
signatures, hashes) and tasks/demo/ (the zoo's recipes). Importing it stays light: the zoo and the store are
imported where they are used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tasks.config.base import ZOO_PREFIX
from tasks.config.schema import Candidate
from tasks.core.errors import UserError
from tasks.models.fingerprint import (TOKENIZER_FILES, ModelInfo, adapter_base, check_folder,
                                      folder_fingerprint, folder_signature, hub_snapshot, local_or_hub,
                                      shape_signature)

if TYPE_CHECKING:
    from tasks.store.store import Store


def _zoo_signature() -> dict[str, Any]:
    """Signature shared by every zoo model (same shape, same tokenizer), known without building one."""
    from tasks.demo import zoo

    sig = shape_signature(zoo.SHAPE)
    return sig | {"model_type": "mistral", "vocab_size": zoo.VOCAB, "architectures": ["MistralForCausalLM"],
                  "vocabulary": f"zoo-{zoo.zoo_key('base')}", "added_tokens": {}}


def inspect_candidate(c: Candidate, others: list[Candidate] = ()) -> tuple[Path | None, dict[str, Any]]:
    """(local folder, or None for a zoo model; shape signature) of a checked candidate, reading no weights.

    A PEFT adapter folder (adapter_config.json) has its base's shape; `others` are the search's candidates, which
    the adapter's base may name.
    """
    if c.path.startswith(ZOO_PREFIX):
        from tasks.demo import zoo

        name = c.path.removeprefix(ZOO_PREFIX)
        if name not in zoo.ZOO:
            raise UserError(f"candidate '{c.name}': no zoo model '{name}' (zoo has: {', '.join(zoo.ZOO)})")
        return None, _zoo_signature()
    folder, hub = local_or_hub(c)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        if not any(folder.glob("adapter_model.*")):
            raise UserError(f"candidate '{c.name}': {folder} has adapter_config.json but no adapter_model weights")
        return folder, inspect_candidate(adapter_base(c, folder, list(others)), others)[1]
    check_folder(c.name, folder, weights=not hub)
    return folder, folder_signature(c.name, folder, c.trust_remote_code)


def tokenizer_folder(c: Candidate, folder: Path | None, others: list[Candidate] = ()) -> Path | None:
    """Where a checked candidate's tokenizer is: its folder, or for an adapter that brought none, its base's."""
    if folder is None or not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return folder
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        return folder
    base = adapter_base(c, folder, list(others))
    return tokenizer_folder(base, inspect_candidate(base, others)[0], others)


def candidate_fingerprint(c: Candidate, folder: Path | None, others: list[Candidate] = ()) -> str:
    """Content key of a checked candidate: zoo recipe, hub commit, or the hash of all of a local folder's bytes.

    An adapter's key is its base's and its own bytes'; a template override or remote-code opt-in is part of it too
    (the same weights trained in another format are another model), absent otherwise so older keys stay.
    """
    from tasks.store.keys import content_key

    if folder is None:
        from tasks.demo import zoo

        fp = zoo.zoo_key(c.path.removeprefix(ZOO_PREFIX))
    elif (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        base = adapter_base(c, folder, list(others))
        base_fp = candidate_fingerprint(base, inspect_candidate(base, others)[0], others)
        fp = content_key("adapter", base_fp, folder_fingerprint(folder))
    elif not Path(c.path).is_dir():
        fp = content_key("hub", c.path, folder.name)  # the snapshot folder is named by its commit
    else:
        fp = content_key("local", folder_fingerprint(folder))
    opts = {k: v for k, v in (("chat_template", c.chat_template), ("trust_remote_code", c.trust_remote_code)) if v}
    return content_key(fp, opts) if opts else fp


def describe(c: Candidate) -> ModelInfo:
    """Fingerprint and signature of a candidate, without loading weights."""
    folder, signature = inspect_candidate(c)
    return ModelInfo(c.name, candidate_fingerprint(c, folder), signature)


def materialize(c: Candidate, store: Store, log: Callable[[str], None] = print, others: list[Candidate] = ()) -> Path:
    """A local folder with the candidate's weights: zoo models built, hub weights downloaded, adapters merged in."""
    if c.path.startswith(ZOO_PREFIX):
        from tasks.demo import zoo

        return zoo.ensure_zoo_model(store, c.path.removeprefix(ZOO_PREFIX), log)
    folder = Path(c.path) if Path(c.path).is_dir() else hub_snapshot(c.path, weights=True)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        from tasks.models.adapters import ensure_merged_adapter

        base = adapter_base(c, folder, list(others))
        base_dir = materialize(base, store, log, others)
        return ensure_merged_adapter(c.name, folder, base_dir, candidate_fingerprint(c, folder, others),
                                     c.trust_remote_code, store, log)
    check_folder(c.name, folder)  # a hub snapshot's weights are checked once they are there
    return folder
