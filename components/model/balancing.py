"""Aux-loss-free load balancing (DeepSeek-V3 §2.1.2, with Moonlight's centred update, App. C).

Each MoE layer's router keeps a bias b that only affects which experts are chosen. After each optimizer step,
with e_i = mean load − load_i (positive when expert i is under-loaded):

    b_i ← b_i + u · (sign(e_i) − mean_j sign(e_j))

Moonlight subtracts the mean so the bias stays centred without changing the top-k; u = 1e-3 in stages 1–2, 0 in
the cooldown. Counts must be summed over all ranks (and micro-batches) before calling this.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def update_routing_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """Apply one update in place to `bias` [E] from token counts [E]; returns the applied delta."""
    if rate < 0:
        raise ValueError(f"update_routing_bias: rate={rate!r} must be >= 0")
    load = counts.to(torch.float32)
    violation = load.mean() - load  # e_i > 0: expert i got fewer tokens than average
    sign = violation.sign()
    delta = rate * (sign - sign.mean())
    bias.add_(delta.to(bias.dtype))
    return delta


@torch.no_grad()
def update_routing_biases(moe_layers, counts: torch.Tensor, rate: float) -> None:
    """One optimizer step's update of every MoE layer's router bias from its counts [layers, E] (summed over the
    step's micro-batches and all ranks, so every rank applies the same update)."""
    for layer, layer_counts in zip(moe_layers, counts):
        update_routing_bias(layer.gate.e_score_correction_bias, layer_counts, rate)
