"""The up-front prompt-format check: every row of every dataset rendered in every distinct prompt format.

Reads tokenizers and templates only (no weights), so a template that refuses a conversation, or training rows
too long for finetune.max_length, are named in one line before any model is loaded. A format is keyed by content,
not by folder: the hash of the files the tokenizer is loaded from, the template installed on it and its stop tokens.
The fine-tunes of one family share all three, so twelve of them cost one tokenizer load and one render per row:
for 12 such candidates x 18,000 rows, 18,000 rows rendered instead of 216,000, ~4 CPU s instead of ~88
(bench/format_check.py, loaded 2-core machine).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.config.schema import Candidate, DatasetSpec, LoadOptions, SearchConfig
from tasks.core.errors import UserError, first_line
from tasks.data.load import Example
from tasks.models.chat import (PromptFormat, _messages, encode_row, generation_eos, install_template,
                               load_tokenizer, prompt_format, render, template_text)

# _messages and render are encode_row's own steps: the check renders exactly what training does.

Rows = dict[str, tuple[DatasetSpec, list[Example], list[Example]]]  # dataset -> (spec, train rows, test rows)
_BATCH = 1000  # conversations per call of the tokenizer: its own per-call cost (~0.05 ms) once per 1,000 rows
# What AutoTokenizer.from_pretrained reads from a folder (transformers 5): the tokenizer itself in any of its
# formats, its config and special tokens, and the chat templates saved beside it.
TOKENIZER_CONTENT = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                     "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                     "chat_template.json")


def tokenizer_content(folder: Path, trust_remote_code: bool) -> str:
    """Content key of the tokenizer in `folder`: folders with the same key load the same tokenizer.

    sha256 of the TOKENIZER_CONTENT files and additional_chat_templates/*.jinja, config.json's model_type and
    tokenizer_class (they pick the class when tokenizer_config.json names none) and, with remote code, the folder's
    .py files. Hashing costs ~7 ms for a 9 MB tokenizer.json (Llama 3's size), far less than loading it.
    """
    h = hashlib.sha256(b"remote code\0" if trust_remote_code else b"\0")
    extra = sorted(f"additional_chat_templates/{p.name}" for p in (folder / "additional_chat_templates").glob("*.jinja"))
    extra += sorted(p.name for p in folder.glob("*.py")) if trust_remote_code else []
    for name in (*TOKENIZER_CONTENT, *extra):
        path = folder / name
        if path.is_file():
            data = path.read_bytes()
            h.update(f"{name}\0{len(data)}\0".encode())
            h.update(data)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    picks = [config.get(k) for k in ("model_type", "tokenizer_class")] if isinstance(config, dict) else []
    h.update(json.dumps(picks).encode())
    return h.hexdigest()


def load_options(c: Candidate, own: str | None, cfg: SearchConfig, where: str) -> tuple[LoadOptions, str]:
    """(how the search loads the candidate, where its template comes from): the config's, its own, or the default."""
    if c.chat_template:
        return (LoadOptions(chat_template=template_text(c.chat_template, f"{where}.chat_template"),
                            trust_remote_code=c.trust_remote_code), f"chat_template {c.chat_template} (config)")
    if own:
        return LoadOptions(trust_remote_code=c.trust_remote_code), "its own chat template"
    return (LoadOptions(chat_template=template_text(cfg.chat_template, "chat_template"),
                        trust_remote_code=c.trust_remote_code), f"no template of its own: {cfg.chat_template}")


@dataclass
class _Format:
    """One distinct prompt format (a tokenizer with its template, and the stop tokens) and the candidates using it."""

    tok: Any
    fmt: PromptFormat
    names: list[str] = field(default_factory=list)

    def who(self) -> str:
        """The candidates, for a message: one named, or the first three and how many more."""
        if len(self.names) == 1:
            return f"candidate '{self.names[0]}'"
        shown = ", ".join(f"'{n}'" for n in self.names[:3])
        more = f" and {len(self.names) - 3} more" if len(self.names) > 3 else ""
        return f"candidates {shown}{more} (one tokenizer and template)"


def _render_row(f: _Format, ex: Example) -> tuple[str, str]:
    """The row's prompt and full conversation as encode_row renders them (raises where encode_row would)."""
    msgs = _messages(f.fmt, ex.prompt)
    head = render(f.tok, msgs, True)
    full = render(f.tok, [*msgs, {"role": "assistant", "content": ex.answer}], False)
    if not full.startswith(head):
        raise ValueError("the chat template renders the prompt differently once the answer is added")
    return head, full


def _rendered(f: _Format, path: str, examples: list[Example]) -> list[str]:
    """Every row's full conversation in one format; one line naming the row where the template refuses it."""
    out = []
    for ex in examples:
        try:
            out.append(_render_row(f, ex)[1])
        except Exception as e:  # noqa: BLE001 - the template's own exception, whatever its type
            raise UserError(f"{f.who()}: {path}:{ex.line}: its chat template refuses this conversation "
                            f"({first_line(e)})") from None
    return out


def _long_rows(f: _Format, train: list[Example], fulls: list[str], max_length: int) -> list[tuple[int, int]]:
    """(encode_row's token count, line) of the training rows over max_length, given their full conversations.

    encode_row's ids are a prefix of the full conversation's, so a conversation of at most max_length tokens fits
    without tokenizing its prompt too (encode_row's second tokenization, ~0.1 ms for a 200-character row with a
    byte-level BPE); only longer ones go through encode_row. Test rows are not tokenized: their length is never
    used. Conversations go to the tokenizer _BATCH at a time (the same ids as one by one, without the per-call cost).
    """
    long = []
    for start in range(0, len(fulls), _BATCH):
        ids = f.tok(fulls[start : start + _BATCH], add_special_tokens=False)["input_ids"]  # as chat._ids, batched
        for ex, n in zip(train[start : start + _BATCH], map(len, ids)):
            if n > max_length and (n := len(encode_row(f.tok, f.fmt, ex.prompt, ex.answer)[0])) > max_length:
                long.append((n, ex.line))
    return long


def _row_problems(f: _Format, rows: Rows, max_length: int) -> list[str]:
    """Render every row in one format: raise one line on a refused conversation; warn about training rows over
    max_length."""
    warnings = []
    for spec, train, test in rows.values():
        fulls = _rendered(f, spec.train, train)
        _rendered(f, spec.test, test)
        long = _long_rows(f, train, fulls, max_length)
        if long:
            n, line = max(long)
            their = "its fine-tune" if len(f.names) == 1 else "their fine-tunes"
            warnings.append(f"{f.who()}: {len(long)} of {len(train)} training rows of {spec.train} are longer than "
                            f"finetune.max_length {max_length} (the longest, line {line}, is {n} tokens); they are "
                            f"left out of {their}, never cut short; raise finetune.max_length to keep them")
    return warnings


class _Tokenizers:
    """Tokenizers loaded once per (content, template): the first folder with a content key is the one read."""

    def __init__(self) -> None:
        """Nothing loaded yet."""
        self.own: dict[str, str | None] = {}  # content key -> the tokenizer's own chat template
        self.loaded: dict[tuple[str, str | None], Any] = {}  # (content key, template installed) -> tokenizer

    def get(self, c: Candidate, folder: Path, content: str, cfg: SearchConfig, where: str
            ) -> tuple[Any, LoadOptions, str]:
        """The candidate's tokenizer with the template the search uses, its load options and the template's source."""
        fresh = None
        if content not in self.own:
            fresh = _load(c, folder)
            self.own[content] = fresh.chat_template if isinstance(fresh.chat_template, str) else None
        load, source = load_options(c, self.own[content], cfg, where)
        key = (content, load.chat_template)
        if key not in self.loaded:  # the same tokenizer under another template: a second object, not a shared one
            self.loaded[key] = install_template(fresh if fresh is not None else _load(c, folder), load.chat_template)
        return self.loaded[key], load, source


def _load(c: Candidate, folder: Path) -> Any:
    """The tokenizer in `folder` with its own template; one line naming the candidate when it cannot load."""
    try:
        return load_tokenizer(folder, LoadOptions(trust_remote_code=c.trust_remote_code))
    except Exception as e:  # noqa: BLE001 - transformers' many ways to fail on a broken tokenizer
        raise UserError(f"candidate '{c.name}': cannot load the tokenizer in {folder} ({type(e).__name__}: "
                        f"{first_line(e)})") from None


def check_formats(cfg: SearchConfig, folders: dict[str, Path | None], rows: Rows
                  ) -> tuple[dict[str, tuple[LoadOptions, str]], list[str], str]:
    """Every candidate's and ingredient's load options and template source; warnings (system folded, long rows);
    and one line saying how many rows were rendered in how many distinct formats.

    Zoo models (folder None) use the zoo's own template, written with the zoo. Candidates whose tokenizer content,
    template and stop tokens are the same are one format: their tokenizer is loaded once and each row rendered once.
    """
    loads: dict[str, tuple[LoadOptions, str]] = {}
    warnings: list[str] = []
    toks = _Tokenizers()
    formats: dict[tuple[str, str | None, PromptFormat], _Format] = {}
    entries = [("candidates", i, c) for i, c in enumerate(cfg.candidates)]
    entries += [("ingredients", i, c) for i, c in enumerate(cfg.ingredients)]
    for key, i, c in entries:
        folder = folders[c.name]
        if folder is None:
            loads[c.name] = LoadOptions(), "the zoo's own chat template; turns end with `</s>`"
            continue
        who = f"candidate '{c.name}'"
        content = tokenizer_content(folder, c.trust_remote_code)
        tok, load, source = toks.get(c, folder, content, cfg, f"{key}[{i}] ({c.name})")
        fmt = prompt_format(tok, generation_eos(folder), who)
        loads[c.name] = load, f"{source}; {fmt.describe()}"
        if fmt.fold_system:
            warnings.append(f"{who}: its chat template refuses a system message, so the system text is folded into "
                            "the first user turn")
        if key == "candidates":  # an ingredient is merged only: never trained on or asked the datasets' rows
            formats.setdefault((content, load.chat_template, fmt), _Format(tok, fmt)).names.append(c.name)
    for f in formats.values():
        warnings += _row_problems(f, rows, cfg.finetune.max_length)
    n_rows = sum(len(train) + len(test) for _, train, test in rows.values())
    n_local = sum(len(f.names) for f in formats.values())
    summary = "" if not n_local else (f"format check: {n_rows:,} rows rendered in {len(formats)} distinct prompt "
               f"format{'s' * (len(formats) != 1)} for {n_local} local candidate{'s' * (n_local != 1)} "
               f"({n_rows * len(formats):,} renders, {len(toks.loaded)} tokenizer{'s' * (len(toks.loaded) != 1)} "
               "loaded)")  # none for zoo candidates: their format is the zoo's, checked by its tests
    return loads, warnings, summary
