"""Candidates: where each model's weights are, what determines them (fingerprint), and what shape they have.

Fingerprints and signatures are read from small files (config.json, tokenizer.json, the hub's commit id),
never from the weights, so that every candidate is checked before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import zoo
from tasks.config import ZOO_PREFIX, Candidate
from tasks.errors import UserError
from tasks.store import Store, content_key

# Config fields that two models must share to be merged tensor by tensor.
SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size")


@dataclass(frozen=True)
class ModelInfo:
    """A model as the search sees it before loading: its fingerprint and its shape signature."""

    name: str
    fingerprint: str
    signature: dict[str, Any]


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a Hugging Face model (downloaded unless HF_HUB_OFFLINE is set)."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - any hub failure means the user's model id cannot be used
        why = "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline else type(e).__name__
        raise UserError(f"candidate '{repo_id}': cannot get it from the Hugging Face hub ({why})") from None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict ({} when missing)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def _vocab_hash(folder: Path) -> str:
    """Hash of the tokenizer's vocabulary (tokenizer.json's model.vocab), or of its files."""
    tj = _read_json(folder / "tokenizer.json")
    vocab = (tj.get("model") or {}).get("vocab")
    blob = json.dumps(vocab, sort_keys=True) if vocab else "".join(
        (folder / f).read_text(errors="ignore") for f in ("vocab.json", "tokenizer.model") if (folder / f).is_file()
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _folder_fingerprint(folder: Path) -> str:
    """Content key of a model folder: config, tokenizer, and each weight file's size and first/last MiB."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        h.update(f.name.encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:  # large weight files: the tail too, without reading gigabytes
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def _signature(folder: Path) -> dict[str, Any]:
    """Shape fields and vocabulary hash of a Hugging Face model folder."""
    cfg = _read_json(folder / "config.json")
    if not cfg:
        raise UserError(f"{folder}: no config.json (not a Hugging Face model folder)")
    sig = {k: cfg.get(k) for k in SHAPE_FIELDS}
    return sig | {"architectures": cfg.get("architectures"), "vocabulary": _vocab_hash(folder)}


def _zoo_signature() -> dict[str, Any]:
    """Signature shared by every zoo model (same shape, same tokenizer), known without building one."""
    sig = {k: zoo.SHAPE.get(k) for k in SHAPE_FIELDS}
    return sig | {"model_type": "mistral", "vocab_size": zoo.VOCAB, "architectures": ["MistralForCausalLM"],
                  "vocabulary": f"zoo-{zoo.zoo_key('base')}"}


def describe(c: Candidate) -> ModelInfo:
    """Fingerprint and signature of a candidate, without loading weights."""
    if c.path.startswith(ZOO_PREFIX):
        name = c.path.removeprefix(ZOO_PREFIX)
        if name not in zoo.ZOO:
            raise UserError(f"candidate '{c.name}': no zoo model '{name}' (zoo has: {', '.join(zoo.ZOO)})")
        return ModelInfo(c.name, zoo.zoo_key(name), _zoo_signature())
    folder = Path(c.path)
    if not folder.is_dir():
        if c.path.startswith((".", "/")) or c.path.count("/") != 1:
            raise UserError(f"candidate '{c.name}': {c.path} is neither a local folder nor a Hugging Face id")
        folder = _hub_snapshot(c.path)
        return ModelInfo(c.name, content_key("hub", c.path, folder.name), _signature(folder))
    return ModelInfo(c.name, content_key("local", _folder_fingerprint(folder)), _signature(folder))


def materialize(c: Candidate, store: Store, log: Callable[[str], None] = print) -> Path:
    """A local folder with the candidate's weights (building zoo models on first use)."""
    if c.path.startswith(ZOO_PREFIX):
        return zoo.ensure_zoo_model(store, c.path.removeprefix(ZOO_PREFIX), log)
    folder = Path(c.path)
    return folder if folder.is_dir() else _hub_snapshot(c.path)


def check_mergeable(merge_name: str, infos: list[ModelInfo]) -> None:
    """Raise one line naming the two models and the fields that differ when they cannot be merged."""
    first = infos[0]
    for other in infos[1:]:
        diff = [k for k in first.signature if first.signature[k] != other.signature.get(k)]
        if diff:
            what = ", ".join(f"{k} {first.signature[k]} vs {other.signature.get(k)}" for k in diff)
            kind = "vocabularies" if diff == ["vocabulary"] else "architectures"
            raise UserError(
                f"merge '{merge_name}': {first.name} and {other.name} have different {kind} ({what}); "
                "mergekit can only merge models of the same shape and tokenizer"
            )


@task(name="candidate", task_run_name="candidate-{c.name}", cache_policy=NO_CACHE)
def candidate_task(c: Candidate, store_root: str) -> str:
    """Prefect task: the candidate's local folder (a zoo model is built into the store on first use)."""
    return str(materialize(c, Store(store_root), log=get_run_logger().info))
