"""Preemption: on SIGTERM (what Kubernetes sends before killing a pod) finish the current optimizer step, save a
resumable checkpoint, and stop cleanly; `crescent train` resumes from it automatically.

The signal handler only sets a flag. At the next optimizer-step boundary the ranks agree (the strategy's
`reduce_boolean_decision`: any rank asked) so that all of them save and stop at the same step; a checkpoint taken
mid-accumulation would lose gradients.
"""
from __future__ import annotations

import signal
from pathlib import Path

import lightning.pytorch as pl

from app.step import step_report

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the Job's podFailurePolicy treats it as retriable


class PreemptionCheckpoint(pl.Callback):
    def __init__(self, dirpath: str | Path = "checkpoints"):
        self.dirpath = Path(dirpath)
        self.requested = False
        self.saved_path: Path | None = None
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def on_train_start(self, trainer, pl_module) -> None:
        # Replace Lightning's handler (it would stop at the next micro-batch, possibly mid-accumulation).
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if step_report(outputs) is None or not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.saved_path = self.dirpath / f"preempt-step={trainer.global_step:08d}.ckpt"
        pl_module.stop("preempted")
        trainer.save_checkpoint(str(self.saved_path))

    def on_train_end(self, trainer, pl_module) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
