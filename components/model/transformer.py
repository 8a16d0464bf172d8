"""The decoder-only transformer: embeddings, MLA + (dense FFN | MoE) blocks, final norm, LM head.

Module names mirror HF `DeepseekV3ForCausalLM` (model.layers.N.self_attn.q_proj, ...), so checkpoint keys map
one to one except for the stacked expert tensors (see `hf.py`). The model knows nothing about parallelism.
"""
from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from components.model.attention import KVCache, MultiHeadLatentAttention
from components.model.config import ModelConfig
from components.model.document_mask import DocumentMask, document_positions
from components.model.fused_loss import linear_cross_entropy
from components.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from components.model.moe import MoE


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # None when the loss came from the fused head (targets without return_logits)
    loss: torch.Tensor | None
    expert_counts: torch.Tensor | None  # [moe_layers, n_routed_experts] tokens routed this forward pass


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, rope, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, counts = self.mlp(h)
            return x + y, counts
        return x + self.mlp(h), None


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.qk_rope_head_dim, config.rope_theta)


class CrescentForCausalLM(nn.Module):
    """Moonlight / DeepSeek-V3 architecture (no multi-token prediction: Moonlight App. C)."""

    def __init__(self, config: ModelConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # How packed samples (segment_ids) attend: 'auto' (FlexAttention on CUDA, SDPA with a boolean mask
        # elsewhere), 'flex' or 'sdpa'; see document_mask.py.
        self.attention_backend = "auto"
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """N(0, initializer_range) for every matrix, embedding and expert stack; ones for norms; zero routing bias.

        Each parameter draws from its own generator seeded by (seed, name), so the values do not depend on how
        the model is laid out: a sharded (DTensor) parameter gets exactly its slice of the single-device tensor.
        """
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if p.ndim < 2:
                p.fill_(1.0)  # the only 1-D parameters are RMSNorm weights
                continue
            # Drawn on the CPU whatever the device: under `torch.device("cuda")` (build_model) an unplaced
            # torch.empty lands on CUDA and refuses a CPU generator; the values match on every device.
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.empty(p.shape, dtype=torch.float32, device="cpu").normal_(0.0, std, generator=gen)
            _copy_global_slice(p, full)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Rotary tables (not saved in checkpoints) and zero routing biases."""
        for module in self.modules():
            if hasattr(module, "e_score_correction_bias") and module.e_score_correction_bias.device.type != "meta":
                module.e_score_correction_bias.zero_()
            if isinstance(module, RotaryEmbedding) and module.inv_freq.device.type != "meta":
                c = self.config
                module.inv_freq.copy_(1.0 / (c.rope_theta ** (
                    torch.arange(0, c.qk_rope_head_dim, 2, dtype=torch.float32, device=module.inv_freq.device)
                    / c.qk_rope_head_dim)))

    def moe_layers(self) -> list[nn.Module]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        return_logits: bool | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, S]; targets [B, S] (already shifted: targets[t] = input_ids[t+1]; -100 = ignore).

        attention_mask [B, S_total] marks real tokens (1) and padding (0) over cache + new tokens; position_ids
        default to the running position (after the cached prefix). logits_to_keep > 0 computes only the last
        positions' logits (generation). With targets, the loss comes from a chunked head that never holds the
        [B, S, vocab] logits (`linear_cross_entropy`) and `logits` is None, unless return_logits=True.

        segment_ids [B, S] (packed samples, training only): attention stays inside each segment and positions
        default to restarting at each one (document_mask.py).
        """
        b, s = input_ids.shape
        past = cache.length if cache is not None else 0
        if segment_ids is not None:
            if attention_mask is not None or cache is not None:
                raise ValueError("segment_ids (packed samples) cannot be combined with attention_mask or a KV cache")
            if position_ids is None:
                position_ids = document_positions(segment_ids)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + s]
            else:
                position_ids = torch.arange(past, past + s, device=input_ids.device).expand(b, s)
        rope = self.model.rotary(position_ids)
        mask = (DocumentMask(segment_ids, self.attention_backend) if segment_ids is not None
                else self._mask(attention_mask, b, s, past, input_ids.device))

        x = self.model.embed_tokens(input_ids)
        counts = []
        for layer in self.model.layers:
            x, layer_counts = layer(x, rope, mask, cache)
            if layer_counts is not None:
                counts.append(layer_counts)
        if cache is not None:
            cache.advance(s)
        x = self.model.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        counts = torch.stack(counts) if counts else None
        if targets is not None and not return_logits:
            loss = linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight, targets.reshape(-1))
            return ModelOutput(logits=None, loss=loss, expert_counts=counts)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1).long(),
                                   ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, expert_counts=counts)

    @staticmethod
    def _mask(attention_mask, b, s, past, device) -> torch.Tensor | None:
        """None (plain causal, the fast path) unless there is padding or a cached prefix with several new tokens."""
        if attention_mask is None and (past == 0 or s == 1):
            return None
        total = past + s
        causal = torch.ones(s, total, dtype=torch.bool, device=device).tril(past)
        mask = causal[None, None].expand(b, 1, s, total)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :total].bool()
            # A padding query has no key to attend to (NaN); let it see itself (its output is never used).
            diagonal = torch.zeros(s, total, dtype=torch.bool, device=device)
            diagonal[torch.arange(s, device=device), past + torch.arange(s, device=device)] = True
            mask = mask | diagonal
        return mask

    def new_cache(self, max_length: int) -> KVCache:
        return KVCache(self.config.num_hidden_layers, max_length)


def _copy_global_slice(p: torch.Tensor, full: torch.Tensor) -> None:
    """p ← full, or for a DTensor its local slice of `full` (any placement layout)."""
    if hasattr(p, "device_mesh") and hasattr(p, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
        p.to_local().copy_(full[index])
    else:
        p.copy_(full)


def build_model(config: ModelConfig, device: torch.device | str | None = None, seed: int = 0) -> CrescentForCausalLM:
    """Build on `device` (default: the current default device; "meta" allocates nothing) and initialize."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = CrescentForCausalLM(config, seed=seed)
    return model
