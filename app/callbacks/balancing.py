"""Aux-loss-free balancing after every optimizer step, and expert-load metrics."""
from __future__ import annotations

import lightning.pytorch as pl
import torch

from components.metrics.expert_load import ExpertLoad
from components.model.balancing import update_routing_bias


class RoutingBiasBalancer(pl.Callback):
    """b_i += u·(sign(e_i) − mean(sign(e))) per MoE layer (Moonlight App. C), u from the current stage.

    The counts are the optimizer step's tokens per expert, summed over micro-batches and all-reduced over ranks by
    the module, so every rank applies the same update. Load statistics are logged every `log_every_n_steps`.
    """

    def __init__(self, log_every_n_steps: int = 10):
        if log_every_n_steps < 1:
            raise ValueError(f"RoutingBiasBalancer.log_every_n_steps={log_every_n_steps!r} must be >= 1")
        self.log_every_n_steps = log_every_n_steps
        self.load: ExpertLoad | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        counts = pl_module.step_expert_counts
        if not pl_module.stepped or counts is None:
            return
        rate = pl_module.step_state.bias_update_rate
        layers = pl_module.model.moe_layers()
        for layer, layer_counts in zip(layers, counts):
            update_routing_bias(layer.gate.e_score_correction_bias, layer_counts, rate)
        if self.load is None:
            self.load = ExpertLoad(counts.shape[0], counts.shape[1], sync_on_compute=False)
        self.load.update(counts.cpu())
        if trainer.global_step % self.log_every_n_steps == 0:
            stats = self.load.compute()
            biases = torch.stack([layer.gate.e_score_correction_bias.float().cpu() for layer in layers])
            metrics = {f"experts/{k}": float(v) for k, v in stats.items()}
            metrics["experts/bias_abs_max"] = float(biases.abs().max())
            metrics["experts/bias_rate"] = float(rate)
            pl_module.emit(metrics)
            history = getattr(pl_module, "history", None)
            if history is not None:
                history.record_expert_load(pl_module.tokens_seen, self.load.counts.clone())
            self.load.reset()
