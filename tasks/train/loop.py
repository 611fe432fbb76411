"""The training loop: rows encoded with the loss on the assistant's tokens only, batched (packed or length-grouped),
and stepped with AdamW; resumable, so that the settings search can run several learning rates side by side."""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from tasks.core import progress
from tasks.core.errors import UserError
from tasks.models.chat import IGNORE, PromptFormat, encode_row
from tasks.models.loading import base_of, peak_memory_mb
from tasks.train.lora_kernels import PACKED_ATTENTION, _register_packed_attention, fuse_small_loras, unfuse_loras

if TYPE_CHECKING:
    from tasks.data.load import Example


# Micro-batch token budget when nothing limits it (CPU): a whole optimizer step in one forward pass.
UNLIMITED_TOKENS = 1 << 30


def encode(tok: Any, fmt: PromptFormat, ex: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one training row in the model's prompt format (tasks/models/chat.py): labels on the target."""
    return encode_row(tok, fmt, ex.prompt, ex.answer)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of indices, each made of similar lengths so that little compute goes on padding.

    Rows are shuffled, cut into windows of 16 batches, sorted by length inside each window, batched, and the
    batches shuffled again: order stays random across windows while padding within a batch stays small.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def shuffled_batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of plain random batches (packing leaves no padding, so nothing is gained by grouping lengths).

    Popped from the end, like length_grouped_batches' list.
    """
    order = list(range(n))
    rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)][::-1]


def _targets(labels: list[int]) -> list[int]:
    """What each position must predict: the next token's label; the last position predicts nothing."""
    return list(labels[1:]) + [IGNORE]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (ids, labels) into tensors with an attention mask (labels unshifted, HF style)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Padding-free batch: all rows end to end in one sequence, positions restarting at 0 for each row.

    transformers reads the position resets as sequence boundaries and keeps attention inside each row
    (a block-diagonal causal mask with SDPA, variable-length kernels with flash attention), so each row is
    computed exactly as if alone. `targets` holds each position's next-token label, IGNORE at each row's end,
    so no row learns to predict the next row's first token.
    """
    ids = torch.tensor([t for x, _ in rows for t in x], dtype=torch.long)[None]
    pos = torch.tensor([p for x, _ in rows for p in range(len(x))], dtype=torch.long)[None]
    tgt = torch.tensor([t for _, y in rows for t in _targets(y)], dtype=torch.long)[None]
    bounds = torch.tensor([0] + [len(x) for x, _ in rows]).cumsum(0)  # stays on the CPU (see packed_sdpa_attention)
    return {"input_ids": ids, "position_ids": pos, "targets": tgt, "cu_seq_lens_q": bounds}


def pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; `targets` as in pack (IGNORE on padding).

    No attention mask: with right padding and causal attention a real token only ever sees the real tokens
    before it, so a mask changes nothing the loss reads (padding positions have no target and pass no
    gradient back); without one, SDPA runs its plain causal kernel and transformers builds no 4-D mask.
    """
    b = collate(rows, pad_id)
    tgt = torch.full_like(b["labels"], IGNORE)
    tgt[:, :-1] = b["labels"][:, 1:]
    return {"input_ids": b["input_ids"], "targets": tgt}


def micro_batches(rows: list[tuple[list[int], list[int]]], budget: int, packing: bool) -> list[list[int]]:
    """Split one optimizer step's rows into micro-batches of at most `budget` tokens (padding counted).

    A row longer than the budget goes alone. Gradients are accumulated over the micro-batches, so the step
    computes the same as one big batch.
    """
    out: list[list[int]] = []
    cur: list[int] = []
    for i, (ids, _) in enumerate(rows):
        cost = (sum(len(rows[j][0]) for j in cur) + len(ids)) if packing else \
            (len(cur) + 1) * max([len(ids)] + [len(rows[j][0]) for j in cur])
        if cur and cost > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    return out + ([cur] if cur else [])


def last_mlp(model: torch.nn.Module) -> torch.nn.Module | None:
    """The position-wise MLP of the model's last decoder layer (Llama-family layout), or None.

    None as well when that layer is checkpointed: its recomputation in the backward pass would run the MLP in full.
    """
    inner = base_of(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not layers or getattr(layers[-1], "gradient_checkpointing", False):
        return None
    return getattr(layers[-1], "mlp", None)


@contextmanager
def mlp_only_at(mlp: torch.nn.Module | None, where: torch.Tensor) -> Iterator[None]:
    """Run `mlp` only at the positions `where` (a bool mask over batch x sequence); elsewhere it outputs zeros.

    Used on the last layer: only positions with a target reach the loss, so its MLP at the others (~77% of the
    demo's positions are prompt) would be computed and thrown away. The MLP is position-wise, so the kept
    positions get exactly what they would get from the full call.
    """
    if mlp is None:
        yield
        return
    full = mlp.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[where] = full(x[where][None])[0]  # as one (1, kept, hidden) row: MoE blocks read a 3-D shape
        return out

    mlp.forward = forward
    try:
        yield
    finally:
        del mlp.forward


def batch_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of a (packed or padded) batch on its target tokens.

    Logits are computed only at the positions that have a target (`logits_to_keep`): on assistant-only data
    most positions are prompt, and the head's matmul and the float32 logits there would be wasted. For the
    same reason the last layer's MLP runs only where a row has a target (mlp_only_at).
    """
    tgt = batch["targets"]
    where = tgt != IGNORE
    keep = where.any(0).nonzero().squeeze(1)  # positions with a target in any row
    kwargs = {k: v for k, v in batch.items() if k != "targets"}
    if base_of(model).config._attn_implementation != PACKED_ATTENTION:
        kwargs.pop("cu_seq_lens_q", None)  # flash attention / SDPA read the rows from position_ids instead
    partial = not bool(where.all())  # every position learned: nothing to skip
    with mlp_only_at(last_mlp(model) if partial else None, where):
        logits = model(**kwargs, use_cache=False, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), tgt[:, keep].flatten(), ignore_index=IGNORE, reduction="sum"
    )


def auto_token_budget(model: torch.nn.Module, dev: torch.device, checkpointing: bool) -> int:
    """Largest micro-batch (tokens) expected to fit in free GPU memory; unlimited on CPU.

    Estimate of activation memory per token in bf16 for a decoder: ~(16 * hidden + 6 * intermediate) values
    per layer without checkpointing, ~(2 * hidden) per layer plus one layer's full set with it; 60% of free
    memory is used. An out-of-memory error halves the budget and redoes the step (train_steps), so the
    estimate only needs to be about right.
    """
    if dev.type != "cuda":
        return UNLIMITED_TOKENS
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", 4096)
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    layers = getattr(cfg, "num_hidden_layers", 32)
    vocab = getattr(cfg, "vocab_size", 32000)
    per_layer = 16 * hidden + 6 * inter
    acts = 2 * hidden * layers + per_layer if checkpointing else per_layer * layers
    per_token = 2 * acts + 8 * vocab  # bf16 activations; float32 logits and their gradient
    free, _ = torch.cuda.mem_get_info(dev)
    return max(256, int(0.6 * free / per_token))


def resolve_packing(packing: bool | str, attn: str) -> bool:
    """`packing` itself, or for "auto": pack only where flash-attention's variable-length kernels read packed rows.

    With SDPA a pack needs one attention call per row; on the demo's CPU bench that made packed steps ~6% slower
    than length-grouped padded batches (1.5% padding), which SDPA runs as one causal call.
    """
    return attn.startswith("flash_attention") if packing == "auto" else bool(packing)


Rows = list[tuple[list[int], list[int]]]  # encoded rows: (input ids, labels with IGNORE outside the answer)


@contextmanager
def training_mode(model: torch.nn.Module, rows: Rows, packing: bool | str, checkpointing: bool) -> Iterator[bool]:
    """Set the model up for training on `rows` (packed attention, fused small LoRAs, checkpointing); yield whether the
    rows are packed, and undo it all on exit."""
    inner = base_of(model)
    attn = inner.config._attn_implementation
    packed = resolve_packing(packing, attn)
    window = getattr(inner.config, "sliding_window", None)
    if packed and attn == "sdpa" and (window is None or max(len(x) for x, _ in rows) <= window):
        _register_packed_attention()
        inner.set_attn_implementation(PACKED_ATTENTION)
    fused = fuse_small_loras(model)
    # Tiny gradients drift into subnormal floats, which x86 CPUs process ~100x slower; flush them to zero.
    torch.set_flush_denormal(True)
    if checkpointing:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield packed
    finally:
        if checkpointing:
            inner.gradient_checkpointing_disable()
        unfuse_loras(fused)
        if inner.config._attn_implementation != attn:
            inner.set_attn_implementation(attn)


def train_steps(
    model: torch.nn.Module,
    rows: Rows,
    *,
    lr: float,
    steps: int,
    batch_size: int,
    seed: int,
    pad_id: int,
    packing: bool | str = "auto",
    gradient_checkpointing: bool = False,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Train `model` for `steps` AdamW steps (linear warm-up 10%, then linear decay) and return metrics.

    Each step takes `batch_size` rows; the loss is the mean over the step's target tokens (labels that are
    not IGNORE, next-token shifted). With `packing` the rows go end to end in one padding-free sequence per
    micro-batch; without it they are right-padded, length-grouped batches; "auto" picks (resolve_packing).
    `max_tokens` caps a micro-batch (default: what fits in GPU memory, unlimited on CPU). CUDA runs in bf16
    autocast; CPU in float32.
    """
    with training_mode(model, rows, packing, gradient_checkpointing) as packed:
        trainer = Trainer(model, rows, lr=lr, steps=steps, batch_size=batch_size, seed=seed, pad_id=pad_id,
                          packing=packed, checkpointing=gradient_checkpointing, max_tokens=max_tokens)
        trainer.advance(steps)
        return trainer.metrics()


class Trainer:
    """One training run's optimizer, schedule and batch order, stepped `advance(n)` at a time: the settings search
    (tasks/train/settings_search.py) runs several side by side on one model and continues the best."""

    def __init__(self, model: torch.nn.Module, rows: Rows, *, lr: float, steps: int, batch_size: int, seed: int,
                 pad_id: int, packing: bool, checkpointing: bool = False, max_tokens: int | None = None) -> None:
        """An optimizer over the model's trainable parameters, for a schedule of `steps` steps."""
        self.model, self.rows, self.steps, self.batch_size = model, rows, steps, batch_size
        self.pad_id, self.packing, self.checkpointing = pad_id, packing, checkpointing
        self.dev = next(model.parameters()).device
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel per step on CPU and CUDA (CPU foreach falls back to ~10 small ops per tensor: 1.2 ms vs
        # 0.5 ms a step for the demo's 56 LoRA tensors)
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0, fused=True)
        warmup = max(1, steps // 10)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
        )
        self.budget = max_tokens or auto_token_budget(model, self.dev, checkpointing)
        self.rng = random.Random(seed)
        self.batches: list[list[int]] = []
        self.losses: list[float] = []
        self.tokens, self.padded, self.seconds = 0, 0, 0.0

    @property
    def done(self) -> int:
        """Steps taken so far."""
        return len(self.losses)

    def advance(self, n: int) -> None:
        """Take the next `n` steps of the schedule (fewer when it ends first)."""
        t0 = time.perf_counter()
        self.model.train()
        for _ in range(min(n, self.steps - self.done)):
            self._step()
        self.seconds += time.perf_counter() - t0

    def _step(self) -> None:
        """One optimizer step: the next batch's rows, in micro-batches that fit the token budget."""
        if not self.batches:
            self.batches = shuffled_batches(len(self.rows), self.batch_size, self.rng) if self.packing else \
                length_grouped_batches([len(ids) for ids, _ in self.rows], self.batch_size, self.rng)
        step_rows = [self.rows[i] for i in self.batches.pop()]
        n_targets = sum(sum(t != IGNORE for t in _targets(y)) for _, y in step_rows)
        # bf16 autocast on GPU halves memory traffic; CPU stays in fp32 (same code path, exact arithmetic).
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.dev.type == "cuda" else \
            torch.autocast("cpu", enabled=False)
        while True:
            try:
                step_loss, step_padded = 0.0, 0
                for mb in micro_batches(step_rows, self.budget, self.packing):
                    sub = [step_rows[i] for i in mb]
                    batch = {k: v if k == "cu_seq_lens_q" else v.to(self.dev, non_blocking=True)
                             for k, v in (pack(sub) if self.packing else pad(sub, self.pad_id)).items()}
                    with autocast:
                        loss = batch_loss_sum(self.model, batch) / max(1, n_targets)
                    loss.backward()
                    step_loss += loss.detach()
                    step_padded += batch["input_ids"].numel()
                break
            except torch.cuda.OutOfMemoryError:
                if self.budget <= 64:
                    raise
                self.opt.zero_grad(set_to_none=True)
                batch = loss = None  # noqa: F841 (free the failed micro-batch before retrying)
                torch.cuda.empty_cache()
                self.budget = min(self.budget, sum(len(x) for x, _ in step_rows)) // 2
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(float(step_loss))
        progress.tick()  # the terminal's bar, wherever it is drawn (nothing when none is bound)
        self.tokens += sum(len(x) for x, _ in step_rows)
        self.padded += step_padded

    def state_dict(self) -> dict[str, Any]:
        """Everything the rest of the run depends on, for a checkpoint (tasks/train/checkpoint.py): the trainable
        weights, the optimizer's moments, the schedule, the batch order's random state and the batches left of the
        epoch, the losses so far, and torch's random state (LoRA dropout)."""
        return {
            "weights": [p.detach().clone() for p in self.params],
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": self.rng.getstate(),
            "batches": [list(b) for b in self.batches],
            "losses": list(self.losses),
            "counts": [self.tokens, self.padded, self.seconds, self.budget],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda" else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict: the next step is the one the saved run would have taken."""
        if len(state["weights"]) != len(self.params) or any(
                w.shape != p.shape for w, p in zip(state["weights"], self.params)):
            raise ValueError("the checkpoint's trainable weights do not match this model's")
        with torch.no_grad():
            for p, w in zip(self.params, state["weights"]):
                p.copy_(w.to(p.device))
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.rng.setstate(state["rng"])
        self.batches = [list(b) for b in state["batches"]]
        self.losses = list(state["losses"])
        self.tokens, self.padded, self.seconds, self.budget = state["counts"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.dev.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.dev)

    def metrics(self) -> dict[str, Any]:
        """What the run did: steps, tokens, speed, first and last loss, memory."""
        losses, seconds = self.losses, self.seconds
        k = max(1, len(losses) // 10)  # report the mean of the first and last 10% of steps: single steps are noisy
        return {
            "steps": self.done,
            "tokens": self.tokens,
            "padded_tokens": self.padded,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(self.tokens / max(seconds, 1e-9), 1),
            "loss_first": round(sum(losses[:k]) / k, 4),
            "loss_last": round(sum(losses[-k:]) / k, 4),
            "device": self.dev.type,
            "packing": self.packing,
            "gradient_checkpointing": self.checkpointing,
            "micro_batch_tokens": None if self.budget >= UNLIMITED_TOKENS else self.budget,
            **peak_memory_mb(self.dev),
        }


def training_rows(tok: Any, fmt: PromptFormat, train: list[Example], max_length: int,
                  ) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(encoded rows that fit in max_length, how many were left out): a row is never cut short of its end of turn."""
    rows = [encode(tok, fmt, ex) for ex in train]
    kept = [r for r in rows if len(r[0]) <= max_length]
    if not kept:
        raise UserError(f"every training row is longer than finetune.max_length {max_length}; raise it")
    return kept, len(rows) - len(kept)
