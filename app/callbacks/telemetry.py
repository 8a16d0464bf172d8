"""Optimizer telemetry (update/weight RMS per group, NS time), max attention logit, SVD entropy, throughput/MFU."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor

from components.metrics.svd_entropy import svd_entropy_by_group


class OptimizerTelemetry(pl.Callback):
    """Logs the optimizer's per-group stats after every step (paper §2.2: update RMS; Algorithm 1's return value)
    and, every `max_logit_every_n_steps`, the max pre-softmax attention logit over all layers (App. D)."""

    def __init__(self, max_logit_every_n_steps: int = 10):
        if max_logit_every_n_steps < 0:
            raise ValueError(f"OptimizerTelemetry.max_logit_every_n_steps={max_logit_every_n_steps!r} must be >= 0")
        self.every = max_logit_every_n_steps
        self._tracking = False

    def _attention(self, pl_module):
        return [layer.self_attn for layer in pl_module.model.model.layers]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.every and pl_module._micro == 0 and trainer.global_step % self.every == 0:
            self._tracking = True
            for attn in self._attention(pl_module):
                attn.track_max_logit = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._tracking:
            self._tracking = False
            values = []
            for attn in self._attention(pl_module):
                attn.track_max_logit = False
                if attn.max_logit is not None:
                    values.append(attn.max_logit.float())
                    attn.max_logit = None
            if values:
                top = torch.stack(values).max()
                top = pl_module._all_reduce(top.reshape(1).cpu(), "max")[0]
                pl_module.emit({"attn/max_logit": float(top)})
        if pl_module.stepped and pl_module.optimizer_stats:
            stats = {f"optim/{k}": float(v) for k, v in pl_module.optimizer_stats.items()}
            pl_module.emit(stats)
            history = getattr(pl_module, "history", None)
            if history is not None:
                history.record_optimizer(pl_module.tokens_seen, pl_module.optimizer_stats)


class SVDEntropyMonitor(pl.Callback):
    """SVD entropy per group (AttnQO, AttnKV, Experts, SharedExperts, Router, Dense) every `every_n_steps` (§3.4).

    Runs on every rank (sharded parameters are gathered collectively); rank 0 logs.
    """

    def __init__(self, every_n_steps: int = 50, experts_per_layer: int = 3):
        if every_n_steps < 1:
            raise ValueError(f"SVDEntropyMonitor.every_n_steps={every_n_steps!r} must be >= 1")
        self.every_n_steps = every_n_steps
        self.experts_per_layer = experts_per_layer

    def _measure(self, trainer, pl_module) -> None:
        entropy = svd_entropy_by_group(pl_module.model, self.experts_per_layer)
        pl_module.emit({f"svd_entropy/{k}": v for k, v in entropy.items()})
        history = getattr(pl_module, "history", None)
        if history is not None:
            history.record_svd_entropy(pl_module.tokens_seen, entropy)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.stepped and (trainer.global_step == 1 or trainer.global_step % self.every_n_steps == 0):
            self._measure(trainer, pl_module)


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
