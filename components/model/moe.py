"""Mixture of experts: sigmoid router with aux-loss-free bias (noaux_tc), stacked experts, grouped dispatch.

DeepSeek-V3 §2.1.2 and Moonlight App. C:
  s_i = sigmoid(u · e_i)                                    affinity of the token to routed expert i
  top-k on s_i + b_i (b = e_score_correction_bias), restricted to the topk_group best groups
  g_i = s_i / Σ_{j∈topk} s_j (when norm_topk_prob) · routed_scaling_factor, for the chosen experts
  y   = Σ_i g_i · FFN_i(u) + Σ shared FFN(u)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from components.model.config import ModelConfig
from components.model.kernels import autocast_inputs, dispatch_to_slots, expert_swiglu, permute_rows
from components.model.layers import Fp32Buffers, SwiGLU


class Router(Fp32Buffers):
    """Token → (expert indices, weights). The bias only chooses experts; the weights use the unbiased scores."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        # Updated by the balancing rule (Moonlight App. C), never by an optimizer: a buffer, saved in checkpoints.
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> topk indices [T, k] (int64), weights [T, k] (fp32)."""
        c = self.config
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if c.n_group > 1:
            # Group score = sum of each group's two best biased scores; keep the topk_group best groups.
            grouped = choice.view(-1, c.n_group, c.n_routed_experts // c.n_group)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = group_scores.topk(c.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            expert_mask = group_mask[:, :, None].expand_as(grouped).reshape_as(choice)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        indices = choice.topk(c.num_experts_per_tok, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return indices, weights * c.routed_scaling_factor


class Experts(nn.Module):
    """n_routed_experts SwiGLU FFNs stored as stacked 3-D parameters [experts, out, in].

    Muon orthogonalizes each expert's matrix separately (one matrix per leading index).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
        """x [T, H]; indices/weights [T, k]; counts [E] tokens per expert.

        The T*k (token, choice) slots are sorted by expert and each expert runs one matmul over its contiguous
        segment. Dispatch and combine are permutations of the slots, so both directions of both are gathers
        (no zero-filled accumulation buffers, no scatter-add).
        """
        t, k = indices.shape
        order = indices.reshape(-1).argsort(stable=True)  # sorted slot -> slot (slot = token * k + choice)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        xs = dispatch_to_slots(x, order, inverse, k)
        # Under autocast, compute in its dtype (the hand-written matmuls are out of autocast's reach).
        xs, gate, up, down = autocast_inputs(xs, self.gate_proj, self.up_proj, self.down_proj)
        ys = expert_swiglu(xs, counts, gate, up, down)
        ys = permute_rows(ys, inverse, order).view(t, k, ys.shape[-1])  # back to (token, choice) order
        return (ys * weights.to(ys.dtype)[:, :, None]).sum(1).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0 else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> (y [B, S, H], tokens per expert [E] as int64)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        indices, weights = self.gate(flat)
        counts = torch.bincount(indices.reshape(-1), minlength=self.experts.num_experts)
        y = self.experts(flat, indices, weights, counts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape), counts


def gate_scaling_factor(num_experts: int, top_k: int, iterations: int = 100_000, seed: int = 0) -> float:
    """Moonlight App. C, Fig. 6: the routed_scaling_factor that keeps the MoE output RMS like a dense layer's.

    Logits ~ N(0, 1) per expert; sigmoid; keep the top-k; renormalize to sum 1; factor = E[1/sqrt(Σ p²)].
    Gives 2.446 for (64, 6) and 2.827 for (256, 8).
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"gate_scaling_factor: top_k={top_k} must be in [1, num_experts={num_experts}]")
    gen = torch.Generator().manual_seed(seed)
    total, done, chunk = 0.0, 0, 50_000
    while done < iterations:
        n = min(chunk, iterations - done)
        p = torch.randn(n, num_experts, generator=gen, dtype=torch.float64, device="cpu").sigmoid()
        p = p.topk(top_k, dim=-1).values
        p = p / p.sum(-1, keepdim=True)
        total += (1.0 / p.pow(2).sum(-1).sqrt()).sum().item()
        done += n
    result = total / iterations
    assert math.isfinite(result)
    return result
