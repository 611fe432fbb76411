"""Candidates: where each model's weights are, what determines them (fingerprint), and what shape they have.

Every candidate is checked before any model is loaded: its folder has a config.json, a tokenizer and weight files
whose headers parse. Signatures are read from small files (config.json, tokenizer.json). A local folder's
fingerprint hashes every byte of every file, once: hashes are cached by (path, size, mtime).

Importing this module stays light (no Prefect, torch, transformers or pandas): the demo zoo and the store are
imported where they are used. The candidates stage's Prefect tasks are in tasks/candidates.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tasks.config import ZOO_PREFIX, Candidate
from tasks.errors import UserError

if TYPE_CHECKING:
    from tasks.store import Store

# Config fields that two models must share to be merged tensor by tensor.
SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size")
# Any one of these makes a folder's tokenizer loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors' own reader refuses headers over 100 MB
HASH_CACHE_MIN_BYTES = 1 << 20  # smaller files are hashed every time: cheaper than a cache entry


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


def _hash_cache_path() -> Path:
    """Where whole-file hashes are cached: $XDG_CACHE_HOME/basesearch/hashes.json (default ~/.cache)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "basesearch" / "hashes.json"


def _load_hash_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable or corrupt cache is an empty one (it only saves time)."""
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _save_hash_cache(path: Path, cache: dict[str, Any]) -> None:
    """Write the cache atomically (temp file + rename); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hashes-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(cache, fh)
        os.replace(tmp, path)
    except OSError:
        pass


def _file_sha256(path: Path, cache: dict[str, Any]) -> tuple[str, bool]:
    """(sha256 of every byte of the file, whether the cache gained an entry); reuses a (size, mtime_ns) match."""
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"], False
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    if st.st_size < HASH_CACHE_MIN_BYTES:
        return digest, False
    cache[key] = {"stamp": stamp, "sha256": digest}
    return digest, True


def _folder_fingerprint(folder: Path) -> str:
    """Content key of a model folder: every file's name and the hash of all of its bytes."""
    cache_path = _hash_cache_path()
    cache = _load_hash_cache(cache_path)
    h, changed = hashlib.sha256(), False
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        digest, added = _file_sha256(f, cache)
        changed |= added
        h.update(f"{f.name}\0{digest}\n".encode())
    if changed:
        _save_hash_cache(cache_path, cache)
    return h.hexdigest()[:16]


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not one (8-byte header length, JSON header, data in bounds), or None."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"is {size} bytes, too short for a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > min(MAX_SAFETENSORS_HEADER, size - 8):
            return f"does not start with a safetensors header (header length {n} for a file of {size} bytes)"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, ValueError):
            return "does not hold a safetensors header (its header is not JSON)"
    if not isinstance(header, dict):
        return "does not hold a safetensors header (its header is not a JSON object)"
    offsets = [t.get("data_offsets") if isinstance(t, dict) else None for k, t in header.items() if k != "__metadata__"]
    if not all(isinstance(o, list) and len(o) == 2 and all(isinstance(x, int) for x in o) for o in offsets):
        return "does not hold a safetensors header (a tensor has no [begin, end] data_offsets)"
    if max((o[1] for o in offsets), default=0) > size - 8 - n:
        return f"is cut short: its header points past the end of the file ({size} bytes)"
    return None


def _check_folder(name: str, folder: Path) -> None:
    """Raise one line naming the candidate and folder unless it has a config, a tokenizer and sound weights."""
    where = f"candidate '{name}': {folder}"
    if not (folder / "config.json").is_file():
        raise UserError(f"{where} has no config.json (not a Hugging Face model folder)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{where} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one there with "
                        "tokenizer.save_pretrained")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not list(folder.glob("pytorch_model*.bin")):
        raise UserError(f"{where} has no weights (*.safetensors or pytorch_model*.bin)")
    for f in weights:
        problem = _safetensors_problem(f)
        if problem:
            raise UserError(f"candidate '{name}': {f} {problem}; download or save the model again")
    for f in folder.glob("pytorch_model*.bin"):
        with open(f, "rb") as fh:
            magic = fh.read(4)
        if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch.save: a zip archive, or a legacy pickle
            raise UserError(f"candidate '{name}': {f} is not a PyTorch checkpoint; download or save the model again")


def _signature(name: str, folder: Path) -> dict[str, Any]:
    """Shape fields and vocabulary hash of a Hugging Face model folder."""
    try:
        cfg = _read_json(folder / "config.json")
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"candidate '{name}': {folder / 'config.json'} is not JSON") from None
    if not cfg:
        raise UserError(f"candidate '{name}': {folder} has no config.json (not a Hugging Face model folder)")
    sig = {k: cfg.get(k) for k in SHAPE_FIELDS}
    return sig | {"architectures": cfg.get("architectures"), "vocabulary": _vocab_hash(folder)}


def _zoo_signature() -> dict[str, Any]:
    """Signature shared by every zoo model (same shape, same tokenizer), known without building one."""
    from tasks import zoo

    sig = {k: zoo.SHAPE.get(k) for k in SHAPE_FIELDS}
    return sig | {"model_type": "mistral", "vocab_size": zoo.VOCAB, "architectures": ["MistralForCausalLM"],
                  "vocabulary": f"zoo-{zoo.zoo_key('base')}"}


def inspect_candidate(c: Candidate) -> tuple[Path | None, dict[str, Any]]:
    """(local folder, or None for a zoo model; shape signature) of a checked candidate, reading no weights."""
    if c.path.startswith(ZOO_PREFIX):
        from tasks import zoo

        name = c.path.removeprefix(ZOO_PREFIX)
        if name not in zoo.ZOO:
            raise UserError(f"candidate '{c.name}': no zoo model '{name}' (zoo has: {', '.join(zoo.ZOO)})")
        return None, _zoo_signature()
    folder = Path(c.path)
    if not folder.is_dir():
        if c.path.startswith((".", "/")) or c.path.count("/") != 1:
            raise UserError(f"candidate '{c.name}': {c.path} is neither a local folder nor a Hugging Face id")
        folder = _hub_snapshot(c.path)
    _check_folder(c.name, folder)
    return folder, _signature(c.name, folder)


def candidate_fingerprint(c: Candidate, folder: Path | None) -> str:
    """Content key of a checked candidate: zoo recipe, hub commit, or the hash of all of a local folder's bytes."""
    from tasks.store import content_key

    if folder is None:
        from tasks import zoo

        return zoo.zoo_key(c.path.removeprefix(ZOO_PREFIX))
    if not Path(c.path).is_dir():
        return content_key("hub", c.path, folder.name)  # the snapshot folder is named by its commit
    return content_key("local", _folder_fingerprint(folder))


def describe(c: Candidate) -> ModelInfo:
    """Fingerprint and signature of a candidate, without loading weights."""
    folder, signature = inspect_candidate(c)
    return ModelInfo(c.name, candidate_fingerprint(c, folder), signature)


def materialize(c: Candidate, store: Store, log: Callable[[str], None] = print) -> Path:
    """A local folder with the candidate's weights (building zoo models on first use)."""
    if c.path.startswith(ZOO_PREFIX):
        from tasks import zoo

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
