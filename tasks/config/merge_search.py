"""The `search:` section of a config: the search's own merges (a leaf module beside tasks/config/schema.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config.base import Frozen, Name


class MergeSearchConfig(Frozen):
    """The search's own merges: rounds that propose merges of the leaders, scored on a development split."""

    rounds: int = Field(
        default=0, ge=0, description="Rounds of proposals after the first rating on the development split (0: off)."
    )
    proposals: int = Field(default=4, ge=1, description="Most merges proposed per round.")
    patience: int = Field(
        default=1, ge=1, description="Rounds in a row in which no proposal beats the leader's interval before the "
        "loop stops early (1: stop after the first such round; search.rounds caps the rounds either way).",
    )
    dev_share: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="Share of each dataset's training rows set aside as its development "
        "split, chosen by a hash of each row's content (never the test split); proposals and the leaders train on the "
        "rest and are judged and rated there.",
    )
    refit: bool = Field(
        default=False, description="false: every fine-tune of the search (the final test rating's too) trains on the "
        "training rows minus the development rows, so the loop's first rating reuses the search's own fine-tunes and "
        "a kept proposal needs no second one; true: the final set is fine-tuned again on all training rows (one more "
        "fine-tune per model and dataset, on 1 / (1 - dev_share) times the rows).",
    )
    leaders: int = Field(
        default=3, ge=2, description="Best-rated models (on the development split) the rule merges and each round's "
        "proposals are judged against.",
    )
    keep: int = Field(
        default=1, ge=1, description="Best proposals (by development rating) rated on the test split with every other "
        "contender (fine-tuned again on the full training rows when search.refit is true).",
    )
    methods: list[Literal["slerp", "ties", "dare_ties"]] = Field(
        default_factory=lambda: ["slerp", "ties"], min_length=1,
        description="Merge methods the rule proposes: slerp of the top two (over t); ties / dare_ties of the top "
        "three (other than base_model) over density; points where a curve fitted to each family's development "
        "ratings has the highest upper bound (tasks/plan/propose.py).",
    )
    base_model: Name | None = Field(
        default=None, description="Common ancestor that ties and dare_ties proposals take differences from; None: "
        "the base_model of the config's first ties/dare merge, else no ties/dare proposals.",
    )
