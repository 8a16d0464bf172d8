"""A progress bar in optimizer steps towards the end of the schedule: loss, lr, tokens/s and ETA."""
from __future__ import annotations

import time

from lightning.pytorch.callbacks import TQDMProgressBar


class TokenProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self._t0 = None
        self._tokens0 = 0

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        from app.module import total_steps_estimate

        self.train_progress_bar.reset(total=total_steps_estimate(pl_module.schedule))
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
        if not pl_module.stepped:
            return
        bar = self.train_progress_bar
        bar.n = trainer.global_step
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        bar.set_postfix({
            "loss": f"{pl_module.step_loss:.3f}",
            "lr": f"{pl_module.step_state.lr * pl_module.hparams.lr_scale:.2e}",
            "tok/s": f"{(pl_module.tokens_seen - self._tokens0) / elapsed:,.0f}",
            "stage": pl_module.step_state.stage_name,
        }, refresh=False)
        if trainer.global_step % self.refresh_rate == 0:
            bar.refresh()
