"""Column lists shared by modules that must not import each other (the metric judge and the LLM judge)."""

from __future__ import annotations

# The judgments Parquet columns (docs/architecture.md, "Parquet columns"), in this order.
JUDGMENT_COLUMNS = ["dataset", "example_id", "contender_a", "contender_b", "order", "winner", "strength", "judge",
                    "raw", "prompt_tokens", "completion_tokens", "cost_usd", "error"]
