"""Expert load statistics as a torchmetric: tokens per expert summed over steps (and ranks, via sync)."""
from __future__ import annotations

import torch
from torchmetrics import Metric


def load_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """counts [..., E] -> max/min ratio to the mean load and coefficient of variation, averaged over leading dims."""
    load = counts.to(torch.float64)
    mean = load.mean(-1).clamp(min=1e-12)
    return {
        "max_over_mean": (load.amax(-1) / mean).mean(),
        "min_over_mean": (load.amin(-1) / mean).mean(),
        "cv": (load.std(-1, unbiased=False) / mean).mean(),
    }


class ExpertLoad(Metric):
    """Accumulates per-layer expert token counts [layers, E]; compute() returns load_stats of the total."""

    full_state_update = False

    def __init__(self, num_layers: int, num_experts: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("counts", default=torch.zeros(num_layers, num_experts, dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, counts: torch.Tensor) -> None:
        self.counts += counts.to(self.counts)

    def compute(self) -> dict[str, torch.Tensor]:
        return load_stats(self.counts)
