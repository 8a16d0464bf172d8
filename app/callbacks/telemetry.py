"""Optimizer telemetry (update/weight RMS per group, NS time), max attention logit, SVD entropy, throughput/MFU."""
from __future__ import annotations

import lightning.pytorch as pl
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor

from app.step import step_report
from components.metrics.svd_entropy import svd_entropy_by_group


class OptimizerTelemetry(pl.Callback):
    """Logs the optimizer's per-group stats after every step (paper §2.2: update RMS; Algorithm 1's return value)
    and, every `max_logit_every_n_steps` steps (every step with QK-clip on), the max pre-softmax attention logit over
    the step's micro-batches, per layer (max over heads) and over all layers (App. D), and the number of heads
    QK-clip rescaled."""

    def __init__(self, max_logit_every_n_steps: int = 10):
        if max_logit_every_n_steps < 0:
            raise ValueError(f"OptimizerTelemetry.max_logit_every_n_steps={max_logit_every_n_steps!r} must be >= 0")
        self.every = max_logit_every_n_steps

    def _request(self, pl_module, next_step_start: int) -> None:
        if self.every and next_step_start % self.every == 0:
            pl_module.track_max_logit_next_step()

    def on_train_start(self, trainer, pl_module) -> None:
        self._request(pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        report = step_report(outputs)
        if report is None:
            return
        metrics = {f"optim/{k}": float(v) for k, v in report.optimizer_stats.items()}
        if report.max_logit is not None:
            per_layer = report.max_logit.amax(dim=-1).tolist()
            metrics["attn/max_logit"] = max(per_layer)
            metrics.update({f"attn/layer_{i:02d}/max_logit": v for i, v in enumerate(per_layer)})
        if report.qk_clipped_heads is not None:
            metrics["attn/qk_clipped_heads"] = float(report.qk_clipped_heads.sum())
        if metrics:
            pl_module.log_step_metrics(metrics)
        self._request(pl_module, report.step)


class SVDEntropyMonitor(pl.Callback):
    """SVD entropy per group (AttnQO, AttnKV, Experts, SharedExperts, Router, Dense) after the first optimizer step
    and every `every_n_steps` (§3.4).

    Runs on every rank (sharded parameters are gathered collectively); rank 0 logs.
    """

    def __init__(self, every_n_steps: int = 50, experts_per_layer: int = 3):
        if every_n_steps < 1:
            raise ValueError(f"SVDEntropyMonitor.every_n_steps={every_n_steps!r} must be >= 1")
        self.every_n_steps = every_n_steps
        self.experts_per_layer = experts_per_layer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        report = step_report(outputs)
        if report is not None and (report.step == 1 or report.step % self.every_n_steps == 0):
            entropy = svd_entropy_by_group(pl_module.model, self.experts_per_layer)
            pl_module.log_step_metrics({f"svd_entropy/{k}": v for k, v in entropy.items()})


class MoEThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor fed with our MoE-aware FLOPs (module.flops_per_batch: activated experts +
    attention). Where Lightning knows no peak (CPUs), `peak_flops_per_device` supplies one for MFU."""

    def __init__(self, peak_flops_per_device: float | None = None, window_size: int = 20):
        super().__init__(batch_size_fn=lambda batch: batch["input_ids"].shape[0],
                         length_fn=lambda batch: batch["input_ids"].numel(), window_size=window_size)
        self.peak_flops_per_device = peak_flops_per_device

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.available_flops is None and self.peak_flops_per_device:
            self.available_flops = int(self.peak_flops_per_device)
            for key in list(self._throughputs):
                self._throughputs[key] = Throughput(available_flops=self.available_flops,
                                                    world_size=trainer.world_size, **self.kwargs)
