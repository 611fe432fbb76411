"""The ingest's options: one frozen model, the command line's and the Prefect form's (a leaf: pydantic only)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.config.base import Frozen, PathText

# A log line that cannot be read is usually a crash mid-write (the last line cut short); many of them mean the
# wrong file or format, which is said at once rather than ingested as a handful of rows.
MAX_UNREADABLE = 0.01


def utc(moment: datetime) -> datetime:
    """The moment as an aware UTC datetime (a naive one is taken as UTC, as logs write it)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


class IngestConfig(Frozen):
    """What `python -m flows.ingest` and the `ingest` flow read, filter, clean and write."""

    source: PathText = Field(description="A JSONL file of logged chat-completion requests and responses, a JSONL or "
                             "Parquet file of fine-tuning rows (messages), a folder of such files (read in name "
                             "order, so a new day's file sorts last), or openai:stored-completions (the store=true "
                             "traffic of the endpoint at base_url, oldest first).")
    out: PathText = Field(description="The folder for train.jsonl, test.jsonl, ingest.json and ingest.md: new, empty, "
                          "or holding an earlier ingest's files (replaced).")
    models: tuple[str, ...] = Field(default=(), description="Keep only requests to these models (the request's "
                                    "model, or the response's dated snapshot of it, e.g. gpt-4o-2024-08-06 for "
                                    "gpt-4o); empty: every model.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Keep only rows whose metadata has each of "
                                     "these values (dotted keys reach nested values; values compared as text).")
    since: datetime | None = Field(default=None, description="Keep only requests at or after this time (ISO; a "
                                   "time without a zone is UTC). Rows without a time are dropped when a window is "
                                   "set.")
    until: datetime | None = Field(default=None, description="Keep only requests before this time (ISO, exclusive).")
    exact_dedup: bool = Field(default=True, description="Drop a row whose prompt repeats an earlier row's after "
                              "folding case and whitespace (off: kept, and grouped with it in the split).")
    near_dedup: bool = Field(default=True, description="Drop a row whose prompt is a near-duplicate of an earlier "
                             "row's (off: kept, and grouped with it in the split).")
    near_threshold: float = Field(default=0.9, gt=0, le=1, description="Jaccard similarity of two prompts' word "
                                  "n-gram sets (system messages left out) from which they are near-duplicates.")
    shingle_words: int = Field(default=5, ge=1, le=20, description="Words per n-gram of the near-duplicate check "
                               "(5, as distilabel's MinHash dedup).")
    group_by: str | None = Field(default=None, description="Dotted path of a row's conversation or thread id (e.g. "
                                 "metadata.thread_id): rows sharing it land on the same side of the split. None, or "
                                 "a row without it: the row's near-duplicate cluster.")
    test_share: float = Field(default=0.2, ge=0, lt=1, description="Share of the groups written to test.jsonl.")
    held_out_share: float = Field(default=0.0, ge=0, lt=1, description="Share of the groups carved out to "
                                  "held_out.jsonl (the search's validation dataset); 0: no such file.")
    scrub_pii: bool = Field(default=True, description="Replace e-mail addresses, phone numbers, card numbers, IBANs, "
                            "IP addresses and API keys by typed placeholders (<EMAIL>, <PHONE>...); off "
                            "(--keep-pii): only counted and reported.")
    phone_region: str = Field(default="US", min_length=2, max_length=2, description="Region whose national phone "
                              "formats are recognised (international +CC numbers are, whatever it is).")
    prune_static: bool = Field(default=False, description="Remove the static system prompt from the rows and write "
                               "it to static_prompt.txt (it is detected and reported either way).")
    static_share: float = Field(default=0.5, gt=0, le=1, description="A system prompt in at least this share of the "
                                "rows is the static one.")
    tool_calls: Literal["keep", "drop"] = Field(default="keep", description="keep: an assistant's tool call becomes "
                                                "its JSON text and a tool's result a user turn; drop: rows with "
                                                "either are dropped and counted.")
    max_unreadable: float = Field(default=MAX_UNREADABLE, ge=0, le=1, description="The largest share of unreadable "
                                  "lines skipped and counted; over it the ingest stops in one line naming the first.")
    examples: int = Field(default=3, ge=0, le=20, description="Examples shown per kind in ingest.md.")
    base_url: str | None = Field(default=None, description="The OpenAI-compatible endpoint whose stored completions "
                                 "are read (source openai:stored-completions); None: OpenAI's.")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="Environment variable holding that endpoint's API "
                             "key (read as the judge reads its key: never logged nor written to the manifest).")
    api_key_secret: str | None = Field(default=None, description="Prefect Secret block holding the key, read when the "
                                       "environment variable is unset.")
    page_size: int = Field(default=100, ge=1, le=100, description="Stored completions (and messages) asked for per "
                           "page (the API allows 1 to 100).")
    concurrency: int = Field(default=8, ge=1, le=64, description="Stored completions whose messages are fetched at "
                             "once (one request each, more for long conversations).")

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, moment: datetime | None) -> datetime | None:
        """Times are compared in UTC."""
        return None if moment is None else utc(moment)

    @field_validator("phone_region")
    @classmethod
    def _region(cls, region: str) -> str:
        """Region codes are upper case (ISO 3166)."""
        return region.upper()

    @model_validator(mode="after")
    def _consistent(self) -> IngestConfig:
        """A window that ends before it starts, or shares that leave no training rows, are mistakes."""
        if self.since and self.until and self.until <= self.since:
            raise ValueError(f"until ({self.until.isoformat()}) is not after since ({self.since.isoformat()})")
        if self.test_share + self.held_out_share >= 1:
            raise ValueError(f"test_share + held_out_share is {self.test_share + self.held_out_share:g}: no row "
                             "would be left for training")
        return self


