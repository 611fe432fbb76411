"""The config of the GPU stages: how every (model, dataset) is fine-tuned and how its fine-tune answers."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from tasks.config.base import Frozen

# LoRA's usual peak learning rate on a 7B model (the QLoRA and Axolotl recipes: 1e-4..3e-4); smaller models take
# larger ones. `auto` scales it by (7e9 / parameters)^(1/3): 1B -> 3.8e-4, 70B -> 9.3e-5, the demo zoo's 0.6M -> 4.5e-3
# (near the 3e-3 the demo was tuned at by hand), kept within [5e-5, 1e-2]; parameters as models.loading.model_params.
LORA_LR_7B, LR_FLOOR, LR_CEILING = 2e-4, 5e-5, 1e-2
# `auto` epochs: enough passes to train on about this many rows (120 rows -> 9 epochs), 1 to 10 of them: a small
# dataset needs several passes to move a model at all, a large one is learnt in one.
AUTO_EPOCH_ROWS, AUTO_EPOCHS_MAX = 1000, 10
CHECKPOINT_FIELDS = {"checkpoint_every", "checkpoint_minutes"}  # how a fine-tune is saved, not what it computes
RUNG_SHARE = 0.25  # finetune.search: the share of the schedule every rate trains before all but the best stop


class SettingsSearch(Frozen):
    """Each (model, dataset) at its own best settings: learning rates tried on the development split, the best
    continued, and the number of epochs where its development loss was lowest (tasks/train/settings_search.py)."""

    enabled: bool = Field(default=True, description="Search the learning rate and epochs per (model, dataset); "
                          "false trains every pair with the one learning_rate and epochs below.")
    learning_rates: list[float] = Field(
        default_factory=list, description="Learning rates to try; empty: 3 spanning 10x around learning_rate "
        "(x 1/3.16, x 1, x 3.16).")
    patience: int = Field(default=2, ge=1, description="Development checks in a row without a lower loss before the "
                          "best learning rate's run stops early.")

    def cost(self, dev_share: float) -> float:
        """The search's steps in fine-tunes of one fixed setting, at their most: every rate a quarter of the schedule,
        the best the rest, on the rows left after the development split: (3 x 1/4 + 3/4) x (1 - 0.2) = 1.2."""
        return ((len(self.learning_rates) or 3) * RUNG_SHARE + 1 - RUNG_SHARE) * (1 - dev_share)


class FinetuneConfig(Frozen):
    """LoRA hyper-parameters: the starting point of each (model, dataset)'s settings search, or the settings
    themselves with the search off."""

    lora_r: int = Field(default=8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=16, ge=1, description="LoRA scale numerator (scale = alpha / r).")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        default="all-linear", description="Modules that get adapters; `all-linear` is every linear layer but the head."
    )
    learning_rate: float | Literal["auto"] = Field(
        default="auto", description="AdamW peak learning rate (linear decay); auto: 2e-4 x (7e9 / parameters)^(1/3), "
        "what suits LoRA at the model's size (the middle of the search's three).")
    epochs: float | Literal["auto"] = Field(
        default="auto", description="Passes over the training rows (with the search: the most it may choose); "
        "auto: enough to train on about 1,000 rows, 1 to 10 passes.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps (instead of "
                                  "epochs).")
    batch_size: int = Field(default=8, ge=1, description="Rows per optimizer step.")
    max_length: int = Field(default=512, ge=8, description="Longest training sequence in tokens; longer rows are cut.")
    seed: int = Field(default=0, description="Seed for LoRA init and batch order.")
    packing: Literal[True, False, "auto"] = Field(
        default="auto",
        description="true: each step's rows end to end in one padding-free sequence (attention kept inside each "
        "row); false: right-padded, length-grouped batches; auto: packing where flash-attention's variable-length "
        "kernels run it in one call, length-grouped batches elsewhere (measured faster with SDPA, CPU included).",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: less memory, ~30% more compute."
    )
    search: SettingsSearch = Field(default_factory=SettingsSearch, description="The learning rate and epochs "
                                   "searched per (model, dataset) on the development split.")
    checkpoint_every: int = Field(default=0, ge=0, description="Save the training state to the store every this many "
                                  "optimizer steps, so a fine-tune whose worker dies goes on from there on any worker; "
                                  "0: by time only (checkpoint_minutes). Not part of the adapter's key.")
    checkpoint_minutes: float = Field(default=10.0, ge=0, description="Also save it when this many minutes passed "
                                      "since the last save; 0: by steps only. Not part of the adapter's key.")

    def lr_for(self, params: int) -> float:
        """The peak learning rate for a model of `params` parameters."""
        if self.learning_rate != "auto":
            return float(self.learning_rate)
        return min(LR_CEILING, max(LR_FLOOR, LORA_LR_7B * (7e9 / max(params, 1)) ** (1 / 3)))

    def epochs_for(self, rows: int) -> float:
        """Passes over `rows` training rows."""
        if self.epochs != "auto":
            return float(self.epochs)
        return float(min(AUTO_EPOCHS_MAX, max(1, math.ceil(AUTO_EPOCH_ROWS / max(rows, 1)))))

    def steps_for(self, rows: int) -> int:
        """Optimizer steps of one fine-tune on `rows` training rows."""
        return self.max_steps or math.ceil(self.epochs_for(rows) * rows / self.batch_size)

    def identity(self) -> dict[str, Any]:
        """What keys a fine-tune: every field, the search's only when it is on (so switching it off keys as before
        it existed); never how often it checkpoints (a resumed fine-tune equals an uninterrupted one)."""
        return self.model_dump(exclude=(set() if self.search.enabled else {"search"}) | CHECKPOINT_FIELDS)


class GenerateConfig(Frozen):
    """How every fine-tune answers its test rows."""

    max_new_tokens: int = Field(default=128, ge=1, description="Longest answer in tokens.")
    batch_size: int = Field(default=32, ge=1, description="Test rows per generation batch.")
    engine: Literal["hf", "vllm"] = Field(
        default="hf", description="What generates the answers. hf: transformers, in length-sorted batches of "
        "batch_size, each adapter merged into its cached base. vllm: vLLM's offline engine, every adapter of one base "
        "in one multi-LoRA batch (enable_lora), at the search's dtype, in a process of the environment "
        "BASESEARCH_VLLM_PYTHON names (tasks/generate/vllm_engine.py); for GPUs: on CPU it is slower for small models.")


class ComputeConfig(Frozen):
    """Where the GPU stages (merge, fine-tune, generate) run."""

    mode: Literal["local", "pool"] = Field(default="local", description="local: in-process; pool: a Prefect work pool.")
    pool: str | None = Field(default=None, description="Work pool name when mode is pool.")
    workers: int | Literal["auto"] = Field(
        default="auto",
        description="mode local: fine-tunes run at once, each in its own process with one CPU thread; auto: one "
        "per CPU core (at most 8) on a machine without a GPU, 1 with one.",
    )
    pool_runs: int | Literal["auto"] = Field(
        default="auto",
        description="mode pool: how many stage runs a batch of fine-tunes (or of generations) is sent as; the runs "
        "take the batch's jobs in turn, so a worker process imports torch and Prefect once for several jobs, not once "
        "a job. auto: the work pool's concurrency limit when it has one, else its workers online. A number at least "
        "the batch's size sends a run per job (a pool that starts a machine per run, as Kubernetes does).",
    )
    pool_stay_s: float = Field(
        default=60.0, ge=0, description="mode pool: seconds a stage run waits for the search's next batch once it has "
        "nothing to do. The runs (deployment stages/<pool>) then take every batch of the search from the store, so a "
        "worker's process starts a few times a search, not once a batch (torch, transformers and Prefect's imports: "
        "8-20 s on a CPU core). 0: a run per batch, ending with it (deployments merge, finetune and generate), for a "
        "pool that should hold no idle GPU between batches.",
    )

    cache_dir: str | None = Field(
        default=None, description="A remote store's (s3://...) local copies of models and adapters, keyed by content "
        "key: this folder; default $BASESEARCH_CACHE_DIR, else ~/.cache/basesearch/store. Pool workers set "
        "BASESEARCH_CACHE_DIR in their own environment.")
    cache_gb: float | None = Field(
        default=None, gt=0, description="The most the cache_dir holds, in GB: the least recently used copies are "
        "removed beyond it; default $BASESEARCH_CACHE_GB, else 100.")

    usd_per_hour: dict[str, float] = Field(
        default_factory=lambda: {"cuda": 2.5, "cpu": 0.1},
        description="USD an hour of the device that generates costs, by device type (cuda, cpu, mps): a fine-tune's "
        "cost per 1,000 requests in the report is its measured throughput times this. Defaults: a rented 80 GB GPU "
        "(~$2.50/h), a small cloud CPU machine (~$0.10/h).",
    )

    @field_validator("workers", "pool_runs", mode="before")
    @classmethod
    def _workers(cls, v: Any, info: ValidationInfo) -> Any:
        """A whole number of at least 1, or auto."""
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        what = "processes" if info.field_name == "workers" else "runs"
        raise ValueError(f"should be a whole number of {what} (1 or more) or auto, not {v!r}")
