"""Expert-load metrics from each optimizer step's report. The routing-bias update itself is part of the step
(`CrescentModule`, Moonlight App. C), so training does not depend on this callback being listed."""
from __future__ import annotations

import lightning.pytorch as pl
import torch

from app.step import step_report
from components.metrics.expert_load import ExpertLoad, load_stats


class ExpertLoadMonitor(pl.Callback):
    """Every `log_every_n_steps` optimizer steps: load statistics of the tokens routed since the last log (max
    and min expert load over the mean, coefficient of variation; averaged over layers and per layer), the largest
    routing bias and the bias rate of the step."""

    def __init__(self, log_every_n_steps: int = 10):
        if log_every_n_steps < 1:
            raise ValueError(f"ExpertLoadMonitor.log_every_n_steps={log_every_n_steps!r} must be >= 1")
        self.log_every_n_steps = log_every_n_steps
        self.load: ExpertLoad | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        report = step_report(outputs)
        if report is None or report.expert_counts is None:
            return
        counts = report.expert_counts
        if self.load is None:
            self.load = ExpertLoad(counts.shape[0], counts.shape[1], sync_on_compute=False)
        self.load.update(counts.cpu())
        if report.step % self.log_every_n_steps:
            return
        metrics = {f"experts/{k}": float(v) for k, v in self.load.compute().items()}
        for layer, layer_counts in enumerate(self.load.counts):
            metrics[f"experts/layer_{layer:02d}/max_over_mean"] = float(load_stats(layer_counts)["max_over_mean"])
        biases = torch.stack([layer.gate.e_score_correction_bias.float().cpu() for layer in pl_module.model.moe_layers()])
        metrics["experts/bias_abs_max"] = float(biases.abs().max())
        metrics["experts/bias_rate"] = float(report.bias_update_rate)
        pl_module.log_step_metrics(metrics)
        self.load.reset()
