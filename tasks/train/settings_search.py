"""The settings search: each (model, dataset)'s learning rate and epochs, chosen on its development rows.

Successive halving (Jamieson & Talwalkar 2016, the inner loop of Hyperband) over learning rates. Every rate trains
the first quarter of the schedule on the training rows less the development rows; the one with the lowest
development loss goes on, checked at each of the schedule's check points, and stops once `patience` checks in a row
bring no lower loss (or, when its loss climbs to 3x its lowest, the next best rate goes on in its place: a rate
too high for the whole schedule, which a short first stretch favours). The epochs chosen are where its loss was lowest, as a share of the schedule; the fine-tune
itself then trains on all its training rows with that rate for that share of its own schedule.

All the runs share one loaded model: each keeps its own LoRA weights and optimizer, and its weights are copied in
while it trains, so the base model is loaded once. The cost, in schedules on the rows left after the development
split: 3 rates x 1/4 + the best's other 3/4 = 1.5 (1.2 fine-tunes at search.dev_share 0.2), and the fine-tune one
more: at most 2.2x one fixed setting, less when the best stops early, more (up to 2.8x) when a rate diverges and
the next goes on (bench/finetune_search.py measures it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tasks.config.stages import RUNG_SHARE
from tasks.models.chat import IGNORE
from tasks.train.loop import Rows, Trainer, _targets, batch_loss_sum, pack, pad

if TYPE_CHECKING:
    from tasks.config.stages import FinetuneConfig

SPREAD = math.sqrt(10)  # the default rates: x 1/3.16, x 1, x 3.16 the model's rate, 10x from end to end
MIN_CHECKS, MAX_CHECKS = 4, 20  # development checks per schedule: one an epoch, within these
DIVERGED = 3.0  # a check's loss 3x the run's lowest: diverged (overfitting climbs slowly; a rate too high explodes)


@dataclass
class Run:
    """One learning rate's run: its optimizer and schedule, its LoRA weights while another trains, its checks."""

    lr: float
    trainer: Trainer
    weights: list[torch.Tensor]
    checks: list[tuple[int, float]] = field(default_factory=list)  # (steps taken, development loss)

    def best(self) -> tuple[int, float]:
        """The check with the lowest development loss (the earliest of equals)."""
        return min(self.checks, key=lambda c: (c[1], c[0]))


def search_rates(cfg: FinetuneConfig, params: int) -> list[float]:
    """The learning rates to try: the configured ones, else three spanning 10x around the model's rate."""
    if cfg.search.learning_rates:
        return sorted(cfg.search.learning_rates)
    centre = cfg.lr_for(params)
    return [centre / SPREAD, centre, centre * SPREAD]


def check_steps(steps: int, epochs: float | None) -> list[int]:
    """The steps after which the development loss is measured: each epoch's end, 4 to 20 evenly spaced."""
    n = min(MAX_CHECKS, max(MIN_CHECKS, math.ceil(epochs or 0)))
    return sorted({max(1, round(steps * k / n)) for k in range(1, n + 1)})


@torch.no_grad()
def dev_loss(model: torch.nn.Module, rows: Rows, packing: bool, pad_id: int, batch_size: int) -> float:
    """Mean loss per answer token over the development rows (inf when it is not a number: a diverged run)."""
    model.eval()
    dev = next(model.parameters()).device
    total, targets = 0.0, 0
    for i in range(0, len(rows), batch_size):
        sub = rows[i:i + batch_size]
        batch = pack(sub) if packing else pad(sub, pad_id)
        batch = {k: v if k == "cu_seq_lens_q" else v.to(dev) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            total += float(batch_loss_sum(model, batch))
        targets += sum(sum(t != IGNORE for t in _targets(y)) for _, y in sub)
    loss = total / max(1, targets)
    return loss if math.isfinite(loss) else math.inf


def _copy_in(params: list[torch.nn.Parameter], weights: list[torch.Tensor]) -> None:
    """Load a run's LoRA weights into the model."""
    for p, w in zip(params, weights):
        p.data.copy_(w)


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """A copy of the model's LoRA weights."""
    return [p.detach().clone() for p in params]


def _train_to(run: Run, params: list[torch.nn.Parameter], step: int, measure: Any) -> float:
    """Continue `run` to `step` steps and measure its development loss there."""
    _copy_in(params, run.weights)
    run.trainer.advance(step - run.trainer.done)
    loss = measure()
    run.checks.append((run.trainer.done, loss))
    run.weights = _snapshot(params)
    return loss


def _continue(run: Run, steps: list[int], params: list[torch.nn.Parameter], measure: Any, patience: int) -> bool:
    """Continue `run` check by check until `patience` checks bring no lower loss; True when it diverged (a check's
    loss DIVERGED times its lowest: too high a rate for the rest of the schedule, so the next rate goes on)."""
    for step in steps:
        loss = _train_to(run, params, step, measure)
        if loss > DIVERGED * run.best()[1]:
            return True
        if len(run.checks) - 1 - run.checks.index(run.best()) >= patience:
            return False  # `patience` checks in a row without a lower loss
    return False


def search_settings(model: torch.nn.Module, fit: Rows, dev: Rows, cfg: FinetuneConfig, params: int, pad_id: int,
                    packing: bool, epochs: float | None) -> dict[str, Any]:
    """Search the learning rate and the share of a schedule of `epochs` (None: cfg.max_steps) on `dev`, training on
    `fit`; the model's LoRA weights are as they were on return. The record says what was tried, what each check
    measured and what was chosen."""
    t0 = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = _snapshot(trainable)
    steps = cfg.max_steps or math.ceil((epochs or 1) * len(fit) / cfg.batch_size)
    checks = check_steps(steps, epochs)
    rung = [s for s in checks if s <= RUNG_SHARE * steps] or checks[:1]

    def measure() -> float:
        """The development loss of the weights in the model now."""
        return dev_loss(model, dev, packing, pad_id, 4 * cfg.batch_size)

    runs = [Run(lr, Trainer(model, fit, lr=lr, steps=steps, batch_size=cfg.batch_size, seed=cfg.seed, pad_id=pad_id,
                            packing=packing, checkpointing=cfg.gradient_checkpointing), start)
            for lr in search_rates(cfg, params)]
    for run in runs:
        for step in rung:
            _train_to(run, trainable, step, measure)
    diverged = []
    for best in sorted(runs, key=lambda r: (r.checks[-1][1], r.lr)):  # the best at the rung, else the next
        if not _continue(best, checks[len(rung):], trainable, measure, cfg.search.patience):
            break
        diverged.append(best.lr)
    _copy_in(trainable, start)
    chosen_step, chosen_loss = best.best()
    return {
        "learning_rates": [r.lr for r in runs],
        "fit_rows": len(fit), "dev_rows": len(dev), "schedule_steps": steps, "rung_steps": rung[-1],
        "dev_loss": {f"{r.lr:.3g}": [[s, _json_loss(v)] for s, v in r.checks] for r in runs},
        "learning_rate": best.lr,
        "share": round(chosen_step / steps, 4),
        "epochs": None if epochs is None else round(epochs * chosen_step / steps, 2),
        "best_dev_loss": _json_loss(chosen_loss),
        "first_dev_loss": _json_loss(best.checks[0][1]),
        "diverged": diverged,
        "steps_trained": sum(r.trainer.done for r in runs),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _json_loss(loss: float) -> float | None:
    """A loss as JSON holds it: rounded, None for a diverged run."""
    return round(loss, 4) if math.isfinite(loss) else None
