"""A progress bar in optimizer steps towards the end of the schedule: loss, lr, tokens/s and ETA."""
from __future__ import annotations

import time

from lightning.pytorch.callbacks import TQDMProgressBar

from app.step import step_report


class TokenProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self._t0 = None
        self._tokens0 = 0

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self.train_progress_bar.reset(total=pl_module.schedule.total_steps())
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("train")
        self._t0, self._tokens0 = time.perf_counter(), pl_module.tokens_seen

    def on_train_epoch_start(self, trainer, *_) -> None:
        pass  # one bar for the whole run (the stream is a single endless epoch)

    # Validation is short and its loss goes to the logger; a second bar would interleave with this one.
    def on_validation_start(self, trainer, pl_module) -> None:
        pass

    def on_validation_batch_start(self, *args, **kwargs) -> None:
        pass

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        pass

    def on_validation_end(self, trainer, pl_module) -> None:
        pass

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        report = step_report(outputs)
        if report is None:
            return
        bar = self.train_progress_bar
        bar.n = report.step
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        bar.set_postfix({
            "loss": f"{report.loss:.3f}",
            "lr": f"{report.lr:.2e}",
            "tok/s": f"{(report.tokens - self._tokens0) / elapsed:,.0f}",
            "stage": report.stage_name,
        }, refresh=False)
        if trainer.global_step % self.refresh_rate == 0:
            bar.refresh()
