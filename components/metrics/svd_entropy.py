"""SVD entropy of weight matrices (Moonlight §3.4): H(σ) = −(1/log n) Σ_i p_i log p_i, p_i = σ_i² / Σ_j σ_j².

Groups follow the paper: AttnQO, AttnKV, Experts, SharedExperts, Router, Dense; each group is a macro-average over
its matrices; only a few experts per layer are included (the paper uses 3 of 64).
"""
from __future__ import annotations

import re

import torch
from torch import nn

GROUPS = ("AttnQO", "AttnKV", "Experts", "SharedExperts", "Router", "Dense")

_RULES = [
    (re.compile(r"self_attn\.(q_proj|q_a_proj|q_b_proj|o_proj)\.weight$"), "AttnQO"),
    (re.compile(r"self_attn\.(kv_a_proj_with_mqa|kv_b_proj)\.weight$"), "AttnKV"),
    (re.compile(r"mlp\.shared_experts\.\w+\.weight$"), "SharedExperts"),
    (re.compile(r"mlp\.experts\.\w+$"), "Experts"),
    (re.compile(r"mlp\.gate\.weight$"), "Router"),
    (re.compile(r"mlp\.(gate_proj|up_proj|down_proj)\.weight$"), "Dense"),
]


def svd_entropy(matrix: torch.Tensor) -> float:
    """Normalized entropy of the squared singular values of a 2-D matrix, in [0, 1]."""
    if matrix.ndim != 2:
        raise ValueError(f"svd_entropy: expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    sigma = torch.linalg.svdvals(matrix.detach().to(torch.float32))
    n = sigma.numel()
    if n < 2:
        return 0.0
    p = sigma.pow(2)
    p = p / p.sum().clamp(min=1e-30)
    h = -(p * p.clamp(min=1e-30).log()).sum()
    return float(h / torch.log(torch.tensor(float(n))))


def group_of(name: str) -> str | None:
    for pattern, group in _RULES:
        if pattern.search(name):
            return group
    return None


def svd_entropy_by_group(model: nn.Module, experts_per_layer: int = 3) -> dict[str, float]:
    """Macro-average SVD entropy per group over the model's matrices (first `experts_per_layer` experts)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        group = group_of(name)
        if group is None:
            continue
        tensor = p.full_tensor() if hasattr(p, "full_tensor") else p
        mats = tensor.unbind(0)[:experts_per_layer] if tensor.ndim == 3 else [tensor]
        for m in mats:
            sums[group] = sums.get(group, 0.0) + svd_entropy(m)
            counts[group] = counts.get(group, 0) + 1
    return {g: sums[g] / counts[g] for g in GROUPS if g in counts}
