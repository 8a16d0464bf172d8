"""Keeps the run's curves on rank 0 and, at the end, logs them as PNG plots to MLflow (app/plots.py)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch


class RunHistory(pl.Callback):
    def __init__(self):
        self.tokens: list[int] = []
        self.loss: list[float] = []
        self.lr: list[float] = []
        self.val: list[tuple[int, float]] = []
        self.expert_load: list[tuple[int, torch.Tensor]] = []
        self.svd_entropy: list[tuple[int, dict]] = []
        self.optimizer: list[tuple[int, dict]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        pl_module.history = self

    def record_expert_load(self, tokens: int, counts: torch.Tensor) -> None:
        self.expert_load.append((tokens, counts))

    def record_svd_entropy(self, tokens: int, entropy: dict) -> None:
        self.svd_entropy.append((tokens, dict(entropy)))

    def record_optimizer(self, tokens: int, stats: dict) -> None:
        self.optimizer.append((tokens, dict(stats)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.stepped:
            self.tokens.append(pl_module.tokens_seen)
            self.loss.append(pl_module.step_loss)
            self.lr.append(pl_module.step_state.lr * pl_module.hparams.lr_scale)

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get("val/loss")
        if value is not None and not trainer.sanity_checking:
            self.val.append((pl_module.tokens_seen, float(value)))

    def on_train_end(self, trainer, pl_module) -> None:
        logger = trainer.logger
        if trainer.global_rank != 0 or logger is None or not hasattr(logger, "log_artifact") or not self.tokens:
            return
        from app import plots
        from app.module import stage_boundaries

        out = Path(tempfile.mkdtemp(prefix="crescent-plots-"))
        written = [out / "loss_lr.png"]
        plots.loss_lr_figure(self.tokens, self.loss, self.lr, stage_boundaries(pl_module.schedule),
                             val_tokens=[t for t, _ in self.val] or None, val_loss=[v for _, v in self.val] or None,
                             path=str(written[0]))
        if self.expert_load:
            written.append(out / "expert_load.png")
            plots.expert_load_over_time_figure([t for t, _ in self.expert_load],
                                               torch.stack([c for _, c in self.expert_load]).numpy(),
                                               path=str(written[-1]))
        if self.svd_entropy:
            written.append(out / "svd_entropy.png")
            plots.svd_entropy_figure([t for t, _ in self.svd_entropy], _by_key([e for _, e in self.svd_entropy]),
                                     path=str(written[-1]))
        rms = [(t, {k[: -len("/update_rms")]: v for k, v in s.items() if k.endswith("/update_rms")})
               for t, s in self.optimizer]
        if rms and rms[0][1]:
            written.append(out / "update_rms.png")
            plots.update_rms_figure([t for t, _ in rms], _by_key([r for _, r in rms]), path=str(written[-1]))
        for path in written:
            logger.log_artifact(str(path), "plots")


def _by_key(rows: list[dict]) -> dict[str, list[float]]:
    keys = sorted({k for row in rows for k in row})
    return {k: [row.get(k, float("nan")) for row in rows] for k in keys}
