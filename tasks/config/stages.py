"""The config of the GPU stages: how every (model, dataset) is fine-tuned and how its fine-tune answers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.config.base import Frozen


class FinetuneConfig(Frozen):
    """LoRA hyper-parameters, the same for every (model, dataset) pair."""

    lora_r: int = Field(default=8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=16, ge=1, description="LoRA scale numerator (scale = alpha / r).")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        default="all-linear", description="Modules that get adapters; `all-linear` is every linear layer but the head."
    )
    learning_rate: float = Field(default=2e-4, gt=0, description="AdamW peak learning rate (linear decay).")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training rows.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
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


class GenerateConfig(Frozen):
    """How every fine-tune answers its test rows."""

    max_new_tokens: int = Field(default=128, ge=1, description="Longest answer in tokens.")
    batch_size: int = Field(default=32, ge=1, description="Test rows per generation batch.")
