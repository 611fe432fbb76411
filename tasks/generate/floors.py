"""The floors a fine-tune must clear before it counts as having learned its dataset, answered on the same test rows:

- its untuned base, answering zero-shot in the same prompt format (a generation with no adapter: cheap, no
  training), which shows each base's lift from fine-tuning;
- a trivial answer that needs no model: the most common training answer for `exact` and `json` datasets (a
  classifier at chance answers the majority label), the prompt's first sentence for `rouge` (a summary that copies).

A fine-tune that does not beat both on the dataset's metric learned nothing a user can act on: 5 email teams at
0.20 exact match is chance, however confidently it is rated against other fine-tunes at chance.
"""

from __future__ import annotations

import re
from collections import Counter

import pandas as pd

from tasks.config.base import TRIVIAL
from tasks.data.load import Example
from tasks.generate.outputs import OUTPUT_COLUMNS


def _first_sentence(ex: Example) -> str:
    """The first sentence of the row's last user message."""
    text = next((m["content"] for m in reversed(ex.prompt) if m["role"] == "user"), "")
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def trivial_answers(train: list[Example], test: list[Example], metric: str) -> list[str]:
    """The trivial answer to each test row: the most common training answer (exact, json), else its first sentence."""
    if metric in ("exact", "json"):
        common = Counter(ex.answer for ex in train).most_common(1)[0][0]
        return [common] * len(test)
    return [_first_sentence(ex) for ex in test]


def trivial_outputs(dataset: str, train: list[Example], test: list[Example], metric: str) -> pd.DataFrame:
    """The trivial answers as a contender's outputs (no model, no cost)."""
    return pd.DataFrame({
        "dataset": dataset, "example_id": [e.id for e in test], "contender": TRIVIAL,
        "output": trivial_answers(train, test, metric), "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0,
        "error": None,
    })[OUTPUT_COLUMNS]
