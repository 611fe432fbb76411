"""The prompt-format rule: one way to turn a dataset row into model input, the same in training, generation and the check.

The rule, for every model:
1. The template is the model's own chat template; a candidate's `chat_template:` in the config replaces it; a
   model with none (a base model) gets the search's `chat_template:` (named ones in tasks/models/templates.py, or a
   .jinja file). A template we supply gets BOS in front when the tokenizer adds BOS and the template does not.
2. A template that refuses a system message gets the system text folded into the first user turn (as Mistral's
   own template does it: system text, a blank line, the user text).
3. The prompt is the template's rendering of the messages before the answer with the generation prompt; the target
   is the rest of the full conversation's rendering (the answer and the template's end of turn), tokenized as
   part of the whole, so training sees exactly the ids a server would, and nothing after the end-of-turn token.
4. Generation stops at every end-of-turn token of the model: its generation_config eos list, the tokenizer's eos
   and the template's end of turn.

Importing this module is light; transformers and jinja2 come with the tokenizers passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config.schema import LoadOptions
from tasks.core.errors import UserError, first_line
from tasks.models.templates import TEMPLATES

IGNORE = -100  # label id that torch's cross-entropy skips
_PROBE = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Fine"}]


@dataclass(frozen=True)
class PromptFormat:
    """How one model's conversations are rendered: system folding, end-of-turn token, and every stop token."""

    fold_system: bool
    end_of_turn: str
    stop_ids: tuple[int, ...]

    def describe(self) -> str:
        """One line for the log and the report."""
        fold = "; system text folded into the first user turn" if self.fold_system else ""
        # a code span: the token stays visible wherever the text is read as Markdown (the report, the model card)
        return f"turns end with `{self.end_of_turn}`{fold}"


def template_text(spec: str, where: str) -> str:
    """The Jinja text of a named template or of a .jinja file; a one-line error naming `where` otherwise."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec)
    if path.suffix == ".jinja":
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: cannot read chat template {path} ({type(e).__name__})") from None
    raise UserError(f"{where}: '{spec}' is neither a named chat template ({', '.join(TEMPLATES)}) nor a .jinja file")


def install_template(tok: Any, text: str | None) -> Any:
    """Give the tokenizer a supplied template (None keeps its own), with BOS in front where the tokenizer adds one."""
    if text is None:
        return tok
    if "bos_token" not in text and tok.bos_token_id is not None:
        adds_bos = tok("x")["input_ids"][:1] == [tok.bos_token_id]
        text = "{{ bos_token }}" + text if adds_bos else text
    tok.chat_template = text
    return tok


def render(tok: Any, messages: list[dict[str, str]], prompt: bool) -> str:
    """The template's text for `messages`: with the generation prompt (`prompt`), or as a finished conversation."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def _refuses(tok: Any, messages: list[dict[str, str]]) -> str | None:
    """The template's message when it refuses to render `messages`, else None."""
    try:
        render(tok, messages, False)
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError, or a template that breaks on this input
        return first_line(e)
    return None


def fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Leading system messages joined into the first user message (system text, blank line, user text)."""
    n = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    system, rest = [m["content"] for m in messages[:n]], [dict(m) for m in messages[n:]]
    if not system:
        return messages
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = "\n\n".join(system + [rest[0]["content"]])
        return rest
    return [{"role": "user", "content": "\n\n".join(system)}, *rest]


def _ids(tok: Any, text: str) -> list[int]:
    """Token ids of rendered text, special tokens in it read as such and none added (as apply_chat_template does)."""
    return tok(text, add_special_tokens=False)["input_ids"]


def _added_ids(tok: Any) -> set[int]:
    """Ids of every added or special token of the tokenizer (turn markers live there)."""
    return set(getattr(tok, "added_tokens_decoder", {}) or {}) | set(tok.all_special_ids)


def prompt_format(tok: Any, eos_ids: list[int] | int | None = None, who: str = "model") -> PromptFormat:
    """The format of a tokenizer's template: whether it refuses a system message, its end of turn, its stop tokens.

    `eos_ids` is the model's generation_config.eos_token_id (one id or a list). A one-line UserError naming `who`
    when the template has no end-of-turn token generation could stop at, or renders prompt and conversation apart.
    """
    if not getattr(tok, "chat_template", None):
        raise UserError(f"{who}: its tokenizer has no chat template (set chat_template: in the config)")
    fold = _refuses(tok, [{"role": "system", "content": "Be brief."}, *_PROBE]) is not None
    prefix, full = render(tok, _PROBE[:1], True), render(tok, _PROBE, False)
    if not full.startswith(prefix):
        raise UserError(f"{who}: its chat template renders the prompt differently once the answer is added, so "
                        "training and generation would see different text; set chat_template: in the config")
    after = full[len(prefix):].split(_PROBE[1]["content"], 1)[-1]
    special = _added_ids(tok)
    eot = next((i for i in _ids(tok, after) if i in special), None)
    if eot is None:
        raise UserError(f"{who}: its chat template ends an assistant turn with no special token (after the answer it "
                        f"writes {after!r}), so generation could not stop; use chat_template: default, or one whose "
                        "end of turn is one token of this vocabulary")
    extra = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    stops = dict.fromkeys([eot, *([tok.eos_token_id] if tok.eos_token_id is not None else []), *extra])
    return PromptFormat(fold, tok.convert_ids_to_tokens(eot), tuple(stops))


def _messages(fmt: PromptFormat, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages as the template receives them (system folded where it refuses one)."""
    return fold_system(messages) if fmt.fold_system else messages


def prompt_ids(tok: Any, fmt: PromptFormat, prompt: list[dict[str, str]]) -> list[int]:
    """Ids of the conversation before the answer, with the generation prompt: what a server would feed the model."""
    return _ids(tok, render(tok, _messages(fmt, prompt), True))


def encode_row(tok: Any, fmt: PromptFormat, prompt: list[dict[str, str]], answer: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one training row: the full rendering up to the end-of-turn token; labels on the target.

    The full conversation is tokenized once (a token may span the prompt/answer seam); the target starts where its
    ids part from the prompt's own ids, so the label mask covers exactly the answer and its end of turn.
    """
    msgs = _messages(fmt, prompt)
    head, full = render(tok, msgs, True), render(tok, [*msgs, {"role": "assistant", "content": answer}], False)
    if not full.startswith(head):
        raise ValueError("the chat template renders the prompt differently once the answer is added")
    p_ids, ids = _ids(tok, head), _ids(tok, full)
    start = next((i for i, (a, b) in enumerate(zip(p_ids, ids)) if a != b), min(len(p_ids), len(ids)))
    stops = set(fmt.stop_ids)
    end = next((i + 1 for i in range(start, len(ids)) if ids[i] in stops), len(ids))
    return ids[:end], [IGNORE] * start + ids[start:end]


def strip_stop(ids: list[int], fmt: PromptFormat) -> tuple[list[int], str]:
    """(generated ids up to the first stop token, finish_reason): `stop` when one came, `length` when none did."""
    stops = set(fmt.stop_ids)
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    return (ids, "length") if cut is None else (ids[:cut], "stop")


def load_tokenizer(folder: str | Path, load: LoadOptions) -> Any:
    """A model folder's tokenizer with the template the search uses for it (its own unless `load` supplies one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=load.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return install_template(tok, load.chat_template)


def generation_eos(folder: str | Path) -> list[int] | int | None:
    """The model's generation_config.json eos_token_id (one id or a list), read without loading the model."""
    import json

    path = Path(folder) / "generation_config.json"
    try:
        return json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    except (OSError, ValueError):
        return None
