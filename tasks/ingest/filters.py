"""Which rows are kept: the ones asked for (model, metadata, time window), then the ones worth learning from.

Each dropped row counts under its first reason, in this order: the selection (`model`, `metadata`, `no time`,
`before since`, `after until`: rows the user did not ask for are not counted as defects), then what the row is
(`error`, `image`/`audio`/`file`, `tool call`, `unknown role`...: from reading it), then the answer: cut at the
token limit (`cut (length)`), stopped by the provider's filter (`content filter`), a refusal, empty, or with no user
turn before it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from tasks.ingest.sources import lookup

if TYPE_CHECKING:
    from tasks.ingest.config import IngestConfig
    from tasks.ingest.sources import Record

# A refusal said in words. Only the stock openings of a refusal to help, and only in a short answer (a refusal is a
# sentence or two; 300 characters is over twice the longest of OpenAI's and Anthropic's stock ones): "I'm sorry, but
# I can't find that order" is an answer, not a refusal, and stays.
REFUSAL = re.compile(
    r"^\s*(?:(?:i'?m|i am) sorry|sorry|unfortunately|apologies)?[,.!]?\s*(?:but\s+)?"
    r"(?:i|we)\s*(?:can'?t|cannot|can ?not|won'?t|will not|am unable to|'m unable to|am not able to|'m not able to)"
    r"\s+(?:help|assist|comply|do that|fulfil|fulfill|engage)\b", re.IGNORECASE)  # not "provide", "answer": "I can't
# provide a refund, but an agent will confirm it" and "I can't answer without your order number" are answers
REFUSAL_MAX_CHARS = 300
SNAPSHOT = re.compile(r"\d{4}(?:-\d{2}-\d{2})?")  # the date suffix of a snapshot: 2024-08-06, or 0613 (gpt-4's)


def is_snapshot(served: str, model: str) -> bool:
    """Whether `served` is a dated snapshot of `model` (gpt-4o-2024-08-06, gpt-4-0613), not another model that shares
    its prefix (gpt-4o-mini is not gpt-4o)."""
    return served.startswith(f"{model}-") and SNAPSHOT.fullmatch(served[len(model) + 1:]) is not None


def is_refusal(answer: str) -> bool:
    """True for a short answer that opens as a stock refusal to help."""
    return len(answer) <= REFUSAL_MAX_CHARS and bool(REFUSAL.match(answer.replace("\u2019", "'")))


def not_selected(rec: Record, cfg: IngestConfig) -> str | None:
    """The selection filter that leaves the row out, or None."""
    if cfg.models:
        served = str(rec.served_by or "")
        if str(rec.model) not in cfg.models and served not in cfg.models and \
                not any(is_snapshot(served, m) for m in cfg.models):
            return "model"
    for key, value in cfg.metadata.items():
        found = lookup(rec.metadata, key)
        if found is None or str(found) != value:
            return "metadata"
    if cfg.since or cfg.until:
        if rec.time is None:
            return "no time"
        if cfg.since and rec.time < cfg.since:
            return "before since"
        if cfg.until and rec.time >= cfg.until:
            return "after until"
    return None


def drop_reason(rec: Record, cfg: IngestConfig) -> str | None:
    """Why the row is dropped (its first reason, in the module's order), or None when it is kept."""
    reason = not_selected(rec, cfg) or rec.defect
    if reason:
        return reason
    if rec.finish_reason == "length":
        return "cut (length)"
    if rec.finish_reason == "content_filter":
        return "content filter"
    answer = rec.messages[-1]["content"]
    if rec.refused or is_refusal(answer):
        return "refusal"
    if not answer.strip():
        return "empty answer"
    if not any(m["role"] == "user" for m in rec.messages[:-1]):
        return "no user turn"
    return None
