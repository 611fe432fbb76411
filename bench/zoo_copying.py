"""Can a zoo-sized model learn to copy from its prompt, and can its tokenizer copy at all? Per shape, per layout.

    python bench/zoo_copying.py [--steps 1200] [--every 200] [--layout varied|fixed]

Why: the demo's students cannot copy a name or a city from the prompt into their answer (extraction scores
0.02-0.08 against the teacher's 0.97), and a LoRA of 80 steps cannot teach a base model a skill it lacks.

1. Tokens: the share of the demo's extraction values (name, age, city of the test rows' `expected`) whose tokens
   in the answer are the very tokens they have in the prompt. A value written differently (`ĠBerlin` in
   "based in Berlin" against `B er lin` after the JSON quote) cannot be copied token for token.
2. Training: each shape is trained from scratch (plain AdamW at 3e-3, batches of 16 rows) on copy rows; every
   `every` steps it prints the share of the repeated tokens (after the first) it predicts, teacher-forced greedy,
   on fresh rows of both layouts, as `fixed/varied`. fixed: 10 random tokens, a separator, the same 10 (the copy
   always sits 11 positions back, so a head that looks a fixed distance back solves it). varied: 0-5 random
   tokens, then a span of 4-10, a separator, the span again: only a real induction head (find the previous
   occurrence of this token, predict what followed it) solves it.
Shapes: the zoo's own (tasks.demo.zoo.SHAPE, untied embeddings) and the alternatives tried for it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench._machine import header  # noqa: E402
from tasks.demo import zoo  # noqa: E402

# The variants spell out their heads (head_dim = width / heads): zoo.SHAPE's explicit head_dim 64 is the zoo's alone.
_HEADS = lambda n, kv, width=96: {"num_attention_heads": n, "num_key_value_heads": kv, "head_dim": width // n}  # noqa: E731
SHAPES = {  # name -> MistralConfig shape
    "zoo (tasks.demo.zoo.SHAPE: 4x96, 2/1 heads of 64, untied)": zoo.SHAPE | {"tie_word_embeddings": False},
    "4x96, 4/2 heads, tied": zoo.SHAPE | {"tie_word_embeddings": True} | _HEADS(4, 2),
    "4x96, 8/8 heads, tied": zoo.SHAPE | {"tie_word_embeddings": True} | _HEADS(8, 8),
    "2x96, 4/4 heads, tied": zoo.SHAPE | {"tie_word_embeddings": True, "num_hidden_layers": 2} | _HEADS(4, 4),
    "2x128, 8/8 heads, tied": zoo.SHAPE | {"tie_word_embeddings": True, "num_hidden_layers": 2, "hidden_size": 128,
                                           "intermediate_size": 384} | _HEADS(8, 8, 128),
}
PAD, BOS, EOS, SEP = 0, 1, 2, 5


def row(rng: random.Random, layout: str) -> tuple[list[int], int]:
    """(BOS, [prefix], span, SEP, span, EOS; the span's length): fixed is 10 tokens at a fixed place."""
    pre = [] if layout == "fixed" else [rng.randrange(100, 1000) for _ in range(rng.randint(0, 5))]
    span = [rng.randrange(100, 1000) for _ in range(10 if layout == "fixed" else rng.randint(4, 10))]
    return [BOS, *pre, *span, SEP, *span, EOS], len(span)


def batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    n = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (n - len(r)) for r in rows])
    return ids, (ids != PAD).long()


def copy_accuracy(model: torch.nn.Module, layout: str, rows: int = 64) -> float:
    """Share of the repeated tokens after the first predicted exactly (greedy next token, teacher-forced)."""
    rng = random.Random(1)
    made = [row(rng, layout) for _ in range(rows)]
    ids, mask = batch([r for r, _ in made])
    with torch.no_grad():
        guess = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    hit = total = 0
    for i, (r, n) in enumerate(made):
        end = len(r) - 1  # the EOS; the copy is r[end - n : end], its first token cannot be known in advance
        hit += int((guess[i, end - n : end - 1] == ids[i, end - n + 1 : end]).sum())
        total += n - 1
    return hit / total


def token_copyable_share(tok: object) -> float:
    """Share of the extraction test values written with the same tokens in the answer JSON as in the prompt."""
    import json

    from tasks.data.load import load_examples

    same = total = 0
    root = Path(__file__).resolve().parent.parent
    for ex in load_examples(str(root / "configs/demo_data/extraction_test.jsonl")):
        prompt, answer = ex.prompt[-1]["content"], json.dumps(ex.expected)
        for value in map(str, ex.expected.values()):
            spans = [_tokens_at(tok, text, text.find(value), len(value)) for text in (prompt, answer)]
            same += spans[0] == spans[1]
            total += 1
    return same / total


def _tokens_at(tok: object, text: str, start: int, n: int) -> list[int]:
    """The token ids of `text` that cover characters start..start+n."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)  # type: ignore[operator]
    return [i for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if b > start and a < start + n]


def run(name: str, shape: dict, steps: int, every: int, layout: str) -> None:
    """Train one shape on `layout` rows and print its copy accuracy (fixed/varied) every `every` steps."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=zoo.VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                        sliding_window=None, **shape)
    model = MistralForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng, t0, marks = random.Random(0), time.perf_counter(), []
    for step in range(1, steps + 1):
        ids, mask = batch([row(rng, layout)[0] for _ in range(16)])
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % every == 0:
            marks.append(f"{copy_accuracy(model, 'fixed'):.2f}/{copy_accuracy(model, 'varied'):.2f}")
    print(f"| {name} | {model.num_parameters() / 1e6:.2f}M | " + " | ".join(marks)
          + f" | {time.perf_counter() - t0:.0f} |", flush=True)


def main() -> None:
    """The tokenizer's line, then every shape in turn, one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--layout", choices=["varied", "fixed"], default="varied", help="the rows trained on")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(header())
    share = token_copyable_share(zoo.build_tokenizer(0))
    print(f"zoo tokenizer: {share:.0%} of the extraction test values have the same tokens in the answer as in the "
          "prompt")
    print(f"trained on {args.layout} rows; each cell: copy accuracy on fixed/varied rows")
    cols = list(range(args.every, args.steps + 1, args.every))
    print("| shape | parameters | " + " | ".join(f"step {c}" for c in cols) + " | seconds |")
    print("|---|---|" + "---|" * len(cols) + "---|")
    for name, shape in SHAPES.items():
        run(name, shape, args.steps, args.every, args.layout)


if __name__ == "__main__":
    main()
