"""Multi-head latent attention (DeepSeek-V2 §2.1, as used by DeepSeek-V3 and Moonlight).

Queries:  q = W_q h                      (or W_qb · RMSNorm(W_qa h) with query compression, q_lora_rank set)
KV:       [c_kv, k_rope] = W_kva h        c_kv has kv_lora_rank dims; k_rope is one head shared by all heads
          [k_nope, v] = W_kvb RMSNorm(c_kv)
Scores:   softmax([q_nope, RoPE(q_rope)] · [k_nope, RoPE(k_rope)]ᵀ · 1/sqrt(qk_nope + qk_rope)), causal
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from components.model.attention_stats import head_max_logits
from components.model.config import ModelConfig
from components.model.document_mask import DocumentMask
from components.model.layers import RMSNorm, apply_rotary


class KVCache:
    """Per-layer key/value cache for incremental decoding, preallocated to `max_length` positions.

    Keys and values are stored per head after the up-projection (values zero-padded to the key width, as the
    attention kernel takes them), so a decoding step costs one projection of the new tokens only.
    """

    def __init__(self, num_layers: int, max_length: int):
        self.max_length = max_length
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # positions filled (the same in every layer once a forward pass completes)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, H, S_new, D] at the current length; return the filled prefix including them."""
        b, h, s, _ = k.shape
        if self.keys[layer] is None:
            self.keys[layer] = k.new_zeros(b, h, self.max_length, k.shape[-1])
            self.values[layer] = v.new_zeros(b, h, self.max_length, v.shape[-1])
        end = self.length + s
        if end > self.max_length:
            raise ValueError(f"KV cache: {end} positions exceed max_length={self.max_length}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def select(self, batch_index: torch.Tensor) -> None:
        """Keep only some batch rows (e.g. drop sequences that finished generating)."""
        self.keys = [None if k is None else k[batch_index] for k in self.keys]
        self.values = [None if v is None else v[batch_index] for v in self.values]


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        h, n = config.hidden_size, config.num_attention_heads
        self.num_heads = n
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(h, n * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, n * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, config.kv_lora_rank + config.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, n * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n * config.v_head_dim, h, bias=False)
        # App. D / QK-clip: the per-head max attention logit [heads] of the last forward, opt-in (an extra, chunked
        # QKᵀ; attention_stats.py).
        self.track_max_logit = False
        self.max_logit: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | DocumentMask | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, S, H]; mask: None for plain causal attention, a boolean [B, 1, S, S_total] (True = attend), or a
        `DocumentMask` for packed samples (FlexAttention or SDPA, see document_mask.py)."""
        c = self.config
        b, s, _ = x.shape
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.num_heads, c.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)

        kv_compressed, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_compressed))
        kv = kv.view(b, s, self.num_heads, c.qk_nope_head_dim + c.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)

        cos, sin = rope
        q_rope = apply_rotary(q_rope, cos, sin, c.rope_interleave)
        k_rope = apply_rotary(k_rope.view(b, 1, s, c.qk_rope_head_dim), cos, sin, c.rope_interleave)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, self.num_heads, -1, -1)), dim=-1)
        # Fused (flash) SDPA kernels need equal q/k and v head dims: pad v with zeros (before caching it, so a
        # decoding step does not pad the whole cached prefix again) and drop the padding after.
        pad = c.qk_head_dim - c.v_head_dim
        v = F.pad(v, (0, pad)) if pad > 0 else v
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)

        if self.track_max_logit:
            self.max_logit = head_max_logits(q, k, c.softmax_scale, mask)
        if b == 0:
            # An empty micro-batch (samples lost to bad data, a rank's padding at the end of the held-out set) still
            # runs, so FSDP2's collectives stay in step; no kernel sees it (flex's block mask refuses a batch of 0,
            # as fused SDPA kernels have), and the result stays in the graph so every parameter gets its zero grad.
            out = v + 0 * (q.sum() + k.sum())
        elif isinstance(mask, DocumentMask):
            out = mask.attend(q, k, v, c.softmax_scale)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1 and k.shape[2] == s, scale=c.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=c.softmax_scale)
        if pad > 0:
            out = out[..., :c.v_head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * c.v_head_dim))
