"""Scores of one output against the truth, in [0, 1]: exact label, JSON field F1, ROUGE-L F1."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

_WORD = re.compile(r"\w+|[^\w\s]")


def _norm(text: Any) -> str:
    """Lower-case, trimmed, inner whitespace folded, trailing full stop dropped."""
    return " ".join(str(text).strip().lower().split()).rstrip(".")


def exact(output: str, truth: Any) -> float:
    """1 when the output is the label (case and spacing aside), else 0."""
    return float(_norm(output) == _norm(truth))


def _flatten(obj: Any, prefix: str = "") -> set[tuple[str, str]]:
    """(path, normalised value) pairs of every leaf of a JSON value."""
    if isinstance(obj, dict):
        return set().union(*(_flatten(v, f"{prefix}.{k}") for k, v in obj.items())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_flatten(v, f"{prefix}[{i}]") for i, v in enumerate(obj))) if obj else set()
    return {(prefix, _norm(json.dumps(obj) if not isinstance(obj, str) else obj))}


def _parse_json(text: Any) -> Any:
    """The JSON value in `text` (already parsed values pass through); None when it does not parse."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def json_f1(output: str, truth: Any) -> float:
    """F1 of the (field, value) pairs of the output's JSON against the truth's; 0 when it does not parse."""
    want, got = _flatten(_parse_json(truth)), _parse_json(output)
    if got is None or not want:
        return 0.0
    have = _flatten(got)
    hit = len(want & have)
    if hit == 0:
        return 0.0
    p, r = hit / len(have), hit / len(want)
    return 2 * p * r / (p + r)


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(output: str, truth: Any) -> float:
    """ROUGE-L F1 over lower-cased word tokens."""
    a, b = _WORD.findall(str(output).lower()), _WORD.findall(str(truth).lower())
    if not a or not b:
        return float(a == b)
    lcs = _lcs(a, b)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


METRICS: dict[str, Callable[[str, Any], float]] = {"exact": exact, "json": json_f1, "rouge": rouge_l}


def metric_verdict(score_a: float, score_b: float, strong_margin: float) -> tuple[str, int]:
    """(winner, strength) from two metric scores: equal scores tie; a gap >= strong_margin is a strong win."""
    if score_a == score_b:
        return "tie", 0
    winner = "a" if score_a > score_b else "b"
    return winner, 2 if abs(score_a - score_b) >= strong_margin else 1
