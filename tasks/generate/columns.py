"""The outputs Parquet's columns, whichever engine generated them (docs/architecture.md lists them)."""

OUTPUT_COLUMNS = ["dataset", "example_id", "contender", "output", "prompt_tokens", "completion_tokens",
                  "latency_s", "error"]
# A fine-tune's outputs also say why each answer ended: `stop` (an end-of-turn token) or `length` (max_new_tokens),
# and how it was served: latency_s is the row's own time from its batch's start to its last token, ttft_s to its
# first token; batch_s, batch_size and tokens_per_s are its batch's (throughput, and so cost, come from these).
TIMING_COLUMNS = ["ttft_s", "batch_size", "batch_s", "tokens_per_s", "device"]
GENERATED_COLUMNS = [*OUTPUT_COLUMNS, "finish_reason", *TIMING_COLUMNS]
