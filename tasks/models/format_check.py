"""The up-front prompt-format check: every row of every dataset rendered with every candidate's template.

Reads tokenizers and templates only (no weights), so a template that refuses a conversation, or training rows
too long for finetune.max_length, are named in one line before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config.schema import Candidate, DatasetSpec, LoadOptions, SearchConfig
from tasks.core.errors import UserError, first_line
from tasks.data.load import Example
from tasks.models.chat import encode_row, generation_eos, install_template, load_tokenizer, prompt_format, template_text

Rows = dict[str, tuple[DatasetSpec, list[Example], list[Example]]]  # dataset -> (spec, train rows, test rows)


def load_options(c: Candidate, own: str | None, cfg: SearchConfig, where: str) -> tuple[LoadOptions, str]:
    """(how the search loads the candidate, where its template comes from): the config's, its own, or the default."""
    if c.chat_template:
        return (LoadOptions(chat_template=template_text(c.chat_template, f"{where}.chat_template"),
                            trust_remote_code=c.trust_remote_code), f"chat_template {c.chat_template} (config)")
    if own:
        return LoadOptions(trust_remote_code=c.trust_remote_code), "its own chat template"
    return (LoadOptions(chat_template=template_text(cfg.chat_template, "chat_template"),
                        trust_remote_code=c.trust_remote_code), f"no template of its own: {cfg.chat_template}")


def _row_problems(tok: Any, fmt: Any, who: str, rows: Rows, max_length: int) -> list[str]:
    """Render every row: raise one line on a refused conversation; warn about training rows over max_length."""
    warnings = []
    for spec, train, test in rows.values():
        long: list[tuple[int, int]] = []  # (tokens, line) of training rows that would not fit
        for path, examples in ((spec.train, train), (spec.test, test)):
            for ex in examples:
                try:
                    ids, _ = encode_row(tok, fmt, ex.prompt, ex.answer)
                except Exception as e:  # noqa: BLE001 - the template's own exception, whatever its type
                    raise UserError(f"{who}: {path}:{ex.line}: its chat template refuses this conversation "
                                    f"({first_line(e)})") from None
                if examples is train and len(ids) > max_length:
                    long.append((len(ids), ex.line))
        if long:
            n, line = max(long)
            warnings.append(f"{who}: {len(long)} of {len(train)} training rows of {spec.train} are longer than "
                            f"finetune.max_length {max_length} (the longest, line {line}, is {n} tokens); they are "
                            "left out of its fine-tune, never cut short; raise finetune.max_length to keep them")
    return warnings


def check_formats(cfg: SearchConfig, folders: dict[str, Path | None], rows: Rows) -> tuple[dict[str, tuple[LoadOptions, str]], list[str]]:
    """Every candidate's and ingredient's load options and template source; warnings (system folded, long rows).

    Zoo models (folder None) use the zoo's own template, written with the zoo. Candidates that share a tokenizer
    and template are rendered once.
    """
    loads: dict[str, tuple[LoadOptions, str]] = {}
    warnings: list[str] = []
    seen: dict[tuple[str, str], list[str]] = {}  # (tokenizer folder, template) -> that render's warnings
    entries = [("candidates", i, c) for i, c in enumerate(cfg.candidates)]
    entries += [("ingredients", i, c) for i, c in enumerate(cfg.ingredients)]
    for key, i, c in entries:
        folder = folders[c.name]
        if folder is None:
            loads[c.name] = LoadOptions(), "the zoo's own chat template; turns end with `</s>`"
            continue
        who = f"candidate '{c.name}'"
        try:
            tok = load_tokenizer(folder, LoadOptions(trust_remote_code=c.trust_remote_code))
        except Exception as e:  # noqa: BLE001 - transformers' many ways to fail on a broken tokenizer
            raise UserError(f"{who}: cannot load the tokenizer in {folder} ({type(e).__name__}: {first_line(e)})") \
                from None
        own = tok.chat_template if isinstance(tok.chat_template, str) else None
        load, source = load_options(c, own, cfg, f"{key}[{i}] ({c.name})")
        tok = install_template(tok, load.chat_template)  # the template the search uses (its own when None)
        fmt = prompt_format(tok, generation_eos(folder), who)
        loads[c.name] = load, f"{source}; {fmt.describe()}"

        if fmt.fold_system:
            warnings.append(f"{who}: its chat template refuses a system message, so the system text is folded into "
                            "the first user turn")
        if key == "ingredients":
            continue  # merged only: never trained on or asked the datasets' rows
        ident = (str(folder), load.chat_template or own or "")
        if ident not in seen:
            seen[ident] = _row_problems(tok, fmt, who, rows, cfg.finetune.max_length)
        warnings += seen[ident]
    return loads, warnings