class RelabelConfig(Frozen):
    """What `python -m flows.ingest relabel` asks a stronger model, of which rows, and how much it may spend."""

    folder: PathText = Field(description="The ingest folder whose rows get new answers (its files stay as they are).")
    model: str = Field(description="The stronger model that answers, as the endpoint names it (e.g. gpt-4o).")
    base_url: str | None = Field(default=None, description="Its OpenAI-compatible endpoint; None: OpenAI's.")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="Environment variable holding the API key (read "
                             "as the judge reads its key: never logged nor written).")
    api_key_secret: str | None = Field(default=None, description="Prefect Secret block holding the key, read when the "
                                       "environment variable is unset.")
    mode: Literal["regenerate", "revise"] = Field(default="regenerate", description="regenerate: the model answers "
                                                  "the conversation afresh; revise: it rewrites the original answer "
                                                  "as the instructions say.")
    instructions: PathText | None = Field(default=None, description="A text file of instructions: with revise, how to "
                                          "rewrite (required); with regenerate, a system message put first.")
    splits: tuple[Literal["train", "test", "held_out"], ...] = Field(default=("train",), min_length=1, description=
                                                                     "The folder's files relabeled, each into "
                                                                     "SPLIT.relabeled.jsonl beside it.")
    max_tokens: int = Field(default=1024, ge=1, description="Longest new answer in tokens (temperature is always 0).")
    price_input: float | None = Field(default=None, ge=0, description="USD per 1M prompt tokens of the model (None: "
                                      "not priced).")
    price_output: float | None = Field(default=None, ge=0, description="USD per 1M completion tokens of the model.")
    max_usd: float | None = Field(default=None, gt=0, description="Stop asking before this many dollars are spent "
                                  "(each call reserved at its highest cost); rows not asked keep their original answer "
                                  "and are asked by the next run. Needs the prices.")
    concurrency: int = Field(default=16, ge=1, description="Requests in flight at once.")
    rpm: int | None = Field(default=None, ge=1, description="Requests-per-minute limit of the endpoint (None: none).")
    max_retries: int = Field(default=6, ge=0, description="Retries of a 429, 5xx, timeout or dropped connection.")
    timeout_s: float = Field(default=120.0, gt=0, description="Seconds before one request is abandoned (and retried).")

    @model_validator(mode="after")
    def _complete(self) -> RelabelConfig:
        """Revising needs instructions; a dollar cap needs both prices."""
        if self.mode == "revise" and not self.instructions:
            raise ValueError("instructions: --mode revise needs a file of instructions (how to rewrite the answers)")
        if (self.price_input is None) != (self.price_output is None):
            raise ValueError("price_input: give both prices (input and output, USD per 1M tokens), or neither")
        if self.max_usd is not None and self.price_input is None:
            raise ValueError("max_usd: a dollar cap needs the model's prices (--price-input and --price-output)")
        return self
