"""Tiny models of the families users bring (Mistral, Llama 3, Qwen 2, Gemma, Gemma 2, Phi 3, Zephyr, OpenHermes),
built on the fly with transformers' own config classes and locally trained tokenizers that carry each family's
special tokens, BOS/EOS and a chat template of its format. Shared by tests/test_families.py and bench/families.py.

Two layers, 64 wide: a model builds and saves in about a second on one core. `pretrain_steps` trains the whole
model briefly on chats in its own template (as a family's instruct release is trained), so that its answers end
the way its template ends a turn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.demo.data import TASKS, make_rows
from tasks.models.templates import TEMPLATES

VOCAB = 512  # base vocabulary of every family's tokenizer (special tokens included)
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)


@dataclass(frozen=True)
class Family:
    """One family: its config class, special tokens, BOS/EOS, template, and the eos list of its generation_config."""

    config: str  # transformers config class name
    specials: tuple[str, ...]  # trained into the base vocabulary, ids 0..n-1, in this order
    bos: str | None
    eos: str
    template: str | None  # a name in tasks/models/templates.py; None: a base model without a template
    adds_bos: bool = False  # the tokenizer puts BOS in front of every text (Llama, Mistral, Gemma do)
    extra_eos: tuple[str, ...] = ()  # generation_config.eos_token_id also stops at these (Llama 3's <|eot_id|>)
    added: tuple[str, ...] = ()  # tokens added after training (OpenHermes' two ChatML tokens)
    shape: dict[str, Any] = field(default_factory=dict)  # config fields beyond SHAPE


FAMILIES: dict[str, Family] = {
    # Mistral-Instruct v0.2: [INST] turns, no system role, eos </s>.
    "mistral": Family("MistralConfig", ("<unk>", "<s>", "</s>"), "<s>", "</s>", "mistral", adds_bos=True,
                      shape={"sliding_window": None}),
    # Mistral-7B-v0.1, the study's base: no chat template at all.
    "mistral_base": Family("MistralConfig", ("<unk>", "<s>", "</s>"), "<s>", "</s>", None, adds_bos=True,
                           shape={"sliding_window": None}),
    # OpenHermes 2.5: Mistral's vocabulary plus two added ChatML tokens (32,002 against 32,000).
    "hermes": Family("MistralConfig", ("<unk>", "<s>", "</s>"), "<s>", "<|im_end|>", "chatml", adds_bos=True,
                     added=("<|im_start|>", "<|im_end|>"), shape={"sliding_window": None}),
    # Zephyr: <|role|> headers, turns end with </s>.
    "zephyr": Family("MistralConfig", ("<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"), "<s>",
                     "</s>", "zephyr", adds_bos=True, shape={"sliding_window": None}),
    # Llama 3 (base tokenizer's eos <|end_of_text|>; the instruct generation_config also stops at <|eot_id|>).
    "llama3": Family("LlamaConfig", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                     "<|end_header_id|>", "<|eot_id|>"), "<|begin_of_text|>", "<|end_of_text|>",
                     "llama3", adds_bos=True, extra_eos=("<|eot_id|>",)),
    # Qwen 2.5 base: ChatML turns, eos <|endoftext|>, no BOS.
    "qwen2": Family("Qwen2Config", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|endoftext|>", "chatml"),
    # Gemma: <start_of_turn>/<end_of_turn>, no system role.
    "gemma": Family("GemmaConfig", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), "<bos>",
                    "<eos>", "gemma", adds_bos=True, shape={"head_dim": 16}),
    # Gemma 2: the same tokens; its attention refuses SDPA in transformers 5 (eager is chosen).
    "gemma2": Family("Gemma2Config", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
                     "<bos>", "<eos>", "gemma", adds_bos=True, shape={"head_dim": 16, "query_pre_attn_scalar": 16}),
    # Phi 3: <|user|>/<|assistant|> headers, turns end with <|end|>, eos <|endoftext|>.
    "phi3": Family("Phi3Config", ("<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                                  "<|end|>"), "<s>", "<|endoftext|>", "phi3", extra_eos=("<|end|>",)),
}


def _corpus() -> list[str]:
    """Text the tokenizers are trained on: the demo datasets' rows."""
    rows = [r for task in TASKS for r in make_rows(task, 60, seed=7)]
    return [m["content"] for r in rows for m in r["messages"]] + ["### System:", "### User:", "### Assistant:"]


@lru_cache(maxsize=None)
def _trained(specials: tuple[str, ...]) -> str:
    """A byte-level BPE trained on the demo text with `specials` first, as tokenizer.json text (cached per set)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer)
    return bpe.to_str()


def build_tokenizer(fam: Family, added: tuple[str, ...] | None = None) -> Any:
    """The family's tokenizer: trained vocabulary, BOS/EOS, BOS added in front where the family adds it, template."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer.from_str(_trained(fam.specials))
    if fam.adds_bos:
        bos_id = bpe.token_to_id(fam.bos)
        bpe.post_processor = processors.TemplateProcessing(single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B",
                                                           special_tokens=[(fam.bos, bos_id)])
    base_eos = fam.eos if fam.eos in fam.specials else fam.specials[-1]
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=fam.bos, eos_token=base_eos,
                                  unk_token="<unk>" if "<unk>" in fam.specials else None,
                                  pad_token="<pad>" if "<pad>" in fam.specials else None)
    extra = fam.added if added is None else added
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    if fam.eos not in fam.specials:
        tok.eos_token = fam.eos  # OpenHermes: its eos is one of the added tokens
    if fam.template:
        tok.chat_template = TEMPLATES[fam.template]
    return tok


def _config(fam: Family, tok: Any, **shape: Any) -> Any:
    """The family's transformers config for this tokenizer (untied embeddings, small shape)."""
    import transformers

    ids = [tok.eos_token_id, *tok.convert_tokens_to_ids(list(fam.extra_eos))]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cls = getattr(transformers, fam.config)
    return cls(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=ids[0] if len(ids) == 1 else ids,
               pad_token_id=pad, tie_word_embeddings=False, **(SHAPE | fam.shape | shape))


def _chats(tok: Any, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """n demo chats of every dataset, encoded in the tokenizer's own format (tasks/models/chat.py)."""
    from tasks.models.chat import encode_row, prompt_format

    fmt = prompt_format(tok)
    rows = [r for task in TASKS for r in make_rows(task, n, seed)]
    out = []
    for r in rows:
        *prompt, answer = r["messages"]
        ids, _ = encode_row(tok, fmt, prompt, answer["content"])
        out.append((ids, list(ids)))  # the whole chat is learned, as pre-training on chats would
    return out


def build_model(name: str, folder: Path, seed: int = 0, pretrain_steps: int = 0, added: tuple[str, ...] | None = None,
                **shape: Any) -> Path:
    """Save a tiny model of family `name` with its tokenizer in `folder`; `pretrain_steps` trains it on chats first."""
    import torch
    from transformers import AutoModelForCausalLM

    fam = FAMILIES[name]
    tok = build_tokenizer(fam, added)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(fam, tok, **shape), attn_implementation="eager")
    if pretrain_steps and tok.chat_template:
        from tasks.train.loop import train_steps

        rows = _chats(tok, 24, seed)
        random.Random(seed).shuffle(rows)
        train_steps(model, rows, lr=3e-3, steps=pretrain_steps, batch_size=16, seed=seed,
                    pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, packing=False)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
