"""QK-clip (MuonClip, Kimi K2 §2.1) for multi-head latent attention: after the optimizer step, every head whose max
pre-softmax logit S_h exceeded τ has its query and key weights scaled so that its logit falls to τ.

Formula. γ_h = min(1, τ / S_h) (γ_h = 1 when S_h <= τ). With the split α (Megatron's `qk_clip_alpha`, 0.5 = K2):

    q_proj (q_b_proj with query compression), head h rows [h·D, (h+1)·D), D = qk_nope + qk_rope:
        rows [h·D, h·D + qk_nope)              no-position query   × γ_h^α
        rows [h·D + qk_nope, (h+1)·D)          rotary query        × γ_h
    kv_b_proj, head h rows [h·E, (h+1)·E), E = qk_nope + v_head_dim:
        rows [h·E, h·E + qk_nope)              no-position key     × γ_h^(1-α)
        rows [h·E + qk_nope, (h+1)·E)          value               × 1
    kv_a_proj_with_mqa (the rotary key, shared by all heads), o_proj, q_a_proj: untouched.

Derivation (new logit <= τ). For any query position i and key position j, head h's logit is
    l_ij = s · (q_nope,i · k_nope,j + RoPE_i(q_rope,i) · RoPE_j(k_rope,j)),  s = softmax scale.
q_nope, q_rope and k_nope are linear in the scaled rows (q = W_q x, or W_qb · RMSNorm(W_qa x): the norm sits
before W_qb; k_nope = W_kvb · RMSNorm(c_kv): the norm sits before W_kvb), and RoPE is a rotation, linear too. So
the rescale turns q_nope into γ^α q_nope, k_nope into γ^(1-α) k_nope, RoPE(q_rope) into γ RoPE(q_rope), and
leaves k_rope as it is:
    l'_ij = s · (γ^α γ^(1-α) q_nope · k_nope + γ RoPE(q_rope) · RoPE(k_rope)) = γ · l_ij.
With γ > 0, max l' = γ · max l = γ S_h = min(S_h, τ) <= τ on the inputs S_h was measured on, and an unclipped
head (γ = 1) is bitwise unchanged. Only the query side carries the rotary factor because the rotary key is
shared by every head: scaling it would clip them all. As in K2, S_h is measured on the step's forward passes,
before the update, and the bound is per layer: the update, and in a full forward the earlier layers' clips, move a
layer's logits by one step's worth.

Distributed: every rank holds the same S (all-reduced MAX over data-parallel ranks), so every rank computes the
same factors. ZeRO-1 ranks hold full weights and rescale them identically; an FSDP2 parameter (a DTensor placed
Shard(0)) rescales its local rows, the per-row factor vector laid out as the same DTensor (no communication),
whatever head boundaries its shard cuts through.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


@dataclass(frozen=True)
class QKClip:
    """τ (`model.qk_clip_threshold`, K2: 100) and the query share α of the no-position factor (`qk_clip_alpha`)."""

    threshold: float
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or math.isnan(self.threshold) or self.threshold <= 0:
            raise ValueError(f"model.qk_clip_threshold={self.threshold!r} must be a number > 0 (or null: no clip)")
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"model.qk_clip_alpha={self.alpha!r} must be a number in [0, 1]")

    def factors(self, max_logits: torch.Tensor) -> torch.Tensor:
        """γ = min(1, τ / S) elementwise (fp32), 1 where S <= τ (or S is -inf / nan: nothing measured)."""
        s = max_logits.float()
        return torch.where(s > self.threshold, self.threshold / s, torch.ones_like(s))

    @torch.no_grad()
    def apply(self, attention_layers: Sequence, max_logits: torch.Tensor) -> torch.Tensor:
        """Rescale each layer's query/key rows from its [heads] max logits (`max_logits` [layers, heads]);
        returns the number of heads clipped per layer [layers] (a tensor: no host sync)."""
        if max_logits.shape[0] != len(attention_layers):
            raise ValueError(f"QK-clip: max_logits has {max_logits.shape[0]} layers, the model {len(attention_layers)}")
        gamma = self.factors(max_logits)
        for attn, g in zip(attention_layers, gamma):
            c = attn.config
            query = attn.q_proj if c.q_lora_rank is None else attn.q_b_proj
            nope, rope = g.pow(self.alpha), g
            scale_rows(query.weight, head_row_factors([nope, rope], [c.qk_nope_head_dim, c.qk_rope_head_dim]))
            key = head_row_factors([g.pow(1.0 - self.alpha), torch.ones_like(g)], [c.qk_nope_head_dim, c.v_head_dim])
            scale_rows(attn.kv_b_proj.weight, key)
        return (max_logits.float() > self.threshold).sum(dim=-1)


def head_row_factors(parts: Sequence[torch.Tensor], widths: Sequence[int]) -> torch.Tensor:
    """[heads · sum(widths)]: head h's rows are parts[0][h] repeated widths[0] times, then parts[1][h] ..."""
    return torch.cat([p[:, None].expand(-1, w) for p, w in zip(parts, widths)], dim=1).reshape(-1)


def scale_rows(weight: torch.Tensor, factor: torch.Tensor) -> None:
    """W ← diag(factor) W in place: a plain tensor whole, a Shard(0) DTensor on its local rows."""
    column = factor.to(device=weight.device, dtype=weight.dtype)[:, None]
    if isinstance(weight, DTensor):
        column = distribute_tensor(column, weight.device_mesh, weight.placements, src_data_rank=None)
    weight.mul_(column)
