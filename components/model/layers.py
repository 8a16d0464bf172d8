"""Small building blocks shared by attention and MoE: RMSNorm, rotary embedding, SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Fp32Buffers(nn.Module):
    """A module whose floating buffers stay fp32 when the module is cast (`model.to(torch.bfloat16)`, `.half()`,
    Lightning's bf16-true): the rotary frequencies and the routing biases are read in fp32, and a bf16 copy would
    lose what they hold (the RoPE phase drifts by radians at long positions; bias updates of 1e-3 round away).
    Moves between devices apply as usual. (nn.Module.to has no per-buffer dtype; torch's RNNs override _apply too.)"""

    def _apply(self, fn, recurse=True):
        kept = {name: b for name, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != torch.float32:  # a cast: the fp32 values, where `fn` put them
                self._buffers[name] = before.to(device=after.device)
        return self


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), computed in fp32 and cast back (as DeepSeek-V3 does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)): the dense FFN and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(Fp32Buffers):
    """cos/sin tables for the decoupled RoPE part of MLA (RoFormer; DeepSeek-V2 §2.1.3)."""

    def __init__(self, dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] -> cos, sin [B, 1, S, dim] in fp32."""
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, H, S, D]. Interleaved checkpoints pair dims (2i, 2i+1): de-interleave first, then rotate halves."""
    if interleaved:
        b, h, s, d = x.shape
        x = x.view(b, h, s, d // 2, 2).transpose(-1, -2).reshape(b, h, s, d)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
