"""Model folders: checked before any model is loaded, fingerprinted by their bytes, described by their shape.

Every candidate is checked before any model is loaded: its folder has a config.json, a tokenizer and weight files
whose headers parse. Signatures are read from small files (config.json, tokenizer.json). A local folder's
fingerprint hashes every byte of every file, once: hashes are cached by (path, size, mtime).

Importing this module stays light (no Prefect, torch, transformers or pandas): the demo zoo and the store are
imported where they are used. Which folder a candidate is (zoo, hub, local, adapter) is tasks/candidates/resolve.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config.schema import Candidate, LoadOptions
from tasks.core.errors import UserError

if TYPE_CHECKING:
    pass

# Config fields that two models must share to be merged tensor by tensor.
SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim")
VOCAB_FIELDS = ("vocab_size", "vocabulary", "added_tokens")  # a tokenizer_source lets these differ
# What a hub candidate's check downloads: configs, tokenizers, templates; weights come at the candidates stage.
HUB_LIGHT = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]
HUB_FULL = [*HUB_LIGHT, "*.safetensors"]
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
    # candidate | merge: fine-tuned and rated; ingredient: only merged into others, never fine-tuned
    role: str = "candidate"
    load: LoadOptions = LoadOptions()  # prompt template override and remote-code opt-in, passed to every job
    template: str = ""  # where its prompt format comes from, for the log and the report

    @property
    def finetuned(self) -> bool:
        """Whether the search fine-tunes and rates this model (every model but a merge-only ingredient)."""
        return self.role != "ingredient"


def hub_snapshot(repo_id: str, weights: bool = False) -> Path:
    """The local snapshot folder of a Hugging Face model: configs and tokenizer only, or with its weights."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline, allow_patterns=HUB_FULL if weights else HUB_LIGHT))
    except Exception as e:  # noqa: BLE001 - any hub failure means the user's model id cannot be used
        why = "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline else type(e).__name__
        what = "its weights" if weights else "it"
        raise UserError(f"candidate '{repo_id}': cannot get {what} from the Hugging Face hub ({why})") from None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict ({} when missing)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def _vocabulary(folder: Path) -> tuple[str, dict[int, str]]:
    """(hash of the base vocabulary, added tokens by id) from tokenizer.json, else a hash of the vocabulary files.

    The base vocabulary is the tokenizer model's, less the added tokens: OpenHermes 2.5 and Mistral 7B share it,
    and differ only by OpenHermes' two added ChatML tokens (32,002 entries against 32,000).
    """
    tj = _read_json(folder / "tokenizer.json")
    added = {int(t["id"]): t["content"] for t in tj.get("added_tokens") or [] if isinstance(t, dict) and "id" in t}
    vocab = (tj.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        vocab = {k: v for k, v in vocab.items() if v not in added}
    elif isinstance(vocab, list):  # unigram models list [piece, score] pairs by id
        vocab = [v for i, v in enumerate(vocab) if i not in added]
    blob = json.dumps(vocab, sort_keys=True) if vocab else "".join(
        (folder / f).read_text(errors="ignore") for f in ("vocab.json", "tokenizer.model") if (folder / f).is_file()
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12], added


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


def folder_fingerprint(folder: Path) -> str:
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


def check_folder(name: str, folder: Path, weights: bool = True) -> None:
    """Raise one line naming the candidate and folder unless it has a config, a tokenizer and (`weights`) sound weights."""
    where = f"candidate '{name}': {folder}"
    if not (folder / "config.json").is_file():
        raise UserError(f"{where} has no config.json (not a Hugging Face model folder)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{where} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one there with "
                        "tokenizer.save_pretrained")
    if not weights:
        return
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


def folder_signature(name: str, folder: Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """Shape fields, vocabulary and added tokens of a Hugging Face model folder (refusing unasked-for remote code)."""
    try:
        cfg = _read_json(folder / "config.json")
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"candidate '{name}': {folder / 'config.json'} is not JSON") from None
    if not cfg:
        raise UserError(f"candidate '{name}': {folder} has no config.json (not a Hugging Face model folder)")
    if cfg.get("auto_map") and not trust_remote_code:
        raise UserError(f"candidate '{name}': {folder} ships its own model code (config.json auto_map), which runs "
                        "only with trust_remote_code: true on the candidate; read that code first")
    vocabulary, added = _vocabulary(folder)
    sig = shape_signature(cfg)
    return sig | {"architectures": cfg.get("architectures"), "vocab_size": cfg.get("vocab_size"),
                  "vocabulary": vocabulary, "added_tokens": added}


def shape_signature(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config fields two models must share to merge, head_dim as the model computes it where the config omits
    it (hidden_size / num_attention_heads): an explicit 64 and an implied 64 are one shape."""
    sig = {k: cfg.get(k) for k in SHAPE_FIELDS}
    if sig["head_dim"] is None and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        sig["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return sig


def adapter_base(c: Candidate, folder: Path, others: list[Candidate]) -> Candidate:
    """The base model of a PEFT adapter folder: the candidate it names (by name or path), else its path or hub id."""
    try:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        raise UserError(f"candidate '{c.name}': {folder / 'adapter_config.json'} is not JSON") from None
    if not isinstance(base, str) or not base:
        raise UserError(f"candidate '{c.name}': {folder / 'adapter_config.json'} names no base_model_name_or_path")
    match = next((o for o in others if base in (o.name, o.path) and o.name != c.name), None)
    return match or Candidate(name=f"{c.name}-base", path=base, trust_remote_code=c.trust_remote_code)


def local_or_hub(c: Candidate) -> tuple[Path, bool]:
    """(folder, whether it is a hub snapshot): the local folder, or the hub's configs and tokenizer."""
    folder = Path(c.path)
    if folder.is_dir():
        return folder, False
    if c.path.startswith((".", "/")) or c.path.count("/") != 1:
        raise UserError(f"candidate '{c.name}': {c.path} is neither a local folder nor a Hugging Face id")
    return hub_snapshot(c.path), True


def check_mergeable(merge_name: str, infos: list[ModelInfo], tokenizer_source: Any = None) -> None:
    """Raise one line naming two models and what differs when mergekit cannot merge them as the recipe asks.

    Shapes must match. Vocabularies may differ only when the recipe says which tokenizer the merge gets
    (`tokenizer_source`: base, union or a model), and added tokens must never disagree at the same id.
    """
    first = infos[0]
    for other in infos[1:]:
        a, b = first.signature, other.signature
        shape = [k for k in a if k not in VOCAB_FIELDS and a[k] != b.get(k)]
        if shape:
            what = ", ".join(f"{k} {a[k]} vs {b.get(k)}" for k in shape)
            raise UserError(f"merge '{merge_name}': {first.name} and {other.name} have different architectures "
                            f"({what}); mergekit merges only models of the same architecture and shape")
        added_a, added_b = a.get("added_tokens") or {}, b.get("added_tokens") or {}
        clash = next((i for i in sorted(set(added_a) & set(added_b)) if added_a[i] != added_b[i]), None)
        if clash is not None:
            raise UserError(f"merge '{merge_name}': {first.name} and {other.name} have different added tokens at id "
                            f"{clash} ({added_a[clash]!r} vs {added_b[clash]!r}); their embeddings there mean "
                            "different things, so no tokenizer_source can merge them")
        vocab = [k for k in VOCAB_FIELDS if a.get(k) != b.get(k)]
        if vocab and tokenizer_source is None:
            what = f"vocab_size {a.get('vocab_size')} vs {b.get('vocab_size')}" if "vocab_size" in vocab else \
                "the same size, different tokens"
            raise UserError(f"merge '{merge_name}': {first.name} and {other.name} have different vocabularies ({what});"
                            " say which tokenizer the merge gets: tokenizer_source: union (every token of both), "
                            "base, or a model name")
