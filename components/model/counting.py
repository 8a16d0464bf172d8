"""Parameter and FLOP counting (MoE-aware): what the paper reports and what MFU needs."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from components.model.config import ModelConfig


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    activated: int
    embedding: int  # input embedding + LM head: the paper's 15.29B / 2.24B exclude both, its "16B / 3B" include them

    @property
    def total_without_embeddings(self) -> int:
        return self.total - self.embedding

    @property
    def activated_without_embeddings(self) -> int:
        return self.activated - self.embedding


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Counts from the module's own parameters (works on the meta device)."""
    config: ModelConfig = model.config
    seen: set[int] = set()
    total = 0
    inactive = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".experts." in name and p.ndim == 3:
            # Each token activates num_experts_per_tok of the stacked experts.
            inactive += p.numel() // p.shape[0] * (p.shape[0] - config.num_experts_per_tok)
    embedding = model.model.embed_tokens.weight.numel()
    if not config.tie_word_embeddings:
        embedding += model.lm_head.weight.numel()
    return ParameterCounts(total=total, activated=total - inactive, embedding=embedding)


def flops_per_token(config: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 2·(activated matmul params) per token forward, plus causal attention scores.

    Attention: QKᵀ and AV cost 2·S·(d_qk + d_v) per head per token for full attention; causal halves it.
    Training multiplies the forward by 3 (backward = 2× forward). Embedding lookups are free; the LM head is not.
    """
    c = config
    h, n = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        q = h * n * c.qk_head_dim
    else:
        q = h * c.q_lora_rank + c.q_lora_rank * n * c.qk_head_dim
    attn = q + h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * n * (c.qk_nope_head_dim + c.v_head_dim)
    attn += n * c.v_head_dim * h
    matmul_params = 0
    for layer in range(c.num_hidden_layers):
        matmul_params += attn
        if c.is_moe_layer(layer):
            expert = 3 * h * c.moe_intermediate_size
            matmul_params += expert * (c.num_experts_per_tok + c.n_shared_experts) + h * c.n_routed_experts
        else:
            matmul_params += 3 * h * c.intermediate_size
    matmul_params += h * c.vocab_size  # LM head
    attention_scores = c.num_hidden_layers * n * (c.qk_head_dim + c.v_head_dim) * seq_len  # 2·S·d/2 (causal)
    forward = 2 * matmul_params + attention_scores
    return float(3 * forward if training else forward)
