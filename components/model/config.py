"""Model configuration for DeepSeek-V3-style MoE transformers, and the named presets.

Field names follow the HF `DeepseekV3Config` so that `config.json` maps one to one (see `hf.py`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    vocab_size: int = 163840
    hidden_size: int = 2048
    intermediate_size: int = 11264  # dense FFN (the first_k_dense_replace layers, or every layer when no MoE)
    moe_intermediate_size: int = 1408  # one routed expert; shared experts use n_shared_experts times this
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    # Multi-head latent attention (DeepSeek-V2 §2.1)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # Mixture of experts (DeepSeek-V3 §2.1.2); n_routed_experts == 0 means a dense model
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.446
    first_k_dense_replace: int = 1
    # The rest
    max_position_embeddings: int = 8192
    rope_theta: float = 50000.0
    rope_interleave: bool = True  # DeepSeek-V3 checkpoints store the rotary dims interleaved (pairs 2i, 2i+1)
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163585
    extra: dict = field(default_factory=dict, repr=False)  # unknown HF keys, kept for round trips

    def __post_init__(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "intermediate_size",
        ]
        for name in positive:
            _require(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                     getattr(self, name), "must be a positive integer")
        _require(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", self.q_lora_rank,
                 "must be None (no query compression) or a positive integer")
        _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim,
                 "must be even (rotary embedding pairs dimensions)")
        _require(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "must be > 0")
        _require(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
                 self.first_k_dense_replace, f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        _require(self.n_routed_experts >= 0, "n_routed_experts", self.n_routed_experts, "must be >= 0")
        if self.is_moe:
            _require(self.moe_intermediate_size > 0, "moe_intermediate_size", self.moe_intermediate_size,
                     "must be a positive integer")
            _require(self.n_shared_experts >= 0, "n_shared_experts", self.n_shared_experts, "must be >= 0")
            _require(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                     self.num_experts_per_tok, f"must be in [1, n_routed_experts={self.n_routed_experts}]")
            _require(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group", self.n_group,
                     f"must be >= 1 and divide n_routed_experts={self.n_routed_experts}")
            _require(1 <= self.topk_group <= self.n_group, "topk_group", self.topk_group,
                     f"must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            _require(self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
                     self.num_experts_per_tok,
                     f"must be <= topk_group * experts per group = {self.topk_group * per_group}")
            _require(self.routed_scaling_factor > 0, "routed_scaling_factor", self.routed_scaling_factor,
                     "must be > 0")

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """DeepSeek-V3: 1/sqrt(qk_nope_head_dim + qk_rope_head_dim) (no YaRN mscale: Moonlight has no rope_scaling)."""
        return self.qk_head_dim ** -0.5

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_moe and layer_idx >= self.first_k_dense_replace

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _require(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"model config: {name}={value!r} {rule}")


PRESETS: dict[str, ModelConfig] = {
    # Moonlight-16B-A3B: the config.json of the HF release (moonshotai/Moonlight-16B-A3B).
    "moonlight-16b-a3b": ModelConfig(),
    # ~250M total / ~75M activated: fits one GPU for real experiments.
    "small": ModelConfig(
        vocab_size=32768, hidden_size=768, intermediate_size=3072, moe_intermediate_size=384,
        num_hidden_layers=12, num_attention_heads=12, q_lora_rank=None, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, routed_scaling_factor=2.0, max_position_embeddings=2048, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=0,
    ),
    # A few million parameters: trains on 2 CPU cores. 8 experts top-2, 1 shared.
    "tiny": ModelConfig(
        vocab_size=4096, hidden_size=128, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, routed_scaling_factor=1.0, max_position_embeddings=1024, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=0,
    ),
}
# Same depth, width and total parameter budget as `tiny`, without experts: for dense-vs-MoE comparisons.
PRESETS["tiny-dense"] = PRESETS["tiny"].replace(n_routed_experts=0, n_shared_experts=0, intermediate_size=1152,
                                                first_k_dense_replace=0)


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name].replace()
