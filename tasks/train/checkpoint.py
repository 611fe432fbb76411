"""Fine-tunes that survive their worker: the training state saved to the store every `finetune.checkpoint_every`
steps (or `checkpoint_minutes`), and a fine-tune started again on any machine goes on from the last one.

A checkpoint is a folder result, `checkpoints/<adapter key>/step-<n>/` (written whole, manifest last, like an
adapter), holding `state.pt`: the trainable weights, the optimizer's moments, the schedule, the batch order's random
state and the batches left, the losses, torch's random state, and the settings the search chose (so a resumed
fine-tune does not search again). A resumed run takes exactly the steps the killed one would have taken: on CPU
with the same thread count its adapter equals an uninterrupted run's bit for bit (tests/test_finetune_resume.py).
The older checkpoint is removed once a newer one is whole; all of them once the adapter is in the store.
"""

from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from tasks.store.guards import say
from tasks.store.results import checkpoint_path
from tasks.store.store import Store

if TYPE_CHECKING:
    from tasks.config.stages import FinetuneConfig
    from tasks.train.loop import Trainer

STATE = "state.pt"
FORMAT = 1  # bump when the state's contents change: older checkpoints are then ignored, not misread


class Checkpoints:
    """The checkpoints of one fine-tune (its adapter key) in a store."""

    def __init__(self, store_root: str, key: str, cfg: FinetuneConfig, what: str = "") -> None:
        """Checkpoints of the fine-tune keyed `key`, every cfg.checkpoint_every steps or checkpoint_minutes."""
        self.store, self.rel, self.what = Store(store_root), checkpoint_path(key), what or f"fine-tune {key}"
        self.every, self.seconds = cfg.checkpoint_every, cfg.checkpoint_minutes * 60.0
        self.last_save = time.monotonic()
        self.saved: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether this fine-tune saves checkpoints at all."""
        return bool(self.every or self.seconds)

    def steps(self) -> list[str]:
        """The whole checkpoints in the store, oldest first (`step-<n>` folders with their manifest)."""
        if not self.store.exists(self.rel):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.store.fs.ls(self.store.path(self.rel), detail=False)]
        found = sorted((int(n[5:]), n) for n in names if n.startswith("step-") and n[5:].isdigit())
        return [f"{self.rel}{n}" for _, n in found if self.store.exists(f"{self.rel}{n}")]

    def latest(self) -> dict[str, Any] | None:
        """The last whole checkpoint's state, or None (none, or of another format: said, and started over)."""
        for rel in reversed(self.steps()):
            if not self.store.exists(rel, deep=True):  # damaged: one line, removed, the one before is tried
                continue
            try:
                state = torch.load(self.store.local_dir(rel) / STATE, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is skipped, never fatal
                say(logging.WARNING, f"{self.what}: checkpoint {rel} cannot be read ({type(e).__name__}); ignored")
                continue
            if state.get("format") == FORMAT:
                self.saved = rel
                return state
        return None

    def due(self, done: int) -> bool:
        """Whether a checkpoint is due after step `done`."""
        return bool((self.every and done % self.every == 0)
                    or (self.seconds and time.monotonic() - self.last_save >= self.seconds))

    def save(self, trainer: Trainer, plan: dict[str, Any]) -> None:
        """Save the trainer's state (and the fine-tune's `plan`: rate, steps, the search's record) as the newest
        checkpoint, then remove the one before."""
        rel = f"{self.rel}step-{trainer.done}"
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "trainer": trainer.state_dict(), "plan": plan}, buf)
        with self.store.new_dir(rel) as tmp:
            (tmp / STATE).write_bytes(buf.getvalue())
        old, self.saved, self.last_save = self.saved, rel, time.monotonic()
        if old and old != rel:
            self._remove(old)

    def clear(self) -> None:
        """Remove every checkpoint of this fine-tune (its adapter is in the store)."""
        if self.store.exists(self.rel):
            self._remove(self.rel)

    def _remove(self, rel: str) -> None:
        """Remove a checkpoint folder (a local store's or a bucket's), never raising: a leftover costs only space."""
        try:
            if self.store.local:
                from tasks.store.guards import rm_local

                rm_local(self.store.path(rel))
            else:
                self.store.fs.rm(self.store.path(rel), recursive=True)
        except Exception as e:  # noqa: BLE001 - removed by the next run that finishes this fine-tune
            say(logging.INFO, f"{self.what}: could not remove checkpoint {rel} ({type(e).__name__})")


def train_to(trainer: Trainer, steps: int, ckpt: Checkpoints | None, plan: dict[str, Any]) -> None:
    """Take the trainer to `steps` steps, saving a checkpoint whenever one is due (none after the last step)."""
    if ckpt is None or not ckpt.enabled:
        trainer.advance(steps - trainer.done)
        return
    while trainer.done < steps:
        trainer.advance(1 if ckpt.seconds else min(ckpt.every - trainer.done % ckpt.every, steps - trainer.done))
        if trainer.done < steps and ckpt.due(trainer.done):
            ckpt.save(trainer, plan)
