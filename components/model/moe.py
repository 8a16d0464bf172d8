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
from torch.autograd.function import once_differentiable

from components.model.config import ModelConfig
from components.model.layers import SwiGLU, autocast_inputs


class Router(nn.Module):
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


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch._grouped_mm needs CUDA (sm90+) and bf16; elsewhere the segment loop runs."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9


class _Dispatch(torch.autograd.Function):
    """xs[j] = x[order[j] // k]: each token copied to its k slots in expert order. Backward: gather the slot
    gradients back into (token, choice) order with the inverse permutation and sum over the k choices."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        slots, k = grad.shape[0], ctx.k
        return grad.index_select(0, inverse).view(slots // k, k, grad.shape[-1]).sum(1), None, None, None


class _Permute(torch.autograd.Function):
    """y = x[perm] for a permutation; backward gathers with the inverse (index_select's own backward would
    zero-fill and index_add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


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
        xs = _Dispatch.apply(x, order, inverse, k)
        # Under autocast, compute in its dtype (the hand-written matmuls below are out of autocast's reach).
        xs, gate, up, down = autocast_inputs(xs, self.gate_proj, self.up_proj, self.down_proj)
        if grouped_mm_supported(xs):
            ys = self._grouped(xs, counts, gate, up, down)
        else:
            ys = self._segments(xs, counts, gate, up, down)
        ys = _Permute.apply(ys, inverse, order).view(t, k, ys.shape[-1])  # back to (token, choice) order
        return (ys * weights.to(ys.dtype)[:, :, None]).sum(1).to(x.dtype)

    @staticmethod
    def _grouped(xs, counts, gate, up, down) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)
        a = torch._grouped_mm(xs, gate.transpose(-2, -1), offs=offs)
        u = torch._grouped_mm(xs, up.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(F.silu(a) * u, down.transpose(-2, -1), offs=offs)

    @staticmethod
    def _segments(xs, counts, gate, up, down) -> torch.Tensor:
        sizes = counts.tolist()  # one host sync per layer; the loops run over experts, never over tokens
        return _SegmentFFN.apply(xs, gate, up, down, sizes)


class _SegmentFFN(torch.autograd.Function):
    """The experts' SwiGLU over expert-sorted rows, one matmul per expert segment, written into whole-batch
    buffers (no per-expert outputs to concatenate, no per-expert weight gradients to stack); the elementwise
    work runs once over all rows. Backward is written out by hand: one autograd node instead of about ten per
    expert."""

    @staticmethod
    def forward(ctx, xs, gate, up, down, sizes):
        rows = xs.shape[0]
        a = xs.new_empty(rows, gate.shape[1])
        u = xs.new_empty(rows, up.shape[1])
        spans = []
        start = 0
        for e, n in enumerate(sizes):
            if n:
                spans.append((e, start, start + n))
                torch.mm(xs[start:start + n], gate[e].t(), out=a[start:start + n])
                torch.mm(xs[start:start + n], up[e].t(), out=u[start:start + n])
            start += n
        h = F.silu(a).mul_(u)
        y = xs.new_empty(rows, down.shape[1])
        for e, lo, hi in spans:
            torch.mm(h[lo:hi], down[e].t(), out=y[lo:hi])
        ctx.save_for_backward(xs, gate, up, down, a, u)
        ctx.spans = spans
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        xs, gate, up, down, a, u = ctx.saved_tensors
        gy = gy.contiguous()
        # Few whole-batch temporaries: on CPU each fresh [rows, I] buffer costs page faults, not just arithmetic.
        sig = torch.sigmoid(a)
        silu = a * sig
        h = silu * u
        gh = torch.empty_like(a)
        g_down = torch.empty_like(down)
        for e, lo, hi in ctx.spans:
            torch.mm(gy[lo:hi], down[e], out=gh[lo:hi])
            torch.mm(gy[lo:hi].t(), h[lo:hi], out=g_down[e])
        g_u = h.copy_(gh).mul_(silu)  # h is no longer needed
        dsilu = torch.sub(1, sig).mul_(silu).add_(sig)  # d silu(a) / da = σ + silu (1 - σ)
        g_a = gh.mul_(u).mul_(dsilu)
        g_gate, g_up = torch.empty_like(gate), torch.empty_like(up)
        gx = torch.empty_like(xs)
        for e, lo, hi in ctx.spans:
            torch.mm(g_a[lo:hi].t(), xs[lo:hi], out=g_gate[e])
            torch.mm(g_u[lo:hi].t(), xs[lo:hi], out=g_up[e])
            torch.mm(g_a[lo:hi], gate[e], out=gx[lo:hi])
            gx[lo:hi].addmm_(g_u[lo:hi], up[e])
        used = {e for e, _, _ in ctx.spans}
        for e in range(gate.shape[0]):  # experts that received no token get zero gradients
            if e not in used:
                g_gate[e].zero_(), g_up[e].zero_(), g_down[e].zero_()
        return gx, g_gate, g_up, g_down, None


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
        p = torch.randn(n, num_experts, generator=gen, dtype=torch.float64).sigmoid()
        p = p.topk(top_k, dim=-1).values
        p = p / p.sum(-1, keepdim=True)
        total += (1.0 / p.pow(2).sum(-1).sqrt()).sum().item()
        done += n
    result = total / iterations
    assert math.isfinite(result)
    return result
